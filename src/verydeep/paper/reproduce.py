"""The paper's experiments (Sec. 4, Tables 3-6) reproduced at a scale the machine allows.

Every size of the paper is multiplied by one factor, ``crop / 224``: on CIFAR-10 (crop 32) the
training scales S = 256, 384 and [256, 512] become 36, 54 and [36, 73], the test offsets S +- 32
become S +- 5. Under the paper's protocol (Sec. 3.1) net A starts from random weights, the deeper
nets from A's first four convs and three FC layers, the S = 384 nets from the S = 256 ones and the
jittered nets from the S = 384 ones; under ``scratch`` every net starts from random weights. Every
net has the same width, schedule and epoch bound (a net fine-tuned at another S its own); the nets are
trained one after another, each in its own run directory, so an interrupted reproduction resumes where
it stopped. The output is the
paper's Tables 3 to 6 with our figures beside the paper's, the paper's claims each judged by a
paired test on the same test images (with the spread over seeds), plots, and ``REPRODUCTION.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from verydeep.errors import UserError
from verydeep.io.atomic import atomic_write
from verydeep.io.jsonable import to_json_dict
from verydeep.io.outputs import is_training_run, refuse_a_training_run, refuse_overwriting_inputs
from verydeep.options import (
    add_device,
    add_progress,
    add_workers,
    argument_type,
    input_path,
    output_dir,
    positive_int,
    width_multiplier,
)
from verydeep.paper.claims import Claim, claims
from verydeep.paper.measure import fusions
from verydeep.paper.presets import NETS, PRESETS, PROTOCOLS, Preset, within_budget
from verydeep.paper.reproduction_plots import plot
from verydeep.paper.reproduction_report import NetRecord, PaperTable, net_record, paper_tables, report_markdown
from verydeep.paper.train_nets import shard_of, train_and_measure
from verydeep.train.recipe import parse_milestones


@dataclass
class Reproduction:
    """A reproduction's outcome: its preset, Tables 3 to 6, the claims checked, the time spent
    (training, evaluation) and ``REPRODUCTION.md``'s text."""

    preset: str
    settings: Preset
    tables: dict[str, PaperTable]
    claims: list[Claim]
    nets: list[NetRecord]
    seconds: dict[str, float]
    markdown: str

    def to_dict(self) -> dict[str, Any]:
        """``results.json``: every field; each table as its rows, its rendered headers and cells, and markdown."""
        tables = {title: {"rows": [to_json_dict(row) for row in t.rows], "table": t.table.to_dict(),
                          "markdown": t.markdown} for title, t in self.tables.items()}
        return {**to_json_dict(replace(self, tables={})), "tables": tables}


def reproduce(data: Path, preset: Preset, preset_name: str, out: Path, device: str = "auto",
              progress: bool = True, command: str = "") -> Reproduction:
    """Train every net of ``preset`` (nets already in ``out``, for instance from ``--shard`` processes, are
    read back when trained with these settings and data, else refused before anything is written),
    evaluate each with the paper's protocols, fuse, report."""
    order = preset.members()
    nets = sorted(order, key=lambda n: ([m.name for m in NETS].index(n.base), n.seed))  # the tables' order
    done = train_and_measure(order, preset, data, out, device, progress)
    held = {path.name for path in (out / "nets").glob("[!.]*") if is_training_run(path)}  # no .ipynb_checkpoints
    others = sorted(held - {n.name for n in nets})
    if others:  # an earlier run's nets (a fuller --nets or --seeds): this report is of the nets asked for alone
        print(f"warning: {out / 'nets'} holds nets not asked for now, left out of the report: {', '.join(others)} "
              "(--nets names a net, --seeds K reports its seeds -s1 to -s(K-1))", file=sys.stderr)
    measured = done.measured + fusions(done.measured, nets)
    tables = paper_tables(measured, nets, preset)
    checked = claims(measured, nets, preset)
    trained = [net_record(net, done.run_dirs[net.name], measured, preset) for net in nets]  # read before any write
    plot(done.run_dirs, measured, nets, preset, out)
    markdown = report_markdown(preset_name, preset, data, tables, checked, trained, done.seconds, device, command)
    atomic_write(out / "REPRODUCTION.md", lambda tmp: Path(tmp).write_text(markdown))
    result = Reproduction(preset_name, preset, tables, checked, trained, done.seconds, markdown)
    text = json.dumps(result.to_dict(), indent=1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    return result


def shard(value: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N."""
    part, _, parts = value.partition("/")
    if not (part.isdigit() and parts.isdigit() and 1 <= int(part) <= int(parts)):
        raise argparse.ArgumentTypeError(f"must be K/N with 1 <= K <= N (e.g. 1/2); got {value!r}")
    return int(part), int(parts)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reproduce", help="the paper's ablations (Tables 3-6) at a scale this machine allows")
    p.add_argument("--data", required=True, type=input_path, help="dataset root with train/ and val/ (or test/)")
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--out", type=output_dir, default=None, help="output directory (default runs/reproduce-PRESET)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="paper: each net from its parent as in Sec. 3.1 (default); scratch: every net from random "
                        "weights")
    p.add_argument("--budget", type=positive_int, default=None,
                   help="at most this many epochs per net trained from random weights or warm-started (a net "
                        "fine-tuned at another S: --finetune-budget)")
    p.add_argument("--finetune-budget", type=positive_int, default=None,
                   help="at most this many epochs for a net fine-tuned from its own configuration (S = 384, jittered)")
    p.add_argument("--stop-patience", type=positive_int, default=None,
                   help="stop a net when validation has not improved for N epochs")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="train the nets that decide the depth claim (A, D) this many times, with different seeds")
    p.add_argument("--width", type=width_multiplier, default=None, help="width multiplier of every net")
    p.add_argument("--val-split", type=positive_int, default=None,
                   help="validate on N class-balanced training images held out by each net's seed, instead of test "
                        "images (the test images then decide nothing)")
    p.add_argument("--milestones", type=argument_type(parse_milestones), default=None,
                   help="a fixed schedule: lr / 10 after each of these comma-separated epochs, instead of the "
                        "plateau rule")
    p.add_argument("--shard", type=shard, default=None,
                   help="K/N: train and evaluate only the nets whose seed is K-1 modulo N, without the report; run "
                        "N such processes side by side into one --out, then the same command without --shard")
    p.add_argument("--nets", default=None, help=f"comma-separated subset of {','.join(n.name for n in NETS)} "
                                                "(under --protocol paper their parents are trained too)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="train on at most N images, a class-balanced subset")
    p.add_argument("--limit-test", type=positive_int, default=None,
                   help="test on at most N images (2 at least: the paired test), a class-balanced subset")
    add_workers(p)
    add_device(p)
    add_progress(p)
    p.set_defaults(func=run_cli)


def refuse_idle_options(args: argparse.Namespace, preset: Preset) -> None:
    """``--seeds`` when no net trained is one the seeds repeat, and ``--finetune-budget`` when no net is fine-tuned
    from its own configuration, would do nothing: each is refused in one line."""
    nets = replace(preset, seeds=1).members()
    by_name = {net.name: net for net in NETS}
    if args.seeds is not None and args.seeds > 1 and not any(net.name in preset.seeded for net in nets):
        raise UserError(f"--seeds {args.seeds}: repeats only {', '.join(preset.seeded)}, none of the nets trained "
                        f"({', '.join(net.name for net in nets)}); add one to --nets or drop --seeds")
    if args.finetune_budget is not None and not any(preset.fine_tuned(net, by_name) for net in nets):
        raise UserError(f"--finetune-budget: no net trained ({', '.join(net.name for net in nets)}) is fine-tuned from "
                        f"its own configuration under --protocol {preset.protocol}; drop it")


def run_cli(args: argparse.Namespace) -> None:
    changes = {"epochs": args.budget, "finetune_epochs": args.finetune_budget, "stop_patience": args.stop_patience,
               "seeds": args.seeds, "protocol": args.protocol, "width": args.width, "batch_size": args.batch_size,
               "limit_train": args.limit_train, "limit_test": args.limit_test, "workers": args.workers,
               "val_split": args.val_split, "milestones": args.milestones and tuple(args.milestones)}
    preset = replace(PRESETS[args.preset], **{k: v for k, v in changes.items() if v is not None})
    if preset.val_split is not None:
        preset = replace(preset, limit_val=None)  # the held-out training images are the validation set
    if args.stop_patience is not None and args.stop_patience >= preset.epochs:  # a validation an epoch
        raise UserError(f"--stop-patience {args.stop_patience}: a net validates {preset.epochs} time(s) (--budget "
                        f"{preset.epochs}), so it could never stop early; lower it or raise --budget")
    preset = within_budget(preset)  # the preset's own, beyond a short budget
    if preset.milestones and max(preset.milestones) >= preset.epochs:
        shown = ",".join(map(str, preset.milestones))
        given = f"--milestones {shown}" if args.milestones else f"--preset {args.preset}'s milestones {shown}"
        raise UserError(f"{given}: each must be below the epoch budget {preset.epochs} (--budget)"
                        + ("" if args.milestones else "; raise --budget, or give --milestones"))
    if args.nets is not None:
        named = [n.strip() for n in args.nets.split(",") if n.strip()]
        wanted = tuple(dict.fromkeys(named))
        if len(wanted) < len(named):
            raise UserError(f"--nets {args.nets}: a net is listed twice; each is trained once")
        unknown = [n for n in wanted if n not in {net.name for net in NETS}]
        if unknown or not wanted:
            named = f"unknown {', '.join(unknown)}" if unknown else "no net named"
            raise UserError(f"--nets: {named}; choose from {', '.join(n.name for n in NETS)}")
        preset = replace(preset, nets=wanted)
    refuse_idle_options(args, preset)
    out = args.out or output_dir(f"runs/reproduce-{args.preset}")
    refuse_overwriting_inputs(argparse.Namespace(data=args.data, out=out))  # the default --out, checked too
    refuse_a_training_run(out)
    if args.shard is not None:
        part, parts = args.shard
        done = train_and_measure(shard_of(preset, part, parts), preset, Path(args.data), out, args.device,
                                 args.progress)
        print(f"shard {part}/{parts}: trained and evaluated {', '.join(done.run_dirs) or 'no net'} in {out}; "
              "the same command without --shard writes the report")
        return
    from verydeep.cli import command_line  # the command line's module imports this one

    result = reproduce(Path(args.data), preset, args.preset, out, args.device, args.progress, command_line())
    print(result.markdown)
