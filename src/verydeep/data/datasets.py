"""Datasets in the layouts ImageNet comes in, the collate that drops bad files, and size grouping.

- :class:`ImageFolder`: ``split/<class>/<image>`` (ImageNet ``train/``, the re-organised ``val/``).
- :class:`ILSVRCValFolder`: the official ILSVRC-2012 validation layout, a flat folder of images
  plus a ground-truth file.
- :func:`collate`: stacks uint8 images, drops and names the files that could not be read.
- :class:`SizeGroupedBatchSampler`: batches of images that share their size after the
  Sec. 3.2 rescale to Q, so dense evaluation can run on whole images.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler, get_worker_info

from verydeep.data.decode import image_size
from verydeep.data.transforms import resized_size
from verydeep.errors import MissingFileError, UserError

log = logging.getLogger("verydeep.data")

#: File name endings read as images (case-insensitive). Hidden files (``._x.jpg``) are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

#: Files that name the classes: ``<synset> <name>`` per line, beside the split or its parent.
NAME_FILES = ("classes.txt", "words.txt", "LOC_synset_mapping.txt", "synset_words.txt")

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
    file was read from)."""
    reason = " ".join(_OBJECT_REPR.sub("", str(error)).split())
    return f"{path}: unreadable image ({type(error).__name__}: {reason})"


def report_skip(path: str | Path, error: BaseException) -> None:
    """Log a skipped image as one line naming it, the first time this process skips it."""
    if str(path) not in _reported:
        _reported.add(str(path))
        log.warning("skipped %s", unreadable(path, error))


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, its file names)`` for ``folder`` and every folder below it, links followed, hidden ones
    left out, in sorted order. A linked folder that leads back to one above it or to one walked already is
    a :class:`UserError` naming the link: its images would be counted again, under this folder's class."""
    walked = {folder.resolve(): folder}  # each folder read, by its real path, as first named
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            path, real = Path(dirpath) / name, (Path(dirpath) / name).resolve()
            first = walked.get(real) or next((named for seen, named in walked.items() if real in seen.parents), None)
            if first is not None:
                raise UserError(f"{path}: the folder {real} is read as {first} too, or holds it (a link leads there "
                                "twice, so its images would be counted twice); remove the link")
            walked[real] = path
        yield Path(dirpath), sorted(filenames)


def _images_under(folder: Path) -> list[Path]:
    return [path / f for path, filenames in _walk(folder) for f in filenames if is_image(Path(f))]


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def read_class_names(folder: Path, files: Sequence[str] = NAME_FILES) -> dict[str, str]:
    """``{synset: name}`` from the first of ``files`` in ``folder`` or its parent."""
    for directory in (folder, folder.parent):
        for name in files:
            path = directory / name
            if path.is_file():
                names = {}
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    key, _, value = line.strip().partition("\t" if "\t" in line else " ")
                    if key and value:
                        names[key] = value.strip()
                return names
    return {}


def _has_images(folder: Path) -> bool:
    return any(is_image(Path(f)) for _path, filenames in _walk(folder) for f in filenames)


def require_folder(path: Path, what: str = "data folder") -> Path:
    """``path`` when it is a folder; else a one-line error naming it: a file, or nothing there."""
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what} {path} is a file, not a folder")
    raise MissingFileError(f"{what} {path} does not exist")


def find_split(data_dir: str | Path, split: str) -> Path:
    """The folder holding ``split`` ("train", "val" or "test") of the dataset at ``data_dir``.

    ``DIR/<split>``; for "val" ``DIR/test`` when there is no ``val`` (and vice versa); or ``DIR``
    itself when it is already a split (class folders, or a flat ILSVRC validation folder).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test; got {split!r}")
    root = require_folder(Path(data_dir))
    names = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[split]
    for name in names:
        folder = root / name
        if folder.is_dir():
            if not _has_images(folder):
                raise UserError(f"data folder {folder} holds no images")
            return folder
    splits = [n for n in ("train", "val", "test") if (root / n).is_dir()]
    if splits:
        raise MissingFileError(f"data folder {root} has {', '.join(splits)} but no {' or '.join(names)}")
    if not _has_images(root):
        raise UserError(f"data folder {root} holds no images")
    return root


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
        self.classes = _class_dirs(self.root)
        if not self.classes:
            raise UserError(f"data folder {self.root} has no class folders")
        found = {name: _images_under(self.root / name) for name in self.classes}
        if not any(found.values()):
            raise UserError(f"data folder {self.root} holds no images")
        empty = [name for name in self.classes if not found[name]]
        if empty and not allow_empty:
            raise UserError(f"class folder {self.root / empty[0]} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images")
        self.samples = [(path, label) for label, name in enumerate(self.classes) for path in found[name]]
        names = read_class_names(self.root)
        self.class_names = [names.get(c, c) for c in self.classes]


#: Files listing exactly the 1000 ILSVRC classes (``words.txt`` names all of WordNet).
CLASS_LIST_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")

#: Ground-truth files of the ILSVRC-2012 validation set, looked for beside the images.
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt", "val.txt")


class ILSVRCValFolder(LabelledImages):
    """The official ILSVRC-2012 validation layout: ``ILSVRC2012_val_XXXXXXXX.JPEG`` in one folder.

    Labels come from ``labels`` or the first of :data:`VAL_LABEL_FILES` in the folder, its parent
    or the devkit's ``data/`` folder:

    - ``LOC_val_solution.csv`` (Kaggle): ``ImageId,PredictionString`` with the synset first;
    - ``ILSVRC2012_validation_ground_truth.txt`` (devkit): one ILSVRC2012_ID (1..1000) per image
      in file-name order, mapped to synsets by the devkit's ``meta.mat`` (needs scipy);
    - ``val.txt`` (Caffe): ``<file> <index>``, index into the sorted synsets (or a synset id).

    A label belongs to the image at its path relative to the folder (the CSV's ImageId without the
    extension), never to one of the same name elsewhere; a second label for one image, a line of
    the wrong shape or an index out of range is refused, naming the file and line.
    Class indices follow the sorted synset ids, as :class:`ImageFolder` on ``train/`` does, so
    the two agree; ``classes``/``class_names`` come from ``LOC_synset_mapping.txt``-style files.
    """

    def __init__(self, root: str | Path, transform: Transform, labels: str | Path | None = None,
                 strict: bool = False) -> None:
        super().__init__(transform, strict)
        self.root = require_folder(Path(root))
        label_file = Path(labels) if labels is not None else self._find_labels()
        if label_file.is_dir():
            raise UserError(f"ground-truth file {label_file} is a folder, not a file")
        if not label_file.is_file():
            raise MissingFileError(f"ground-truth file {label_file} does not exist")
        images = sorted(p for p in self.root.iterdir() if is_image(p))
        if not images:
            raise UserError(f"data folder {self.root} holds no images")
        listed = read_class_names(self.root, CLASS_LIST_FILES)  # exactly the dataset's classes
        names = listed or read_class_names(self.root)
        truth = _read_ground_truth(label_file, images, sorted(listed))
        truth.refuse_shared_names(images, label_file)
        self.classes = sorted(set(listed) | set(truth.synsets.values()))
        self.class_names = [names.get(c, c) for c in self.classes]
        index = {c: i for i, c in enumerate(self.classes)}
        missing = [p.name for p in images if truth.key(p) not in truth.synsets]
        if missing:
            raise UserError(f"{label_file}: no label for {len(missing)} images, e.g. {missing[0]} "
                            f"(labels name an image by its path relative to {self.root})")
        self.samples = [(p, index[truth.synsets[truth.key(p)]]) for p in images]

    def _find_labels(self) -> Path:
        folders = [self.root, self.root.parent, self.root.parent / "ILSVRC2012_devkit_t12" / "data"]
        for folder in folders:
            for name in VAL_LABEL_FILES:
                if (folder / name).is_file():
                    return folder / name
        raise MissingFileError(
            f"data folder {self.root}: no ground-truth file ({', '.join(VAL_LABEL_FILES)}) beside it"
        )


class _GroundTruth(NamedTuple):
    """A ground-truth file read: ``synsets`` by the image's path relative to the folder, without
    its extension where ``stems`` (the Kaggle CSV's ImageId)."""

    synsets: dict[str, str]
    stems: bool = False

    def key(self, image: Path) -> str:
        """How the file names ``image``, an image of the flat folder."""
        return image.stem if self.stems else image.name

    def refuse_shared_names(self, images: Sequence[Path], label_file: Path) -> None:
        """Two images the file would name alike (``a.jpg`` and ``a.png`` by the CSV's ImageId ``a``) are refused:
        which one a label is of cannot be told."""
        counts = Counter(self.key(image) for image in images)
        shared = [image.name for image in images if counts[self.key(image)] > 1]
        if shared:
            raise UserError(f"{label_file}: names images without their extension, which {shared[0]} and {shared[1]} "
                            "share; keep one image of each name in the folder")


#: A class index as a ground-truth file writes it: decimal digits only (no sign, point or underscore).
_INDEX = re.compile(r"[0-9]+")

#: A synset id as a ground-truth file writes it (WordNet's ``n01440764``): a letter first.
_SYNSET = re.compile(r"[A-Za-z]\S*")


def _read_ground_truth(label_file: Path, images: Sequence[Path], sorted_synsets: list[str]) -> _GroundTruth:
    """The labels of any of the supported ground-truth formats; a file that does not parse is a
    :class:`UserError` naming it (and the line at fault)."""
    try:
        if label_file.suffix == ".csv":
            return _read_kaggle_csv(label_file)
        lines = [(n, line.split()) for n, line in enumerate(label_file.read_text().splitlines(), 1) if line.strip()]
        if lines and all(len(fields) == 1 for _, fields in lines):
            return _read_devkit_ids(label_file, lines, images)
        return _read_caffe_list(label_file, lines, sorted_synsets)
    except UserError:
        raise
    except (KeyError, IndexError, ValueError, AttributeError, TypeError, csv.Error) as error:
        raise UserError(f"{label_file}: bad ground-truth file ({type(error).__name__}: {error})") from error


def _relative_name(name: str) -> str:
    """A path as a ground-truth file writes it, in one spelling (``./a.jpg`` is ``a.jpg``)."""
    return PurePosixPath(name).as_posix()


def _add_label(synsets: dict[str, str], first_lines: dict[str, int], name: str, synset: str, where: str,
               line: int) -> None:
    """Record ``synset`` as the label of ``name``; a second label for it is refused."""
    key = _relative_name(name)
    if key in first_lines:
        raise UserError(f"{where}: a second label for {name} (the first on line {first_lines[key]})")
    synsets[key], first_lines[key] = synset, line


def _is_synset(label: str) -> bool:
    """Whether ``label`` reads as a synset id: a letter first, and not a number (``nan``, ``inf``)."""
    try:
        float(label)
    except ValueError:
        return bool(_SYNSET.fullmatch(label))
    return False


def _read_kaggle_csv(label_file: Path) -> _GroundTruth:
    """``LOC_val_solution.csv``: ``ImageId,PredictionString``, the image's synset first in the string."""
    synsets: dict[str, str] = {}
    first_lines: dict[str, int] = {}
    with label_file.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if not {"ImageId", "PredictionString"} <= set(header):
            raise UserError(f"{label_file}: bad ground-truth file (no ImageId,PredictionString header)")
        for row in reader:
            if not row:
                continue
            where = f"{label_file}:{reader.line_num}"
            if len(row) != len(header):
                raise UserError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
            fields = dict(zip(header, row, strict=True))
            predictions = fields["PredictionString"].split()
            if not predictions or not _is_synset(predictions[0]):
                raise UserError(f"{where}: PredictionString must start with a synset id, "
                                f"got {fields['PredictionString']!r}")
            _add_label(synsets, first_lines, fields["ImageId"], predictions[0], where, reader.line_num)
    return _GroundTruth(synsets, stems=True)


def _read_devkit_ids(label_file: Path, lines: list[tuple[int, list[str]]], images: Sequence[Path]) -> _GroundTruth:
    """``ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012_ID per image in file-name order."""
    meta = label_file.parent / "meta.mat"
    id_to_synset = _devkit_synsets(meta)
    if len(lines) != len(images):
        raise UserError(f"{label_file}: {len(lines)} labels for {len(images)} images")
    synsets = {}
    for image, (number, (text,)) in zip(images, lines, strict=True):
        if not (_INDEX.fullmatch(text) and int(text) in id_to_synset):
            raise UserError(f"{label_file}:{number}: expected an ILSVRC2012_ID of {meta}'s "
                            f"{len(id_to_synset)} classes, got {text!r}")
        synsets[image.name] = id_to_synset[int(text)]
    return _GroundTruth(synsets)


def _read_caffe_list(label_file: Path, lines: list[tuple[int, list[str]]], sorted_synsets: list[str]) -> _GroundTruth:
    """Caffe's ``val.txt``: ``<file> <label>`` per line, the label an index into ``sorted_synsets``
    or a synset id."""
    synsets: dict[str, str] = {}
    first_lines: dict[str, int] = {}
    for number, fields in lines:
        where = f"{label_file}:{number}"
        if len(fields) != 2:
            raise UserError(f"{where}: expected '<file> <class index>', got {' '.join(fields)!r}")
        name, label = fields
        _add_label(synsets, first_lines, name, _caffe_synset(label, sorted_synsets, where), where, number)
    return _GroundTruth(synsets)


def _caffe_synset(label: str, sorted_synsets: list[str], where: str) -> str:
    """The synset a ``val.txt`` label names: an index into ``sorted_synsets``, or a synset id itself."""
    if _is_synset(label):
        return label
    if not _INDEX.fullmatch(label):
        raise UserError(f"{where}: a class index must be a whole number from 0, got {label!r}")
    if not sorted_synsets:
        raise UserError(f"{where}: numeric labels need a synset list (LOC_synset_mapping.txt)")
    if int(label) >= len(sorted_synsets):
        raise UserError(f"{where}: class index {label} is beyond the {len(sorted_synsets)} classes of the synset list "
                        f"(0..{len(sorted_synsets) - 1})")
    return sorted_synsets[int(label)]


def _devkit_synsets(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's ``meta.mat``."""
    if not meta.is_file():
        raise MissingFileError(f"{meta} (the devkit's synset table) does not exist")
    from scipy.io import loadmat  # scipy ships with scikit-learn

    rows = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in rows if int(r["num_children"]) == 0}


def open_split(folder: str | Path, transform: Transform, strict: bool = False) -> LabelledImages:
    """:class:`ImageFolder` for class folders, else :class:`ILSVRCValFolder` (flat images + labels); the
    split read for validation, evaluation or statistics, so a class folder without images is allowed."""
    folder = Path(folder)
    if folder.is_dir() and _class_dirs(folder):
        return ImageFolder(folder, transform, strict, allow_empty=True)
    return ILSVRCValFolder(folder, transform, strict=strict)


class Boxed(NamedTuple):
    """An image with its object boxes (Appendix A): ``boxes`` (k, 4) and the image's own extent
    ``frame`` (4,), corners in pixels of the (cropped) ``image``."""

    image: Tensor
    boxes: Tensor
    frame: Tensor


class Batch(NamedTuple):
    """A collated batch: uint8 images (N, 3, H, W) channels_last, int64 labels, skipped paths; for
    :class:`Boxed` items also ``boxes`` (N, M, 4), padded with NaN rows, and ``frames`` (N, 4)."""

    images: Tensor
    labels: Tensor
    skipped: list[str]
    boxes: Tensor | None = None
    frames: Tensor | None = None


def batch_memory(shape: Sequence[int]) -> Tensor:
    """An uninitialised uint8 tensor for a batch: in a DataLoader worker, straight in shared
    memory, which the batch goes through anyway (as ``default_collate`` does; ``share_memory_``
    would copy it there, costing as much as the collation)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(tuple(shape))


def nhwc_shape(images: Sequence[Tensor]) -> tuple[int, int, int, int]:
    """(N, h, w, channels) of images (channels, h, w) of one size, which a batch holds; a ValueError where two
    sizes differ."""
    shape = images[0].shape
    for image in images:
        if image.shape != shape:
            raise ValueError(f"images of sizes {tuple(shape)} and {tuple(image.shape)} in one batch")
    return len(images), shape[1], shape[2], shape[0]


def stack_images(images: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """uint8 (3, h, w) images of one size as (N, 3, h, w), channels_last: a plain copy of their
    HWC memory, on ``device`` (``None``: :func:`batch_memory`); no images: (0, 3, 0, 0)."""
    if not images:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=device)
    nhwc = nhwc_shape(images)
    out = batch_memory(nhwc) if device is None else torch.empty(nhwc, dtype=torch.uint8, device=device)
    torch.stack([image.permute(1, 2, 0) for image in images], out=out)
    return out.permute(0, 3, 1, 2)


def collate(batch: Sequence[tuple[Tensor | None, int, str]]) -> Batch:
    """Stack ``(image, label, path)`` samples; unreadable ones (image ``None``) are dropped and named.

    All images must share one size (use :class:`SizeGroupedBatchSampler` for whole images). The
    batch is channels_last, as the model wants it; an all-bad batch has zero images.
    """
    good = [(img, label) for img, label, _ in batch if img is not None]
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    skipped = [path for img, _, path in batch if img is None]
    boxed = [img for img, _ in good if isinstance(img, Boxed)]
    if not boxed:
        return Batch(stack_images([img for img, _ in good]), labels, skipped)
    most = max(len(item.boxes) for item in boxed)
    boxes = torch.full((len(boxed), most, 4), math.nan)
    for row, item in zip(boxes, boxed, strict=True):
        row[: len(item.boxes)] = item.boxes
    frames = torch.stack([item.frame for item in boxed])
    return Batch(stack_images([item.image for item in boxed]), labels, skipped, boxes, frames)


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices whose images share one size after the rescale to Q (Sec. 3.2).

    Sizes come from the image headers, read once per dataset. Groups appear in the order of
    their first image, indices ascending within a group; unreadable images form their own
    group (their samples come out as skipped).
    """

    def __init__(self, dataset: LabelledImages, q: int, batch_size: int) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1; got {batch_size}")
        groups: dict[tuple[int, int] | None, list[int]] = {}
        for index, size in enumerate(dataset.image_sizes()):
            key = resized_size(size, q) if size is not None else None
            groups.setdefault(key, []).append(index)
        self.batches = [
            indices[i : i + batch_size] for indices in groups.values() for i in range(0, len(indices), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def balanced_subset(targets: Sequence[int], limit: int | None) -> list[int]:
    """``limit`` indices taken round-robin over the classes in folder order (deterministic, class-balanced)."""
    if limit is None or limit >= len(targets):
        return list(range(len(targets)))
    if limit <= 0:
        raise UserError(f"--limit must be positive; got {limit}")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return sorted(chosen)


def carve_validation(targets: Sequence[int], count: int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (training, validation): ``count`` validation indices drawn class-balanced
    (round-robin over the classes, each class's images in an order shuffled by ``seed``), the rest
    for training. The same targets and seed always give the same split."""
    if count <= 0 or count >= len(targets):
        raise UserError(f"--val-split must be between 1 and {len(targets) - 1} (the training images less one); "
                        f"got {count}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    queues = [[by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in sorted(by_class)]
    held: list[int] = []
    depth = 0
    while len(held) < count:
        held += [queue[depth] for queue in queues if depth < len(queue)][: count - len(held)]
        depth += 1
    kept = set(held)
    return [i for i in range(len(targets)) if i not in kept], sorted(held)
