"""Published weights on disk: the weights folder, a known name's file in it, and downloading it with its
published checksum checked (PAPER.md Sec. 8)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from verydeep.errors import MissingFileError, UserError
from verydeep.io.atomic import atomic_write
from verydeep.io.catalogue import NAMES, KnownWeights, known_weights
from verydeep.io.formats.caffe import looks_like_caffe


def weights_folder(weights_dir: str | Path | None = None) -> Path:
    """Where named weights live: ``weights_dir``, else ``$VERYDEEP_WEIGHTS_DIR``, else ``~/.cache/verydeep``."""
    if weights_dir is not None and not str(weights_dir).strip():
        raise UserError("--weights-dir is empty: give a folder, or leave the option out for the default")
    folder = weights_dir or os.environ.get("VERYDEEP_WEIGHTS_DIR") or Path.home() / ".cache" / "verydeep"
    return Path(folder).expanduser()


def _known(name: str) -> KnownWeights:
    if name not in NAMES:
        raise MissingFileError(f"{name}: no such file or folder, nor a published weights name ({', '.join(NAMES)})")
    return known_weights()[name]


def resolve_source(source: str | Path, weights_dir: str | Path | None = None) -> Path:
    """An existing file or folder, or a known name's official file in the weights folder; with ``weights_dir``
    given, a known name is looked up there even where a file of that name lies in the working folder."""
    if not str(source):  # Path("") is the working folder, whatever run lies there
        raise UserError("an empty name names no weights; give a file, a run folder or a known name (vgg16, ...)")
    path = Path(source).expanduser()
    if path.exists() and not (weights_dir is not None and str(source) in NAMES):
        if not (path.is_file() or path.is_dir()):  # a pipe would block the read, a device never end it
            raise UserError(f"{source}: not a regular file or folder, so no weights")
        return path
    known = _known(str(source))
    folder = weights_folder(weights_dir)
    if not (folder / known.file).is_file():
        raise MissingFileError(f"{source}: {folder / known.file} is missing; run `verydeep download {source}`, "
                               f"or get {known.url} and put it in {folder}")
    return folder / known.file


def refuse_unused_weights_dir(weights_dir: str | Path | None, sources: list[str | Path]) -> None:
    """``--weights-dir`` is where named weights are looked up; beside weights that all name files or folders it
    would do nothing, which is a :class:`UserError` rather than a flag silently dropped."""
    if weights_dir is not None and sources and all(
            Path(source).expanduser().exists() and str(source) not in NAMES for source in sources):
        raise UserError(f"--weights-dir {weights_dir}: named weights (vgg16, caffe-vgg19, ...) are looked up there, "
                        f"but {', '.join(map(str, sources))} name files or folders; drop --weights-dir")


def download(name: str, weights_dir: str | Path | None = None) -> Path:
    """Download a published file into the weights folder under its official name (written under a temporary
    name, renamed once its checksum is checked). A file already there is kept when its checksum is the
    published one, and refused, untouched, when it is not."""
    known = _known(name)
    target = weights_folder(weights_dir) / known.file
    if target.is_dir():
        raise UserError(f"{target}: a folder where `verydeep download {name}` would write {known.file}")
    if target.is_file():
        wrong = checksum_mismatch(known, target)
        if wrong:
            raise UserError(f"{target}: already there, but {wrong}: damaged or another file; delete it and run "
                            f"`verydeep download {name}` again")
        return target
    return atomic_write(target, lambda tmp: _fetch(known, tmp))


def checksum_mismatch(known: KnownWeights, path: str | Path) -> str | None:
    """How ``path``'s checksum differs from the published one (the SHA-256 prefix of torchvision's file names,
    Keras' MD5), or None when it agrees; the authors' Caffe files, for which none is published, must at least
    begin as a Caffe model does."""
    if known.file.endswith(".caffemodel") and not looks_like_caffe(path):
        with open(path, "rb") as f:
            head = f.read(8)
        return f"it begins {head!r}, as no Caffe model does"
    for algorithm, label, expected, prefix in (("sha256", "SHA-256", known.hash_prefix, True),
                                               ("md5", "MD5", known.md5, False)):
        if expected:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, algorithm).hexdigest()
            if not (digest.startswith(expected) if prefix else digest == expected):
                return f"its {label} {'begins' if prefix else 'is'} {digest[: len(expected)]}, not {expected}"
    return None


def _fetch(known: KnownWeights, tmp: str) -> None:
    try:
        torch.hub.download_url_to_file(known.url, tmp, hash_prefix=known.hash_prefix, progress=True)
    except (OSError, RuntimeError) as error:  # no network, HTTP errors, a wrong SHA-256
        raise UserError(f"{known.url}: download failed ({error})") from error
    wrong = checksum_mismatch(known, tmp)
    if wrong:
        raise UserError(f"{known.url}: the download's checksum is wrong: {wrong}")
