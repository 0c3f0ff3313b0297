"""Every command's shared options, declared once (flag, type, default, help, check), and the argument
types that check them: each mistake on the command line is one line naming the option
(:class:`OneLineParser`). The commands' own options sit beside the code they run (``add_cli``).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from verydeep.data.preprocess import PREPROCESS_FILE
from verydeep.errors import UserError
from verydeep.io.download import resolve_source
from verydeep.io.rundir import RunDir
from verydeep.runtime.limits import check_side, check_width, check_workers


def one_line(message: object) -> str:
    """``message`` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(message).split())


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``PROG: error: MESSAGE``, with exit status 2 and
    no usage block. Subcommand parsers are of the parent's class, so every level behaves alike; each
    leaves its ``prog`` in the namespace, the deepest one last, to name the command in later errors."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(prog=self.prog)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


# ---- argument types shared by the subcommands ---------------------------------------------------


def _checked(kind: Callable[[str], float], accept: Callable[[float], bool], description: str) -> Callable[[str], float]:
    """An argument type: ``kind(text)`` if ``accept`` takes it, else a one-line error naming ``description``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {description}; got {text!r}")
        return value

    return parse


#: ``type=`` for a count that must be at least 1 (sizes, epochs, limits).
positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
#: ``type=`` for a count that may be 0 (worker processes).
natural_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
#: ``type=`` for a finite number > 0 (width multipliers).
positive_float = _checked(float, lambda value: math.isfinite(value) and value > 0, "a positive number")
#: The largest seed torch's random generators take.
MAX_SEED = 2**64 - 1
#: ``type=`` for ``--seed``: at least 0, as ``train --seed`` must be, and at most :data:`MAX_SEED`.
seed_number = _checked(int, lambda value: 0 <= value <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")


class OutputPath(type(Path())):  # type: ignore[misc]
    """A path the command writes (an :func:`output_file` or :func:`output_dir` argument)."""


class OutputFile(OutputPath):
    """A file the command writes (an :func:`output_file` argument)."""


def _within(parse: Callable[[str], float], check: Callable[[Any, str], Any], what: str) -> Callable[[str], Any]:
    """An argument type: ``parse(text)``, then ``check(value, what)`` (a bound of :mod:`verydeep.runtime.limits`)."""

    def bounded(text: str) -> int:
        value = parse(text)
        try:
            return check(value, what)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return bounded


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` (which raises :class:`UserError`) as an argument type: its message, not argparse's "invalid
    parse value", follows the option's name."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parsed


#: ``type=`` for ``--workers``: data-loading processes, from 0 to one per CPU core this process may use.
worker_count = _within(natural_int, check_workers, "data-loading processes")
#: ``type=`` for one test scale Q in pixels (``nargs="+"`` options), at most :data:`verydeep.runtime.limits.MAX_SIDE`.
test_scale = _within(positive_int, check_side, "a test scale Q")
#: ``type=`` for an image side in pixels (``--raw-pixels``), at most :data:`verydeep.runtime.limits.MAX_SIDE`.
image_side = _within(positive_int, check_side, "the side")
#: ``type=`` for ``--width``: a multiplier above 0, at most :data:`verydeep.runtime.limits.MAX_WIDTH`.
width_multiplier = _within(positive_float, check_width, "the width multiplier")


def parse_scales(text: str) -> list[int]:
    """``type=`` for ``--scales``: ``256,384,512`` -> [256, 384, 512], each from 1 to
    :data:`verydeep.runtime.limits.MAX_SIDE`; a bad list is a one-line error."""
    try:
        scales = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 256,384,512; got {text!r}"
        ) from None
    if not scales or any(q <= 0 for q in scales):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 256,384,512; got {text!r}")
    if len(set(scales)) < len(scales):
        raise argparse.ArgumentTypeError(f"a scale is listed twice in {text!r}: each is tested once")
    return [test_scale(str(q)) for q in scales]


def output_dir(text: str) -> Path:
    """``type=`` for a folder to write into: absent (it is created) or a folder, not a file."""
    path = OutputPath(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; give a folder")
    return path


def output_file(text: str) -> Path:
    """``type=`` for a file to write: absent or a file (it is replaced), not a folder."""
    path = OutputFile(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name")
    return path


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


def option_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """How the subcommand that parsed ``args`` names each of its options: the first flag (``--weights``), else
    the metavar or the upper-case destination of a positional (``OUT``, ``DIR``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return option_names(action.choices[getattr(args, action.dest)], args)
    return {action.dest: action.option_strings[0] if action.option_strings else action.metavar or action.dest.upper()
            for action in reversed(parser._actions)}


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
    beside, above = RunDir(file.parent), RunDir(file.parent.parent)
    if beside.record.is_file() or beside.checkpoints.is_dir():
        return beside.root
    return above.root if file.parent.name == above.checkpoints.name else None


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


def _contains(folder: Path, path: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it: links and ``..`` followed, or as written (a path through a
    class folder linked into the data lies in the data, wherever the link leads), or under a folder linked into
    ``folder`` (a dataset's class folders linked to a store: a file written in the store joins the class)."""
    absolute, target = Path(os.path.abspath(path)), path.resolve()
    return (target.is_relative_to(folder.resolve()) or absolute.is_relative_to(Path(os.path.abspath(folder)))
            or any(target.is_relative_to(link.resolve()) for link in _linked_folders(folder)))


def _linked_folders(folder: Path) -> list[Path]:
    """The links to folders among ``folder``'s entries and, for its split folders (``train``...), theirs: a
    dataset's splits and class folders, where links to folders elsewhere make a subset of a larger set."""
    def links(parent: Path) -> list[Path]:
        try:
            return [entry for entry in parent.iterdir() if entry.is_symlink() and entry.is_dir()]
        except OSError:
            return []

    found = links(folder) if folder.is_dir() else []
    for split in SPLIT_FOLDERS:
        found += links(folder / split) if (folder / split).is_dir() else []
    return found


def dataset_splits(image: Path) -> list[Path]:
    """The split folders (``DIR/train``, ``DIR/val``, ``DIR/test``) of the datasets ``image`` lies in, as named
    and with links resolved (a subset's class folders linked to a store), when it lies in a class folder of
    one: a file written in any of them is read as an image of that dataset."""
    splits = []
    for path in (image.absolute(), image.resolve()):
        split = next((folder.parent for folder in path.parents if folder.parent.name in SPLIT_FOLDERS), None)
        splits += dataset_folders(split) if split is not None else []
    return splits


def refuse_writing_in_datasets_of(images: Sequence[str | Path], out: Path, option: str) -> None:
    """An output ``out`` in a split of the dataset an input image lies in is a :class:`UserError`: it would be
    read as one of that dataset's images (a file) or classes (a folder)."""
    for image in map(Path, images):
        for split in dataset_splits(image):
            if _contains(split, out):
                raise UserError(f"{out}: {option} lies in {split}, a split of the dataset of the input image {image}, "
                                "whose images it would join; write it outside the data")


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
    for out_option, out in outputs:
        _refuse_overwriting_what_is_read(out_option, out, read, weights_folders)
        _refuse_writing_in_data(out_option, out, data)


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


def _refuse_writing_in_data(out_option: str, out: Path, data: list[tuple[str, Path]]) -> None:
    """An output in a data folder (but its ``preprocess.json``), or an output folder holding one, is a
    :class:`UserError`."""
    for option, folder in data:
        if _contains(folder, out) and not (isinstance(out, OutputFile) and out.resolve() == (
                folder / PREPROCESS_FILE).resolve()):
            raise UserError(f"{out}: {out_option} lies in {option} {folder}, whose images it would change (a file "
                            f"there may replace one, a folder becomes a class); write it outside the data")
        if not isinstance(out, OutputFile) and _contains(out, folder):
            raise UserError(f"{option} {folder} lies in {out_option} {out}, where the command writes folders of "
                            "its own; give an output folder apart from the data")


def device_name(text: str) -> str:
    """``type=`` for ``--device``: auto, or a device torch knows (cpu, cuda, cuda:N, ...)."""
    import torch

    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N; got {text!r}") from None
    return text


# ---- options that several commands take, each declared here once --------------------------------

DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"
PRECISIONS = ("auto", "bf16", "fp32")
PRECISION_HELP = "auto: bf16 where it is fast on this machine (measured once and cached), else fp32"
WORKERS_HELP = "data-loading processes, at most the CPU cores (default: the cores less one, at most 8)"
WEIGHTS_HELP = ("torchvision .pth, Caffe .caffemodel, Keras .h5, .weights.h5 or .keras, a verydeep checkpoint, run "
                "directory or .safetensors, or a known name such as vgg16 (found in --weights-dir)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)


def add_workers(p: argparse.ArgumentParser, default: int | None = None, help: str = WORKERS_HELP) -> None:
    p.add_argument("--workers", type=worker_count, default=default, help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: ``args.progress`` False, no progress bar (for logs and scripts)."""
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


class StoreOnce(argparse.Action):
    """An option given at most once: a second value is an error, never a silent replacement."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): this command "
                         "takes one net")
        setattr(namespace, self.dest, values)


def add_weights(p: argparse.ArgumentParser, repeat: str | None = None) -> None:
    """``--weights SOURCE``, with ``--checkpoint`` the same option, and ``--weights-dir DIR``; with
    ``repeat`` (what several nets do: fuse, stack) ``--weights`` may be given several times, else once."""
    action = "append" if repeat else StoreOnce
    p.add_argument("--weights", action=action, default=None, metavar="SOURCE",
                   help=WEIGHTS_HELP + (f"; repeat to {repeat}" if repeat else ""))
    p.add_argument("--checkpoint", action=action, dest="weights", metavar="SOURCE", help="the same as --weights")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="where known names such as vgg16 are found (default $VERYDEEP_WEIGHTS_DIR, else "
                        "~/.cache/verydeep)")
