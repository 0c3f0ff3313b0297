"""Atomic writes: a file is replaced whole or not at all, so a crash (or ``kill -9``) never leaves half a
checkpoint, record or result where the last good one was; what a crash leaves is a temporary file,
removed by :func:`remove_temp_files`.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from verydeep.errors import UserError

#: The name pattern of :func:`atomic_write`'s temporary files, ``.last.pt.XXXX.tmp``.
TEMP_PATTERN = ".*.tmp"
#: The most bytes of a file's name its temporary file's name repeats: with the dot before and mkstemp's
#: ``.XXXXXXXX.tmp`` after, 255 bytes, the longest name Linux's file systems take.
NAME_IN_TEMP_BYTES = 241
#: The temporary file safetensors' ``save_file`` writes beside its target before renaming it (``.tmp`` and six
#: random characters): a write cut short leaves it too.
SAFETENSORS_TEMP_PATTERN = ".tmp??????"


def _read_umask() -> int:
    """This process's umask, read by setting it and back: once, at import, before any thread could create
    a file in between."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The umask, which gives an atomically written file the permissions a plain ``open`` would.
UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path``: readers never see half a file.

    A write that fails (a full disk, a read-only folder) removes its temporary file, leaves the
    previous ``path`` as it was, and is a :class:`UserError` naming the file.
    """
    atomic_write_all({path: write})
    return Path(path)


def atomic_write_all(writes: Mapping[str | Path, Callable[[str], Any]]) -> None:
    """:func:`atomic_write` of several files as one: every ``write(tmp_path)`` done and fsynced before any file is
    renamed onto its path, so that a write that fails leaves all the previous files as they were (a set of
    results never mixes two runs'). The renames follow one another: only a kill in the microseconds between two
    leaves a mix; the temporary files such a kill leaves are removed by the next write of the same files."""
    temps: dict[Path, str] = {}
    try:
        for path, write in writes.items():
            temps[Path(path)] = _written(Path(path), write)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as error:  # a rename refused after _written's checks (a folder made since)
        raise UserError(f"{path}: cannot be written ({error.strerror or error})") from error
    finally:  # whatever stopped the set (an error, Ctrl-C): no temporary file stays
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
    for folder in {path.parent for path in temps}:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _written(path: Path, write: Callable[[str], Any]) -> str:
    """A temporary file beside ``path`` that ``write`` wrote, fsynced, with a plain ``open``'s permissions."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # found here, before any file of a set is renamed, not by the rename at the end
        if len(os.fsencode(path.name)) > _longest_name(path.parent):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        if path.is_dir():
            raise OSError(errno.EISDIR, "a folder of that name is there")
        remove_temp_files(path.parent, of=path.name)  # left by a write of this file that a kill cut short
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise UserError(f"{path}: cannot be written ({_reason(path, error)})") from error
    fcntl.flock(fd, fcntl.LOCK_EX)  # held while it is written: a live write is no leftover (remove_temp_files)
    try:
        write(tmp)
        # after the write, which may have made the file anew (safetensors does, 0600): mkstemp's 0600 would hide
        # it from those a plain open lets read
        os.chmod(tmp, 0o666 & ~UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        reason = getattr(error, "strerror", None) or _full_disk(path.parent) or str(error).splitlines()[0]
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: cannot be written ({reason}); the previous file is intact") from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return tmp


def _being_written(tmp: Path) -> bool:
    """Whether a write in progress, in this process or another, holds the lock of the temporary file ``tmp``
    (:func:`_written`); a kill releases it."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _reason(path: Path, error: OSError) -> str:
    """Why a file's folder could not be made or written in: the system's words, or the file that stands where
    one of its folders goes."""
    blocking = file_in_the_way(path.parent)
    return f"{blocking}: {IN_THE_WAY}" if blocking else error.strerror or str(error)


#: What a file where a folder goes is called (mkdir says "File exists" of it).
IN_THE_WAY = "a file, where a folder is needed"


def file_in_the_way(folder: Path) -> Path | None:
    """The file that stands where ``folder``, or a folder above it, goes; None if none."""
    return next((place for place in (folder, *folder.parents) if _is_file(place)), None)


#: The free bytes under which a write that failed in other words (torch's "unexpected pos") failed for space.
FULL = 1 << 20


def _full_disk(folder: Path) -> str | None:
    """The system's words for a full disk where ``folder``'s file system has less than :data:`FULL` free bytes
    left, the failed write's temporary file still on it; else None."""
    try:
        return os.strerror(errno.ENOSPC) if shutil.disk_usage(folder).free < FULL else None
    except OSError:
        return None


def _is_file(path: Path) -> bool:
    """Whether ``path`` is there and is no folder (False where the system refuses to look: a name too long)."""
    try:
        return path.exists() and not path.is_dir()
    except OSError:
        return False


def _longest_name(folder: Path) -> int:
    """The most bytes a file's name may have in ``folder``: its file system's, else Linux's 255."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _temp_prefix(name: str) -> str:
    """The start of the names of a file's temporary files: a dot and the name, cut to fit (by whole characters,
    in the bytes the file system sees)."""
    while len(os.fsencode(name)) > NAME_IN_TEMP_BYTES:
        name = name[:-1]
    return f".{name}."


def remove_temp_files(folder: str | Path, of: str | None = None) -> list[Path]:
    """Delete the temporary files that writes cut short by a crash left in ``folder``: all of them (safetensors'
    own too), or only those of the writes of the file named ``of`` (a folder shared with other commands' writes);
    a write still in progress (:func:`_being_written`) keeps its own."""
    own = f"{glob.escape(_temp_prefix(of))}{'?' * 8}.tmp" if of is not None else None  # mkstemp's 8 characters
    patterns = [TEMP_PATTERN, SAFETENSORS_TEMP_PATTERN] if own is None else [own]
    found = sorted(p for pattern in patterns for p in Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    stale = [tmp for tmp in found if not _being_written(tmp)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def remove_written(path: Path) -> None:
    """Delete ``path``, a file :func:`atomic_write` wrote, and the temporary files its writes cut short left."""
    path.unlink(missing_ok=True)
    remove_temp_files(path.parent, of=path.name)
