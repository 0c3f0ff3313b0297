"""The ``verydeep`` command. Each subcommand lives beside the code it runs (``add_cli`` there).

Every mistake on the command line is one line, ``verydeep CMD: error: MESSAGE``, and exit status
2: argparse's own errors (:class:`OneLineParser`), the argument types of :mod:`verydeep.options`, and the
:class:`UserError` a command raises. ``--help`` prints the full help.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path

from verydeep.errors import UserError
from verydeep.io.atomic import IN_THE_WAY, file_in_the_way
from verydeep.io.download import refuse_unused_weights_dir
from verydeep.io.outputs import refuse_overwriting_inputs, weights_given
from verydeep.options import OneLineParser, one_line, option_names

#: Modules that contribute subcommands, in the order ``verydeep --help`` lists them.
COMMAND_MODULES = ("nn.summary", "data", "train", "paper.plot", "eval.evaluate", "eval.predict", "io.weights",
                   "io.export", "eval.features", "eval.transfer", "paper.reproduce", "paper.demo",
                   "eval.localize.command", "bench.command", "serve")


#: The arguments of the command this process runs, for the reports that record how they were made.
_arguments: list[str] = []


def command_line() -> str:
    """The command being run, as a shell would take it again (``verydeep reproduce --data ...``)."""
    return shlex.join(["verydeep", *_arguments])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="verydeep",
        description="Very Deep Convolutional Networks (Simonyan & Zisserman, ICLR 2015) on PyTorch.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"verydeep.{name}").add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A bad argument, a :class:`UserError` or a file the system refuses is one line and
    exit status 2 (argparse's errors and ``--help`` leave through ``SystemExit``); a reader of the output that
    leaves early (``verydeep summary D | head``) ends the command quietly, with SIGPIPE's status, as it ends other
    tools; anything else is a bug and shows its traceback."""
    try:
        status = _run(argv)
        sys.stdout.flush()  # a short output waits in the buffer: its broken pipe shows here, not at exit
        return status
    except BrokenPipeError:
        try:  # Python flushes stdout once more on exit: into nothing, not into a second error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout of no file (a test's capture)
            pass
        return 128 + 13


def _run(argv: list[str] | None) -> int:
    try:
        parser = build_parser()  # imports every command: seconds, in which a Ctrl-C is as welcome as later
    except KeyboardInterrupt:
        print("verydeep: interrupted", file=sys.stderr)
        return 130
    _arguments[:] = sys.argv[1:] if argv is None else argv
    try:
        args, unknown = parser.parse_known_args(argv)
    except OSError as error:  # a path an option's check could not even look at (a name too long)
        return file_error("verydeep", error)
    prog = vars(args).pop("prog")  # the command's name, not one of its settings
    if unknown:
        parser.exit(2, f"{prog}: error: unrecognized arguments: {one_line(' '.join(unknown))}\n")
    try:
        refuse_overwriting_inputs(args, option_names(parser, args))
        refuse_unused_weights_dir(getattr(args, "weights_dir", None), weights_given(args))
        result = args.func(args)
    except UserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder the system refused (permissions, a file where a folder goes)
        return file_error(prog, error)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def file_error(prog: str, error: OSError) -> int:
    """An error of the system about a named file or folder as one line naming it, exit status 2; any other
    :class:`OSError` is a bug, raised with its traceback."""
    if error.filename is None:
        raise error
    path = Path(os.fsdecode(error.filename))
    blocking = file_in_the_way(path) if isinstance(error, FileExistsError) else None  # mkdir of a folder
    path, reason = (blocking, IN_THE_WAY) if blocking else (path, error.strerror or error)
    print(f"{prog}: error: {one_line(path)}: {one_line(reason)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
