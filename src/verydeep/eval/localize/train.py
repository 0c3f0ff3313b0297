"""``localize train`` (Appendix A): fine-tune a classification net to regress boxes, through
:func:`verydeep.train.train` with the :class:`~verydeep.eval.localize.task.Localisation` task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from verydeep.errors import MissingFileError, UserError
from verydeep.eval.localize.task import Localisation, recorded_box_code, recorded_head, recorded_targets
from verydeep.io.checkpoint import check_recipe
from verydeep.runtime.processes import Processes
from verydeep.train import train
from verydeep.train.recipe import make_config, settings_from_flags, stored_settings, stored_settings_file

#: Appendix A's fine-tuning settings, below a recipe's and the flags': configuration D, lr 1e-3.
PAPER_DEFAULTS = {"config": "D", "lr": 1e-3}


def same_boxes(given: Path, recorded: Path) -> bool:
    """Whether ``--boxes`` on resume names the run's own boxes: the same file or folder, or a copy of its file."""
    if given.resolve() == recorded.resolve():
        return True
    return given.is_file() and recorded.is_file() and given.read_bytes() == recorded.read_bytes()


def run_train(args: argparse.Namespace) -> None:
    """``localize train``: :func:`verydeep.train.train` with the :class:`Localisation` task; the boxes it
    read go into the run record (a resumed run reads them again unless ``--boxes`` is given)."""

    given = {key: value for key, value in vars(args).items() if key not in ("command", "action", "func", "head",
                                                                             "boxes", "targets")}
    flagged = settings_from_flags(given)
    settings = {**({} if given.get("resume") else PAPER_DEFAULTS), **flagged}
    resumed = given["out"] if given.get("resume") and given.get("out") else None
    stored = stored_settings(resumed) if resumed else {}
    where = stored_settings_file(resumed) if stored else None
    if where:
        check_recipe(stored, where)  # the run record is the checkpoints' recipe: its values are checked alike
    head = getattr(args, "head", None) or (recorded_head(stored, where) if where else "pcr")
    trained_with = recorded_targets(stored, where) if where else "raw"  # older runs regressed the raw code
    targets = getattr(args, "targets", None) or (trained_with if resumed else "standardised")
    if resumed and targets != trained_with:
        raise UserError(f"--targets {targets}: {resumed} was trained with {trained_with} targets; "
                        "start a new run to change them")
    cfg = make_config(settings)
    explicit = set(flagged)  # not PAPER_DEFAULTS: --weights decide what the user left open
    recorded = stored.get("boxes") if stored.get("boxes") and Path(stored["boxes"]).exists() else None
    if stored.get("boxes") and not recorded and not getattr(args, "boxes", None):  # not the data's default boxes
        raise MissingFileError(f"--resume: {resumed} was trained on the boxes of {stored['boxes']}, which are gone; "
                               "give --boxes with that file where it is now")
    if recorded and getattr(args, "boxes", None) and not same_boxes(Path(args.boxes), Path(recorded)):
        raise UserError(f"--boxes {args.boxes}: {resumed} was trained on the boxes of {recorded}, which are still "
                        "there; drop --boxes (it is for a boxes file that has moved), or start a new run")
    code = recorded_box_code(stored, where) if where else (None, None)
    task = Localisation(head, getattr(args, "boxes", None) or recorded, targets, *code, seed=cfg.seed)
    summary = train(cfg, task=task, given=explicit)
    if Processes.from_env().main:
        print(json.dumps(summary.to_dict()))
