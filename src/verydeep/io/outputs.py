"""Where a command may write: never over one of its own inputs (a file it reads, a run directory it reads
weights from, a data folder or a split beside it), checked before anything is written, each refusal one
line naming both options."""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from verydeep.data.datasets import is_image
from verydeep.data.preprocess import PREPROCESS_FILE
from verydeep.errors import UserError
from verydeep.io.download import resolve_source
from verydeep.io.rundir import RunDir
from verydeep.options import OutputFile, OutputPath


def _given_paths(value: object) -> list[Path]:
    """The paths an argument's value names (a list's each), as given."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v if isinstance(v, Path) else Path(v) for v in values if isinstance(v, (str, Path)) and v]


#: Options naming a dataset folder that the command reads (``data stats``' positional DIR is ``dir``).
DATA_OPTIONS = ("data", "dir")
#: Options naming weights that the command reads: a file, a run directory or a known name (``convert``'s SOURCE,
#: ``localize``'s --checkpoint and --classifier).
WEIGHTS_OPTIONS = ("weights", "source", "checkpoint", "classifier")
#: Options written to whatever their type: ``train``'s --out, a run directory given as a string.
OUTPUT_OPTIONS = ("out",)


def weights_given(args: argparse.Namespace) -> list[Path]:
    """The sources of weights a command was given (its :data:`WEIGHTS_OPTIONS`' values), as given."""
    return [path for name in WEIGHTS_OPTIONS for path in _given_paths(getattr(args, name, None))]


def _weights_read(source: Path, weights_dir: str | None) -> tuple[Path | None, Path | None]:
    """The weights folder ``source`` names (a run directory), if any, and the file a command reads from ``source``:
    the file itself, a run directory's best (else last) checkpoint, or a known name's file in the weights folder."""
    try:
        path = resolve_source(source, weights_dir)
    except UserError:  # no such file, folder or name: the command says so
        return None, None
    if not path.is_dir():
        return _run_holding(path), path
    return path, RunDir(path).chosen_checkpoint


def _run_holding(file: Path) -> Path | None:
    """The run directory ``file`` lies in (``RUN/model.safetensors``, ``RUN/checkpoints/best.pt``), if any: the
    folder beside it that holds a run's record or checkpoints, or the one whose ``checkpoints/`` holds it."""
    if is_training_run(file.parent):
        return file.parent
    above = RunDir(file.parent.parent)
    return above.root if file.parent.name == above.checkpoints.name else None


def is_training_run(folder: Path) -> bool:
    """Whether ``folder`` is a training run's: its record or its checkpoints are there."""
    run = RunDir(folder)
    return run.record.is_file() or run.checkpoints.is_dir()


#: The split folders of a dataset (``DIR/train``, ``DIR/val``, ``DIR/test``).
SPLIT_FOLDERS = ("train", "val", "test")


def dataset_folders(path: Path) -> list[Path]:
    """The data folder ``path`` and, when it is one split of a dataset (``DIR/train``), the others beside it:
    an output there would change the same dataset's other images."""
    if not path.is_dir():
        return []
    folder = path.resolve()
    if folder.name not in SPLIT_FOLDERS:
        return [path]
    return [path, *(folder.parent / split for split in SPLIT_FOLDERS
                    if split != folder.name and (folder.parent / split).is_dir())]


def _lies_in(folder: Path, path: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, links and ``..`` followed, or as written (a path through a
    class folder linked into the data lies in the data, wherever the link leads)."""
    return (path.resolve().is_relative_to(folder.resolve())
            or Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(folder))))


def _in_data(folder: Path, path: Path, linked: tuple[Path, ...]) -> bool:
    """Whether ``path`` lies in the data folder ``folder`` (:func:`_lies_in`) or in a folder linked into it
    (``linked``: :func:`_linked_targets` of ``folder``), where a file written joins the dataset."""
    return _lies_in(folder, path) or any(path.resolve().is_relative_to(target) for target in linked)


#: How deep in a data folder links to folders are looked for: a dataset's splits, their class folders, and
#: the entries of those (``DIR/train/<class>/<link>``).
LINK_DEPTH = 3


def _linked_targets(folder: Path) -> tuple[Path, ...]:
    """Where the links to folders in ``folder`` lead, down to :data:`LINK_DEPTH` levels (links themselves not
    descended): a dataset's split, class or a folder within one linked to a store elsewhere (a subset of a larger
    set). Read once per data folder and command: for ImageNet, the entries of its class folders."""
    found, level = [], [folder]
    for _ in range(LINK_DEPTH):
        below = []
        for parent in level:
            try:
                entries = list(os.scandir(parent))
            except OSError:
                continue
            for entry in entries:
                if entry.is_symlink():
                    found += [Path(entry.path).resolve()] if entry.is_dir() else []
                elif entry.is_dir(follow_symlinks=False):
                    below.append(Path(entry.path))
        level = below
    return tuple(found)


def dataset_splits(image: Path) -> list[Path]:
    """The split folders (``DIR/train``, ``DIR/val``, ``DIR/test``) of the datasets ``image`` lies in, as named
    and with links resolved (a subset's class folders linked to a store), when it lies in one, in a class folder
    or flat (ILSVRC's validation images), else the folder of class folders it lies in (Caltech-101's layout,
    :func:`class_folders_of`): a file written in any of them is read as an image of that dataset."""
    splits = []
    for path in (image.absolute(), image.resolve()):
        split = next((folder for folder in path.parents if folder.name in SPLIT_FOLDERS), None)
        splits += dataset_folders(split) if split is not None else []
    if not splits:
        splits += [root for root in {class_folders_of(image.absolute()), class_folders_of(image.resolve())} if root]
    return splits


#: How many entries of a folder are looked at to tell whether it holds images.
ENTRIES_LOOKED_AT = 256


def class_folders_of(image: Path) -> Path | None:
    """The folder above ``image``'s folder when its folders, two or more, all hold images: a dataset of class
    folders without splits (Caltech-101's), whose classes an output written anywhere in it would join (a home
    folder, whose other folders hold other things, is none)."""
    root = image.parent.parent
    if root == image.parent:  # an image at the file system's root
        return None
    return root if holds_class_folders(root) else None


def holds_class_folders(root: Path) -> bool:
    """Whether ``root``'s folders, two or more, all hold images (:func:`_holds_images`), as a dataset's classes do."""
    try:
        folders = [Path(entry.path) for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")]
    except OSError:
        return False
    return len(folders) >= 2 and all(map(_holds_images, folders))


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds images as a class folder does: a training run's folder, its curves beside its
    checkpoints, holds none, nor does a folder of the pictures verydeep drew (:func:`drawn_by_verydeep`)."""
    if is_training_run(folder):
        return False
    try:
        with os.scandir(folder) as entries:
            return any(is_image(Path(entry.name)) and not drawn_by_verydeep(Path(entry.path))
                       for entry in itertools.islice(entries, ENTRIES_LOOKED_AT))
    except OSError:
        return False


#: What a picture verydeep draws (a saliency map, boxes on an image) says of its maker, in its PNG ``Software``
#: text: a later call may draw it again, where a dataset's own image is never written over.
DRAWN_BY = "verydeep"


def drawn_by_verydeep(path: Path) -> bool:
    """Whether ``path`` is a PNG whose ``Software`` text says verydeep drew it (:data:`DRAWN_BY`)."""
    if path.suffix.lower() != ".png":
        return False
    try:
        with Image.open(path) as image:
            return str(getattr(image, "text", {}).get("Software", "")).startswith(DRAWN_BY)
    except (OSError, ValueError, SyntaxError):
        return False


def refuse_writing_in_datasets_of(images: Sequence[str | Path], outs: Sequence[Path], option: str) -> None:
    """An output of ``outs`` in a split of the dataset an input image lies in is a :class:`UserError`: it would be
    read as one of that dataset's images (a file) or classes (a folder). Each split is read once, whatever the
    number of its images given."""
    splits: dict[Path, Path] = {}  # each split, and the first image given that lies in it
    for image in map(Path, images):
        for split in dataset_splits(image):
            splits.setdefault(split, image)
    for split, image in splits.items():
        linked = _linked_targets(split)
        for out in outs:
            if _in_data(split, out, linked):
                kind = "a split of the dataset" if split.name in SPLIT_FOLDERS else "the folder of class folders"
                raise UserError(f"{out}: {option} lies in {split}, {kind} of the input image {image}, whose images it "
                                "would join; write it outside the data")


def refuse_overwriting_inputs(args: argparse.Namespace, names: dict[str, str] | None = None) -> None:
    """No command writes over one of its own inputs (``names``: :func:`option_names`, to name the options).
    Before anything is written, each of these is a one-line :class:`UserError` naming both options:

    - an output file that is a file the command reads, given as such or read from weights (a run directory's
      checkpoint, a known name's file in the weights folder);
    - an output, file or folder, among the files of a weights folder given as input (a run directory: in it, its
      ``checkpoints/`` or ``tensorboard/``): its checkpoints, record and exports stay as trained. A folder of
      its own there overwrites nothing and is allowed (``eval --weights runs/D --out runs/D/eval``, ``export ...
      runs/D/export/d.onnx``);
    - an output, file or folder, that is a data folder given as input or lies in one: a file there may replace an
      image, a folder becomes a class. The one file a data folder holds besides its images, its statistics
      ``preprocess.json`` at its top (where ``data stats`` writes it), is allowed;
    - a data folder inside an output folder: a command writes folders of its own naming into its output
      (``checkpoints/``, ``tensorboard/``, a run per net), which could land in the data or be cleared with it.
    """
    name_of = (names or {}).get
    outputs, read, weights_folders, data = [], [], [], []
    for name, value in vars(args).items():
        option = name_of(name, f"--{name.replace('_', '-')}")
        for path in _given_paths(value):
            if isinstance(path, OutputPath) or name in OUTPUT_OPTIONS:
                outputs.append((option, path))
                continue
            folder, file = _weights_read(path, getattr(args, "weights_dir", None)) if name in WEIGHTS_OPTIONS else (
                None, path if path.is_file() else None)
            read += [(option, path, file)] if file else []
            weights_folders += [(f"{option} {path}", folder)] if folder else []
            data += [(option, folder) for folder in dataset_folders(path)] if name in DATA_OPTIONS else []
    linked = {folder: _linked_targets(folder) for _, folder in data} if outputs else {}
    for out_option, out in outputs:
        _refuse_overwriting_what_is_read(out_option, out, read, weights_folders)
        _refuse_replacing_a_runs_files(out_option, out)
        _refuse_writing_in_data(out_option, out, data, linked)
        _refuse_joining_a_dataset(out_option, out)


def _refuse_joining_a_dataset(out_option: str, out: Path) -> None:
    """An output file in a class folder of a dataset's split (``DIR/val/<class>/``), where it would be read as one
    of its images, or an output folder that holds such splits, where the command's own folders would become
    classes, is a :class:`UserError`, whether or not the command reads that dataset. (A folder of folders of images
    without splits may as well be a user's ``runs/`` or ``exports/``: only the data a command reads counts there.)"""
    if isinstance(out, OutputFile):
        root = class_folders_of(out.absolute())
        if root is not None and root.name in SPLIT_FOLDERS:
            raise UserError(f"{out}: {out_option} lies in a class folder of {root}, a dataset whose images it would "
                            "join; write it outside the data")
    elif out.is_dir() and (held := held_dataset(out)) is not None:
        raise UserError(f"{out}: {out_option} holds the dataset {held}, where the command's own folders would "
                        "become classes; give an output folder apart from the data")


def held_dataset(folder: Path) -> Path | None:
    """The split of a dataset ``folder`` is or holds: a ``train``, ``val`` or ``test`` folder whose class folders,
    two or more, all hold images; None if none."""
    splits = [folder] if folder.name in SPLIT_FOLDERS else [folder / split for split in SPLIT_FOLDERS]
    return next((root for root in splits if root.is_dir() and holds_class_folders(root)), None)


def refuse_a_training_run(out: Path, option: str = "--out") -> None:
    """An output folder that is a training run's (its record or checkpoints there) is a :class:`UserError`: the
    command's files would be mixed with the run's, which ``train --resume`` alone continues."""
    if is_training_run(out):
        raise UserError(f"{out}: {option} is a training run's folder, whose files would be mixed with this "
                        "command's; give a folder of its own")


def _refuse_replacing_a_runs_files(out_option: str, out: Path) -> None:
    """An output file that would replace a training run's own file (its record, metrics or exported weights, a
    file in its ``checkpoints/``), read or not by this command, is a :class:`UserError`: the run's files stay as
    trained (``train`` writes its run through ``--out``, a folder; ``plot`` its curves by default)."""
    if not isinstance(out, OutputFile):
        return
    place = out.absolute().parent.resolve() / out.name  # through links to the run or its checkpoints/
    run = _run_holding(place)
    if run is None:
        return
    files = RunDir(run)
    if place.parent == files.checkpoints or out.name in (files.record.name, files.metrics.name, files.model.name):
        raise UserError(f"{out}: {out_option} would replace a file of the training run {run}, whose files stay as "
                        "trained; write it elsewhere")


def _refuse_overwriting_what_is_read(out_option: str, out: Path, read: list[tuple[str, Path, Path]],
                                    weights_folders: list[tuple[str, Path]]) -> None:
    """An output file that is a file read, or an output (file or folder) among the files of a weights folder read
    (a run directory: in it, its ``checkpoints/`` or ``tensorboard/``), is a :class:`UserError`."""
    place = out.resolve().parent if isinstance(out, OutputFile) else out.resolve()
    for given, folder in weights_folders:
        root, *made = (own.resolve() for own in RunDir(folder).own_folders)
        if place == root or any(place.is_relative_to(own) for own in made):
            raise UserError(f"{out}: {out_option} lies in {folder}, the run directory of {given}, which this "
                            "command reads; write it elsewhere (a folder of its own there will do)")
    for option, given, file in read if out.is_file() else []:
        if out.samefile(file):
            reads = "" if file == given else " reads it"
            raise UserError(f"{out}: the output is also an input ({option} {given}{reads}) and {out_option} would "
                            f"overwrite it; give another {out_option}")


def _refuse_writing_in_data(out_option: str, out: Path, data: list[tuple[str, Path]],
                            linked: dict[Path, tuple[Path, ...]]) -> None:
    """An output in a data folder (but its ``preprocess.json``) or a folder linked into it (``linked``), or an
    output folder holding a data folder, is a :class:`UserError`."""
    for option, folder in data:
        if _in_data(folder, out, linked[folder]) and not (isinstance(out, OutputFile) and out.resolve() == (
                folder / PREPROCESS_FILE).resolve()):
            raise UserError(f"{out}: {out_option} lies in {option} {folder}, whose images it would change (a file "
                            f"there may replace one, a folder becomes a class); write it outside the data")
        if not isinstance(out, OutputFile) and _lies_in(out, folder):
            raise UserError(f"{option} {folder} lies in {out_option} {out}, where the command writes folders of "
                            "its own; give an output folder apart from the data")
