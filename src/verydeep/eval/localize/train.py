"""``localize train`` (Appendix A): fine-tune a classification net to regress boxes, through
:func:`verydeep.train.train` with the :class:`~verydeep.eval.localize.task.Localisation` task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from verydeep import runtime
from verydeep.errors import UserError
from verydeep.eval.localize.task import Localisation
from verydeep.train import train
from verydeep.train.recipe import make_config, settings_from_flags, stored_settings

#: Appendix A's fine-tuning settings, below a recipe's and the flags': configuration D, lr 1e-3.
PAPER_DEFAULTS = {"config": "D", "lr": 1e-3}


def run_train(args: argparse.Namespace) -> None:
    """``localize train``: :func:`verydeep.train.train` with the :class:`Localisation` task; the boxes it
    read go into the run record (a resumed run reads them again unless ``--boxes`` is given)."""

    given = {key: value for key, value in vars(args).items() if key not in ("command", "action", "func", "head",
                                                                             "boxes", "targets")}
    settings = {**({} if given.get("resume") else PAPER_DEFAULTS), **settings_from_flags(given)}
    resumed = given["out"] if given.get("resume") and given.get("out") else None
    stored = stored_settings(resumed) if resumed else {}
    head = getattr(args, "head", None) or str(stored.get("task", "")).removeprefix("localisation-") or "pcr"
    trained_with = str(stored.get("box_targets", "raw"))  # runs older than --targets regressed the raw code
    targets = getattr(args, "targets", None) or (trained_with if resumed else "standardised")
    if resumed and targets != trained_with:
        raise UserError(f"--targets {targets}: {resumed} was trained with {trained_with} targets; "
                        "start a new run to change them")
    cfg = make_config(settings)
    explicit = set(settings_from_flags(given))  # not PAPER_DEFAULTS: --weights decide what the user left open
    recorded = stored.get("boxes") if stored.get("boxes") and Path(stored["boxes"]).exists() else None
    task = Localisation(head, getattr(args, "boxes", None) or recorded, targets, stored.get("box_code_mean"),
                        stored.get("box_code_std"))
    summary = train(cfg, task=task, given=explicit)
    if runtime.Processes.from_env().main:
        print(json.dumps(summary.to_dict()))
