"""``verydeep train``: its flags come from :class:`~verydeep.train.recipe.TrainConfig`'s fields."""

from __future__ import annotations

import argparse
import json

from verydeep.runtime.processes import Processes
from verydeep.train.recipe import add_flags, make_config, recipe_names, setting_origins, settings_from_flags
from verydeep.train.trainer import train


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train a VGG (Sec. 3.1): SGD, plateau schedule, checkpoints, DDP under torchrun",
        description="Train a VGG. Settings: the paper's defaults, then --recipe's (shipped: "
                    f"{', '.join(recipe_names())}), then these flags; with --resume the run's own first. "
                    "Under torchrun (RANK/WORLD_SIZE set) the global batch is split over the processes.",
    )
    add_flags(p)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    given = {key: value for key, value in vars(args).items() if key not in ("command", "func")}
    settings = settings_from_flags(given)
    summary = train(make_config(settings), given=setting_origins(given, settings))
    if Processes.from_env().main:
        print(json.dumps(summary.to_dict()))
