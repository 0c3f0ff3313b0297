"""Image folders as labelled datasets: which files are images, the class folders and their names, finding a
split (``train``, ``val``, ``test``), and :class:`ImageFolder` for ``split/<class>/<image>`` (ImageNet's
``train/``, a re-organised ``val/``). The flat ILSVRC-2012 validation folder is :mod:`.ilsvrc_val`'s; opening
either, and class-balanced parts of one, :mod:`.splits`'; collating and size-grouped batches, :mod:`.batches`'.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from verydeep.data.decode import image_size
from verydeep.errors import MissingFileError, UserError

log = logging.getLogger("verydeep.data")

#: File name endings read as images (case-insensitive). Hidden files (``._x.jpg``) are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")

#: Files that name the classes: ``<synset> <name>`` per line, beside the split or its parent.
NAME_FILES = ("classes.txt", "words.txt", "LOC_synset_mapping.txt", "synset_words.txt")

#: How label and class-name text files are read: UTF-8, without the byte-order mark that Excel's
#: "CSV UTF-8" and Notepad write first (it would stick to the first header, synset or file name).
TEXT_ENCODING = "utf-8-sig"

#: What a broken image raises while it is opened or decoded.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class Transform(Protocol):
    """A sample's transform: ``(path, generator)`` to its item, drawing any random numbers from
    ``generator`` (torch's global RNG when ``None``)."""

    def __call__(self, path: str | Path, generator: torch.Generator | None = None) -> Any: ...


class BadImageError(UserError):
    """An image that cannot be read, raised in ``strict`` mode; the message names the file."""


#: An object's default repr, as in Pillow's messages about the in-memory stream it was given.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")

#: The files this process has named as unreadable: each is logged once, however often it is skipped.
_reported: set[str] = set()


def unreadable(path: str | Path, error: BaseException) -> str:
    """The one line that names an unreadable image and why (the reason without the stream the
    file was read from; a character of the name that would break the line, escaped)."""
    reason = " ".join(_OBJECT_REPR.sub("", str(error)).split())
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path))  # a newline in a name: \n
    return f"{shown}: unreadable image ({type(error).__name__}: {reason})"


def report_skip(path: str | Path, error: BaseException) -> None:
    """Log a skipped image as one line naming it, the first time this process skips it."""
    if str(path) not in _reported:
        _reported.add(str(path))
        log.warning("skipped %s", unreadable(path, error))


def note_reported(paths: Iterable[str | Path]) -> None:
    """Count ``paths`` as named in this process: a worker named them, and the next pass's workers, forked from
    this process, will not name them again."""
    _reported.update(map(str, paths))


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk(folder: Path, walked: dict[Path, Path] | None = None) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, its file names)`` for ``folder`` and every folder below it, links followed, hidden ones
    left out, in sorted order. A linked folder that leads back to one above it or to one walked already (here,
    or in another walk sharing ``walked``: another class folder of the split) is a :class:`UserError` naming the
    link: its images would be counted again, under this folder's class."""
    walked = {} if walked is None else walked  # each folder read, and each folder above one, by its real path

    def visit(path: Path) -> None:
        real = path.resolve()
        first = walked.get(real)
        if first is not None:
            raise UserError(f"{path}: the folder {real} is read as {first} too, or holds it (a link leads there "
                            "twice, so its images would be counted twice); remove the link")
        for above in (real, *real.parents):
            walked.setdefault(above, path)

    visit(folder)
    pending = [folder]
    while pending:  # depth first, in sorted order
        path = pending.pop()
        try:
            with os.scandir(path) as listed:
                entries = list(listed)
        except OSError:  # a folder that cannot be listed holds no image it could read (as os.walk skips it)
            continue
        folders = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
        for name in folders:
            visit(path / name)
        yield path, sorted(e.name for e in entries if _listed_file(e))
        pending += [path / name for name in reversed(folders)]


def _listed_file(entry: os.DirEntry) -> bool:
    """A regular file, or a link to one or to nothing (a dangling link: skipped as unreadable when read); not a
    pipe, socket or device, whose reading would wait for ever."""
    try:
        return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:
        return False


def images_under(folder: Path, walked: dict[Path, Path] | None = None) -> list[Path]:
    """The images in ``folder`` and every folder below it (:func:`_walk`), in sorted order."""
    return [path / f for path, filenames in _walk(folder, walked) for f in filenames if is_image(Path(f))]


def images_in(folder: Path) -> list[Path]:
    """The images in ``folder`` itself (a flat folder's), in sorted order: files (:func:`_listed_file`) of an
    image's name."""
    with os.scandir(folder) as entries:
        return sorted(folder / e.name for e in entries if is_image(Path(e.name)) and _listed_file(e))


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_dirs(folder: Path) -> list[str]:
    """The class folders of ``folder``: its subfolders, hidden ones left out, when any of them holds an image;
    else none, as a flat folder of images has beside a stray folder (``__MACOSX/`` of hidden ``._x.JPEG``
    files, an empty one)."""
    names = _subfolders(folder)
    return names if any(_has_images(folder / name) for name in names) else []


def kaggle_download(folder: Path) -> list[Path]:
    """The top of Kaggle's ILSVRC download when ``folder`` lies in its ``ILSVRC/Data/CLS-LOC/`` (the top holds
    ``LOC_val_solution.csv`` and ``LOC_synset_mapping.txt``); else nothing."""
    here = Path(os.path.abspath(folder))
    for above in (here, *here.parents):
        if (above.name, above.parent.name, above.parent.parent.name) == ("CLS-LOC", "Data", "ILSVRC"):
            return [above.parent.parent.parent]
    return []


def unicode_twins(ours: Sequence[str], theirs: Sequence[str]) -> str:
    """The first class of ``ours`` that ``theirs`` spells in another Unicode normalisation (the same letters, one
    composed and one decomposed: macOS writes folder names decomposed), both spelt out in ASCII; else ``""``."""
    composed = {unicodedata.normalize("NFC", c): c for c in theirs if c not in ours}
    twin = next((c for c in ours if c not in theirs and unicodedata.normalize("NFC", c) in composed), None)
    if twin is None:
        return ""
    other = composed[unicodedata.normalize("NFC", twin)]
    return f"{ascii(twin)} and {ascii(other)} are one name in two Unicode spellings"


def read_class_names(folder: Path, files: Sequence[str] = NAME_FILES) -> dict[str, str]:
    """``{synset: name}`` from the first of ``files`` in ``folder``, its parent or the top of Kaggle's download."""
    for directory in (folder, folder.parent, *kaggle_download(folder)):
        for name in files:
            path = directory / name
            if path.is_file():
                return read_names_file(path)
    return {}


def read_names_file(path: Path) -> dict[str, str]:
    """``{synset: name}`` of a ``<synset> <name>`` file; text that is not UTF-8, or a second name for a synset,
    is a :class:`UserError` naming the file and line (these names match a net's classes to the data's)."""
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: class names that are not UTF-8 text (at byte {error.start})") from None
    names: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        key, _, value = line.strip().partition("\t" if "\t" in line else " ")
        if not (key and value.strip()):
            continue
        if key in names and names[key] != value.strip():
            raise UserError(f"{path}:{number}: a second name for {key}, {value.strip()!r} (the first, "
                            f"{names[key]!r}, on line {lines[key]})")
        names.setdefault(key, value.strip())
        lines.setdefault(key, number)
    return names


def _has_images(folder: Path) -> bool:
    return any(is_image(Path(f)) for _path, filenames in _walk(folder) for f in filenames)


def require_folder(path: Path, what: str = "data folder") -> Path:
    """``path`` when it is a folder; else a one-line error naming it: a file, or nothing there."""
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what} {path} is a file, not a folder")
    raise MissingFileError(f"{what} {path} does not exist")


SPLITS = ("train", "val", "test")


def is_one_split(root: Path) -> bool:
    """Whether ``root``, which may have a subfolder ``train``, is itself one split of class folders, one of
    them named so (CIFAR-100's ``train``): no other split name, and ``train`` and the other folders of images
    are classes (images, no folders of images, inside) rather than splits (class folders inside). A flat
    ``val/`` is ILSVRC's validation layout, never a class."""
    subfolders = _subfolders(root)
    if [name for name in subfolders if name in SPLITS] != ["train"]:
        return False
    with_images = [root / name for name in subfolders if _has_images(root / name)]
    return len(with_images) > 1 and not any(_class_dirs(folder) for folder in with_images)


def find_split(data_dir: str | Path, split: str) -> Path:
    """The folder holding ``split`` ("train", "val" or "test") of the dataset at ``data_dir``.

    ``DIR/<split>``; for "val" ``DIR/test`` when there is no ``val`` (and vice versa); or ``DIR``
    itself when it is already a split (class folders, one of them maybe named as a split
    (:func:`is_one_split`), or a flat ILSVRC validation folder).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be train, val or test; got {split!r}")
    root = require_folder(Path(data_dir))
    if is_one_split(root):
        return root
    names = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[split]
    for name in names:
        folder = root / name
        if folder.is_dir():
            if not _has_images(folder):
                raise UserError(f"data folder {folder} holds no images")
            return folder
    splits = [n for n in SPLITS if (root / n).is_dir()]
    if splits:
        raise MissingFileError(f"data folder {root} has {', '.join(splits)} but no {' or '.join(names)}")
    if not _has_images(root):
        raise UserError(f"data folder {root} holds no images")
    return root



def split_apart(data_dir: str | Path, role: str, hint: str) -> Path:
    """The validation or test split of the dataset at ``data_dir`` (``find_split(..., "val")``) when it is a folder
    apart from the training images; a folder of class folders alone is both, which is a :class:`UserError`
    calling it the ``role`` split that is missing and giving ``hint``."""
    held = find_split(data_dir, "val")
    if held == find_split(data_dir, "train"):
        raise UserError(f"--data {data_dir}: no {role} split (val/ or test/) beside the training images; {hint}")
    return held

class LabelledImages(Dataset):
    """A labelled image set: ``samples`` of ``(path, label)``, ``classes`` (synset ids) and
    ``class_names``; items are ``(uint8 image, label, path)`` (:meth:`load`, with the generator
    the transform draws from), image ``None`` for an unreadable file (logged as one line naming
    it, once per process) unless ``strict``, which raises :class:`BadImageError`."""

    samples: list[tuple[Path, int]]
    classes: list[str]
    class_names: list[str]

    def __init__(self, transform: Transform, strict: bool) -> None:
        self.transform = transform
        self.strict = strict
        self._sizes: list[tuple[int, int] | None] | None = None

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, generator: torch.Generator | None = None) -> tuple[Tensor | None, int, str]:
        """``(image, label, path)`` of sample ``index``, its transform drawing from ``generator``
        (torch's global RNG when ``None``); the item is whatever the transform returns."""
        path, label = self.samples[index]
        try:
            image = self.transform(path, generator)
        except DECODE_ERRORS as error:
            if self.strict:
                raise BadImageError(unreadable(path, error)) from error
            report_skip(path, error)
            return None, label, str(path)
        return image, label, str(path)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str]:
        return self.load(index)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the samples at ``indices`` (their sizes, if read, with them)."""
        self.samples = [self.samples[i] for i in indices]
        if self._sizes is not None:
            self._sizes = [self._sizes[i] for i in indices]

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """Displayed (w, h) of every sample from its header, read once; ``None`` if unreadable."""
        if self._sizes is None:
            sizes: list[tuple[int, int] | None] = []
            for path, _ in self.samples:
                try:
                    sizes.append(image_size(path))
                except DECODE_ERRORS:
                    sizes.append(None)
            self._sizes = sizes
        return self._sizes


class IndexedImages(LabelledImages):
    """``paths`` as a dataset whose items are labelled by their index (a batch's labels say which images
    it holds); unreadable files are skipped and named, or with ``strict`` an error naming the first."""

    def __init__(self, paths: Sequence[str | Path], transform: Transform | None = None, strict: bool = False) -> None:
        super().__init__(transform, strict=strict)
        self.samples = [(Path(p), i) for i, p in enumerate(paths)]
        self.classes, self.class_names = [], []


class ImageFolder(LabelledImages):
    """A class-per-folder split: ``root/<class>/**/<image>``, classes in sorted folder order.

    ``classes`` are the folder names (synset ids for ImageNet), ``class_names`` their readable
    names from a :data:`NAME_FILES` file beside the split or its parent (else the folder names).
    A class folder without image files is refused, as torchvision's ImageFolder does, unless
    ``allow_empty`` (a validation split may lack some classes' images yet keep their folders).
    """

    def __init__(self, root: str | Path, transform: Transform, strict: bool = False,
                 allow_empty: bool = False) -> None:
        super().__init__(transform, strict)
        self.root = require_folder(Path(root))
        self.classes = _subfolders(self.root)
        if not self.classes:
            raise UserError(f"data folder {self.root} has no class folders")
        loose = [path.name for path in images_in(self.root)]
        if loose:  # they would be left out without a word (a flat folder's images, one class folder beside)
            raise UserError(f"data folder {self.root} holds class folders ({', '.join(self.classes[:3])}) and images "
                            f"of its own ({', '.join(loose[:2])}{', ...' if len(loose) > 2 else ''}), which no "
                            "class would read: move them into their class folders, or the folders out")
        walked: dict[Path, Path] = {}  # shared: no folder is read under two classes
        found = {name: images_under(self.root / name, walked) for name in self.classes}
        if not any(found.values()):
            raise UserError(f"data folder {self.root} holds no images")
        empty = [name for name in self.classes if not found[name]]
        if empty and not allow_empty:
            raise UserError(f"class folder {self.root / empty[0]} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images")
        self.samples = [(path, label) for label, name in enumerate(self.classes) for path in found[name]]
        names = read_class_names(self.root)
        self.class_names = [names.get(c, c) for c in self.classes]
