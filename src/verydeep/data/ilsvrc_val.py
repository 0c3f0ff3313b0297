"""The official ILSVRC-2012 validation layout: a flat folder of images and a ground-truth file (the Kaggle
CSV, the devkit's ids with its ``meta.mat``, or Caffe's ``val.txt``), read into labelled images."""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from verydeep.data.datasets import (
    TEXT_ENCODING,
    LabelledImages,
    Transform,
    images_in,
    kaggle_download,
    read_class_names,
    require_folder,
)
from verydeep.errors import MissingFileError, UserError

#: Files listing exactly the 1000 ILSVRC classes (``words.txt`` names all of WordNet).
CLASS_LIST_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")

#: Tiny ImageNet's validation labels (and boxes): ``<file> <synset> <x0> <y0> <x1> <y1>`` per line, beside
#: the folder ``images/``.
TINY_LABELS = "val_annotations.txt"

#: Ground-truth files of the ILSVRC-2012 validation set, looked for beside the images.
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt", "val.txt", TINY_LABELS)


class ILSVRCValFolder(LabelledImages):
    """The official ILSVRC-2012 validation layout: ``ILSVRC2012_val_XXXXXXXX.JPEG`` in one folder.

    Labels come from ``labels`` or the first of :data:`VAL_LABEL_FILES` in the folder, its parent,
    the devkit's ``data/`` folder or the top of Kaggle's download (above ``ILSVRC/Data/CLS-LOC/val``):

    - ``LOC_val_solution.csv`` (Kaggle): ``ImageId,PredictionString`` with the synset first;
    - ``ILSVRC2012_validation_ground_truth.txt`` (devkit): one ILSVRC2012_ID (1..1000) per image
      in file-name order, mapped to synsets by the devkit's ``meta.mat`` (needs scipy);
    - ``val.txt`` (Caffe): ``<file> <index>``, index into the synset list, which must be sorted (or a synset id);
    - ``val_annotations.txt`` (Tiny ImageNet): ``<file> <synset> <box>``, the box left out.

    A label belongs to the image at its path relative to the folder (the CSV's ImageId without the
    extension), never to one of the same name elsewhere; a second label for one image, a line of
    the wrong shape or an index out of range is refused, naming the file and line.
    Class indices follow the sorted synset ids, as :class:`ImageFolder` on ``train/`` does, so
    the two agree; ``classes``/``class_names`` come from ``LOC_synset_mapping.txt``-style files.
    """

    def __init__(self, root: str | Path, transform: Transform, labels: str | Path | None = None,
                 strict: bool = False, names_from: str | Path | None = None) -> None:
        super().__init__(transform, strict)
        self.root = require_folder(Path(root))
        names_folder = Path(names_from) if names_from is not None else self.root  # and its parent
        label_file = Path(labels) if labels is not None else self._find_labels()
        if label_file.is_dir():
            raise UserError(f"ground-truth file {label_file} is a folder, not a file")
        if not label_file.is_file():
            raise MissingFileError(f"ground-truth file {label_file} does not exist")
        images = images_in(self.root)
        if not images:
            raise UserError(f"data folder {self.root} holds no images")
        listed = read_class_names(names_folder, CLASS_LIST_FILES)  # exactly the dataset's classes
        names = listed or read_class_names(names_folder)
        truth = _read_ground_truth(label_file, images, list(listed))
        truth.refuse_shared_names(images, label_file)
        if listed:
            _refuse_unlisted(label_file, set(truth.synsets.values()) - set(listed), CLASS_LIST_FILES)
        self.classes = sorted(set(listed) | set(truth.synsets.values()))
        self.class_names = [names.get(c, c) for c in self.classes]
        index = {c: i for i, c in enumerate(self.classes)}
        missing = [p.name for p in images if truth.key(p) not in truth.synsets]
        if missing:
            raise UserError(f"{label_file}: no label for {len(missing)} images, e.g. {missing[0]} "
                            f"(labels name an image by its path relative to {self.root})")
        self.samples = [(p, index[truth.synsets[truth.key(p)]]) for p in images]

    def _find_labels(self) -> Path:
        found = ground_truth_file(self.root)
        if found is None:
            raise MissingFileError(
                f"data folder {self.root}: no ground-truth file ({', '.join(VAL_LABEL_FILES)}) beside it"
            )
        return found


def ground_truth_file(root: Path) -> Path | None:
    """The first of :data:`VAL_LABEL_FILES` in the flat folder ``root``, its parent, the devkit's ``data/`` or
    the top of Kaggle's download."""
    for folder in (root, root.parent, root.parent / "ILSVRC2012_devkit_t12" / "data", *kaggle_download(root)):
        for name in VAL_LABEL_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


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


def _read_ground_truth(label_file: Path, images: Sequence[Path], synsets: list[str]) -> _GroundTruth:
    """The labels of any of the supported ground-truth formats (``synsets``: the synset list, in its file's
    order); a file that does not parse is a :class:`UserError` naming it (and the line at fault)."""
    try:
        if label_file.suffix == ".csv":
            return _read_kaggle_csv(label_file)
        text = label_file.read_text(encoding=TEXT_ENCODING)
        lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if lines and all(len(fields) == 1 for _, fields in lines):
            return _read_devkit_ids(label_file, lines, images)
        if label_file.name == TINY_LABELS:  # its boxes are not labels: the file and synset of each line
            lines = [(n, fields[:2]) for n, fields in lines]
        return _read_caffe_list(label_file, lines, synsets)
    except UserError:
        raise
    except (KeyError, IndexError, ValueError, AttributeError, TypeError, csv.Error) as error:
        raise UserError(f"{label_file}: bad ground-truth file ({type(error).__name__}: {error})") from error


def _refuse_unlisted(label_file: Path, unlisted: set[str], lists: Sequence[str]) -> None:
    """A label of a class the dataset's class list does not hold is a :class:`UserError` naming the file and
    the line (the class would otherwise be blamed on the net, as one it lacks)."""
    if not unlisted:
        return
    first = min(unlisted)
    text = label_file.read_text(encoding=TEXT_ENCODING, errors="replace").splitlines()
    number = next((n for n, line in enumerate(text, 1) if first in line.replace(",", " ").split()), None)
    where = f"{label_file}:{number}" if number else str(label_file)
    raise UserError(f"{where}: class {first} is not in the dataset's class list ({' or '.join(lists)})")


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
    with label_file.open(encoding=TEXT_ENCODING, newline="") as f:
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


def _read_caffe_list(label_file: Path, lines: list[tuple[int, list[str]]], listed: list[str]) -> _GroundTruth:
    """Caffe's ``val.txt``: ``<file> <label>`` per line, the label an index into the synset list ``listed``, which
    must then be sorted (as ILSVRC's is: the index means the same in its order and in the sorted classes'), or a
    synset id."""
    synsets: dict[str, str] = {}
    first_lines: dict[str, int] = {}
    in_order = listed == sorted(listed)
    for number, fields in lines:
        where = f"{label_file}:{number}"
        if len(fields) != 2:
            raise UserError(f"{where}: expected '<file> <class index>', got {' '.join(fields)!r}")
        name, label = fields
        if not in_order and not _is_synset(label):
            raise UserError(f"{where}: class index {label} of a synset list ({' or '.join(CLASS_LIST_FILES)}) whose "
                            "synsets are not in sorted order, as ILSVRC's are: its order or the sorted one? Sort the "
                            "list, or label by synset id")
        _add_label(synsets, first_lines, name, _caffe_synset(label, listed, where), where, number)
    return _GroundTruth(synsets)


def _caffe_synset(label: str, listed: list[str], where: str) -> str:
    """The synset a ``val.txt`` label names: an index into the (sorted) synset list ``listed``, or a synset id."""
    if _is_synset(label):
        return label
    if not _INDEX.fullmatch(label):
        raise UserError(f"{where}: a class index must be a whole number from 0, got {label!r}")
    if not listed:
        raise UserError(f"{where}: numeric labels need a synset list (LOC_synset_mapping.txt)")
    if int(label) >= len(listed):
        raise UserError(f"{where}: class index {label} is beyond the {len(listed)} classes of the synset list "
                        f"(0..{len(listed) - 1})")
    return listed[int(label)]


def _devkit_synsets(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's ``meta.mat``."""
    if not meta.is_file():
        raise MissingFileError(f"{meta} (the devkit's synset table) does not exist")
    from scipy.io import loadmat  # scipy ships with scikit-learn
    from scipy.io.matlab import MatReadError

    try:
        rows = loadmat(str(meta), squeeze_me=True)["synsets"]
        table = {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in rows if int(r["num_children"]) == 0}
    except (MatReadError, OSError, KeyError, IndexError, TypeError, ValueError) as error:
        raise UserError(f"{meta}: not the devkit's synset table ({type(error).__name__}: {error})") from None
    if not table:
        raise UserError(f"{meta}: not the devkit's synset table (no synset without children)")
    return table
