"""The ``localize`` command (Appendix A): its parser (``train``, ``eval``, ``predict``) and ``localize
eval``, protocol 1 (Table 8) or 2 (Table 9) as a table or one JSON line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from verydeep.errors import UserError
from verydeep.eval.localize.center import center_json, evaluate_center, table_8
from verydeep.eval.localize.dense import evaluate_dense, table_9
from verydeep.eval.localize.predict import run_predict
from verydeep.eval.localize.task import HEADS, TARGETS, eval_boxes
from verydeep.eval.localize.train import PAPER_DEFAULTS, run_train
from verydeep.options import add_device, add_progress, add_workers, input_path, output_dir, parse_scales, positive_int
from verydeep.runtime import sharding
from verydeep.runtime.processes import loader_workers
from verydeep.train.recipe import add_flags


def fine_tuned_labels(given: Sequence[str] | None, nets: int) -> list[str | None]:
    """``--fine-tuned`` per net: once for all of them or once per ``--checkpoint`` (None: not given)."""
    labels: list[str | None] = list(given or [None])
    if len(labels) == 1:
        return labels * nets
    if len(labels) != nets:
        raise UserError(f"--fine-tuned given {len(labels)} times for {nets} --checkpoint: give it once, or once each")
    return labels


def run_eval(args: argparse.Namespace) -> None:
    """``localize eval``: protocol 1 (``center``, a Table 8 row per net) or 2 (``dense``, the union of the
    nets' boxes, Table 9); a table, or one JSON line. Under ``torchrun`` the processes share the images and
    the first prints."""
    with sharding.process_group(args.device) as procs:
        payload, text = eval_tables(args)
    if procs.main:
        print(json.dumps(payload) if args.json else text)


def eval_tables(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``localize eval``'s JSON object and its table (Table 8 or 9), each naming the boxes file used (one
    for all the nets: :func:`~verydeep.eval.localize.task.eval_boxes`)."""
    if args.protocol != "dense" and (args.classifier is not None or args.scales):
        flag = "--classifier" if args.classifier is not None else "--scales"
        raise UserError(f"{flag} is for --protocol dense (protocol 1 reads the central crop at the training scale, "
                        "for the ground-truth class): drop it, or give --protocol dense")
    if args.protocol == "dense" and args.fine_tuned:
        raise UserError("--fine-tuned labels Table 8's rows (--protocol center); Table 9 (dense) has no such "
                        "column: drop it, or give --protocol center")
    workers = loader_workers(args.workers)
    boxes = eval_boxes(args.boxes, args.data, args.checkpoint)
    if args.protocol == "dense":
        result = evaluate_dense(args.checkpoint, args.classifier, args.data, boxes, args.scales, args.limit,
                                args.device, args.batch_size, workers, args.progress)
        payload, text = result.to_dict(), table_9(result).markdown("###")
    else:
        labels = fine_tuned_labels(args.fine_tuned, len(args.checkpoint))
        results = [evaluate_center(checkpoint, args.data, boxes, args.limit, args.batch_size, args.device,
                                   workers, label, args.progress)
                   for checkpoint, label in zip(args.checkpoint, labels, strict=True)]
        payload, text = center_json(results), table_8(results).markdown("###")
    return {**payload, "boxes": str(boxes.absolute())}, f"{text}\n\nBoxes: {boxes.absolute()}"


def add_cli(subparsers: argparse._SubParsersAction) -> None:

    p = subparsers.add_parser("localize", help="localisation (Appendix A): box regression nets and their error",
                              description="Train a box regression net, measure its localisation error, draw its boxes.")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", argument_default=argparse.SUPPRESS,
                           help="fine-tune a net to regress boxes (train's flags; lr 1e-3, configuration D)")
    add_flags(t, PAPER_DEFAULTS)
    t.add_argument("--boxes", help="boxes: a text file, a LOC_*_solution.csv, or a folder of XML annotations "
                                   "(default DIR/boxes.txt, else Tiny ImageNet's own files in DIR; with --resume "
                                   "the run's own); recorded in recipe.json")
    t.add_argument("--head", choices=HEADS, help="single-class or per-class regression (default pcr)")
    t.add_argument("--targets", choices=TARGETS, help="FC8 regresses the box code standardised by the mean and "
                                                      "deviation of the training crops' codes (default) or the raw "
                                                      "code")
    t.set_defaults(func=run_train)
    e = actions.add_parser("eval", help="the localisation error: protocol 1 (center, Table 8) or 2 (dense, Table 9)")
    e.add_argument("--checkpoint", "--weights", dest="checkpoint", action="append", required=True,
                   help="a localisation run (or checkpoint); again for several nets: protocol dense pools their "
                        "boxes (the union, Appendix A) before merging, protocol center gives each net a Table 8 row "
                        "(the JSON's localisation_error is then the first net's, and 'nets' holds each net's)")
    e.add_argument("--classifier", help="the classification run that ranks the classes (protocol dense)")
    e.add_argument("--data", required=True, type=input_path, help="dataset folder with train/ and val/")
    e.add_argument("--boxes", help="boxes file or folder (default DIR/boxes.txt or Tiny ImageNet's own, else the "
                                   "boxes the first "
                                   "--checkpoint's run was trained on, from its recipe.json, when they are of "
                                   "DIR: under it, or read for it); named in the output")
    e.add_argument("--protocol", choices=("center", "dense"), default="center")
    e.add_argument("--scales", type=parse_scales, help="test scales Q, comma-separated (dense; default the training S)")
    e.add_argument("--fine-tuned", choices=("all", "fc"), action="append",
                   help="Table 8's label of the layers fine-tuned (protocol center; in the table and the JSON): "
                        "the net's recipe says it (--freeze features: fc, no --freeze: all), and a label it "
                        "contradicts is refused; for weights that do not say, once for all nets or once per "
                        "--checkpoint (default all)")
    e.add_argument("--limit", type=positive_int, help="at most this many validation images, class-balanced")
    e.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward pass (dense: images of the same size batched together)")
    add_workers(e)
    add_device(e)
    e.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (localisation_error, whole_image_error, "
                        "centre_prior_error, ...)")
    add_progress(e)
    e.set_defaults(func=run_eval)
    r = actions.add_parser("predict", help="draw protocol 2's top (class, box) predictions of images")
    r.add_argument("images", nargs="+", type=input_path, help="image files")
    r.add_argument("--checkpoint", action="append", required=True,
                   help="a localisation run (or checkpoint); again for several nets, their boxes pooled (the union)")
    r.add_argument("--classifier", required=True, help="the classification run that ranks the classes")
    r.add_argument("--scales", type=parse_scales, help="test scales Q, comma-separated (default the training S)")
    r.add_argument("--top", type=positive_int, default=5, help="predictions per image")
    r.add_argument("--out", type=output_dir, required=True, help="folder for the drawn PNGs")
    add_workers(r)
    add_device(r)
    r.set_defaults(func=run_predict)
