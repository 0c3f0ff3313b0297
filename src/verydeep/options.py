"""Every command's shared options, declared once (flag, type, default, help, check), and the argument
types that check them: each mistake on the command line is one line naming the option
(:class:`OneLineParser`). The commands' own options sit beside the code they run (``add_cli``).
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator
import os
import sys
from collections.abc import Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, NoReturn

from verydeep.errors import UserError
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

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        args = sys.argv[1:] if args is None else list(args)
        self._refuse_repeats(args)
        return super().parse_known_args(args, namespace)

    def _refuse_repeats(self, args: Sequence[str]) -> None:
        """An option of one value given twice (a switch, or one and its ``--no-`` form, too) is an error: argparse would
        keep the last silently. (Options that gather their values, such as ``--weights``, append; a subcommand's parser
        checks its own.)"""
        seen: dict[argparse.Action, str] = {}
        for token in args:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            action = self._option_action(name) if name.startswith("--") else None
            # a switch (--json) too; --x and --no-x alike
            if isinstance(action, argparse._StoreAction | argparse._StoreConstAction | argparse.BooleanOptionalAction):
                if action in seen:
                    self.error(f"{seen[action]} is given twice; give it once")
                seen[action] = "/".join(action.option_strings) if isinstance(action, argparse.BooleanOptionalAction) \
                    else max(action.option_strings, key=len)  # its full name, however abbreviated

    def _option_action(self, name: str) -> argparse.Action | None:
        """The action of a long option as argparse reads it: its whole name, or a prefix only it has."""
        if name in self._option_string_actions:
            return self._option_string_actions[name]
        found = {a for s, a in self._option_string_actions.items() if s.startswith(name)} if self.allow_abbrev else ()
        return next(iter(found)) if len(found) == 1 else None


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
#: The most random splits `transfer --splits` takes: each trains an SVM per class and C (more would run for days).
MAX_SPLITS = 1000
#: ``type=`` for ``--splits``.
split_count = _checked(int, lambda value: 1 <= value <= MAX_SPLITS, f"an integer from 1 to {MAX_SPLITS}")
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


def refuse_repeated(values: Sequence[Any], text: str, what: str, why: str) -> None:
    """For a comma-separated list option's ``type=``: a value listed twice is an error (``what`` it is, ``why``
    once is what counts), not a value silently taken once or twice."""
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{what} is listed twice in {text!r}: {why}")


# ---- a Python caller's arguments, checked as the flags that give them are --------------------------------


def listed(value: Any, name: str) -> list[Any]:
    """``value`` (a list, tuple, array or other ordered sequence) as a list; one value where a sequence of them
    is expected (a text, a path, a number) is a :class:`TypeError` naming ``name``, not a string split into
    its characters; so is a set or mapping, whose order is not the caller's."""
    single = isinstance(value, (str, bytes, bytearray, memoryview, os.PathLike, numbers.Number)) or (
        hasattr(value, "ndim") and value.ndim == 0)  # a numpy or torch scalar
    if single:
        raise TypeError(f"{name}: expected a list, got the single {type(value).__name__} {value!r}; give "
                        f"[{value!r}]")
    if isinstance(value, (Set, Mapping)):
        raise TypeError(f"{name}: expected an ordered list, got a {type(value).__name__}")
    return list(value)


def whole(value: Any, name: str) -> int:
    """``value`` as an ``int`` when it is a whole number (a numpy or torch integer too); else a
    :class:`UserError` naming ``name``."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise UserError(f"{name} must be a whole number; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise UserError(f"{name} must be a whole number; got {value!r}") from None


def whole_scales(scales: Sequence[Any] | None, name: str = "--scales") -> list[int] | None:
    """A Python caller's test scales as ints (None: each net's own); an empty list is a :class:`UserError`."""
    if scales is None:
        return None
    checked = [whole(q, name) for q in listed(scales, name)]
    if not checked:
        raise UserError(f"{name}: give at least one scale, or None for each net's own")
    return checked


def parse_scales(text: str) -> list[int]:
    """``type=`` for ``--scales``: ``256,384,512`` -> [256, 384, 512], each from 1 to
    :data:`verydeep.runtime.limits.MAX_SIDE`; a bad list is a one-line error."""
    try:
        scales = [int(s) for s in text.split(",")]  # an empty entry (256,,384) too is refused
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 256,384,512; got {text!r}"
        ) from None
    if not scales or any(q <= 0 for q in scales):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 256,384,512; got {text!r}")
    refuse_repeated(scales, text, "a scale", "each is tested once")
    return [test_scale(str(q)) for q in scales]


def input_path(text: str) -> str:
    """``type=`` for a file or folder to read: an empty value, which the system would take for the working folder,
    names none."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return text


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


def option_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """How the subcommand that parsed ``args`` names each of its options: the first flag (``--weights``), else
    the metavar or the upper-case destination of a positional (``OUT``, ``DIR``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return option_names(action.choices[getattr(args, action.dest)], args)
    return {action.dest: action.option_strings[0] if action.option_strings else action.metavar or action.dest.upper()
            for action in reversed(parser._actions)}


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
