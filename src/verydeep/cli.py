"""The ``verydeep`` command. Each subcommand lives beside the code it runs (``add_cli`` there)."""

from __future__ import annotations

import argparse
import importlib
import sys

from verydeep.errors import UserError

#: Modules that contribute subcommands, in the order ``verydeep --help`` lists them.
COMMAND_MODULES = ("summary", "data", "train", "plot", "evaluate", "predict", "reproduce", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verydeep",
        description="Very Deep Convolutional Networks (Simonyan & Zisserman, ICLR 2015) on PyTorch.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"verydeep.{name}").add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A :class:`UserError` is one line and exit status 2; anything else is a
    bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as error:
        print(f"verydeep {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"verydeep {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
