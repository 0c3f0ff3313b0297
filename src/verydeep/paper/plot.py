"""Learning curves of a training run (``verydeep plot RUN_DIR``) from its ``metrics.jsonl``.

Three panels against the SGD step: the training loss (each step, and each epoch's mean), the
validation error (top-1/top-5, as the paper reports it, Sec. 4; a localisation run's localisation error,
Appendix A) and the learning rate, whose
divisions by 10 mark the plateaus of Sec. 3.1. :func:`error_bars` draws a report's test errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verydeep.errors import MissingFileError, UserError
from verydeep.io.atomic import atomic_write
from verydeep.io.rundir import RunDir
from verydeep.options import input_path, output_file
from verydeep.runtime.limits import is_finite, is_whole

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _count(value: Any) -> bool:
    return is_whole(value) and value >= 1


#: The fields the curves read from a record of each kind: a check of each value and what it must be.
FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "step": {"epoch": (_count, "a positive integer"), "step": (_count, "a positive integer"),
             "loss": (lambda v: is_finite(v) and v >= 0, "a finite number >= 0"),
             "lr": (lambda v: is_finite(v) and v > 0, "a finite number > 0")},
    "epoch": {"epoch": (_count, "a positive integer"), "step": (_count, "a positive integer"),
              "train_loss": (lambda v: is_finite(v) and v >= 0, "a finite number >= 0")},
}
#: Validation figures of an epoch record, in % (absent or null in an epoch not validated): each one's label and
#: whether it is an accuracy, drawn as its error (the paper reports error, Sec. 4).
VALIDATION = {"val_top1": ("top-1", True), "val_top5": ("top-5", True), "val_loc_error": ("localisation", False)}
#: The loss a run minimises, known by its validation figure (a classifier's, or a localisation run's).
LOSSES = {"val_top1": "cross-entropy", "val_loc_error": "Euclidean (box code)"}


#: What a report of finished runs (``reproduce``) reads of an epoch record besides :data:`FIELDS`' (``train`` writes
#: every one): its learning rate and its seconds.
REPORTED = {"lr": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
            "seconds": (lambda v: is_finite(v) and v >= 0, "a finite number >= 0")}
Checks = dict[str, tuple[Callable[[Any], bool], str]]


def check_record(record: Any, where: str, epoch_fields: Checks | None = None) -> dict[str, Any]:
    """``record`` (line ``where`` of a metrics.jsonl) if it holds the fields the curves read (an epoch's
    ``epoch_fields`` too), in range."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a JSON object but {type(record).__name__} {record!r:.40}")
    kind = record.get("kind")
    if kind not in FIELDS:
        raise UserError(f'{where}: "kind" must be "step" or "epoch", not {kind!r:.40}')
    for field, (valid, description) in {**FIELDS[kind], **(epoch_fields or {} if kind == "epoch" else {})}.items():
        if field not in record:
            raise UserError(f'{where}: the {kind} record has no "{field}"')
        if not valid(record[field]):
            raise UserError(f'{where}: "{field}" must be {description}, not {record[field]!r:.40}')
    for field in VALIDATION if kind == "epoch" else ():
        value = record.get(field)
        if value is not None and not (is_finite(value) and 0 <= value <= 100):
            raise UserError(f'{where}: "{field}" must be a figure in % from 0 to 100 or null, not {value!r:.40}')
    return record


def read_metrics(run_dir: str | Path, epoch_fields: Checks | None = None,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The step and epoch records of ``RUN_DIR/metrics.jsonl``, each checked (:func:`check_record`, an epoch's
    ``epoch_fields`` too), their steps and epochs rising as one run writes them."""
    path = RunDir(run_dir).metrics
    if Path(run_dir).is_file():
        raise UserError(f"{run_dir} is a file; give a run directory written by verydeep train")
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (is {run_dir} a training run directory?)")
    records = []
    data = path.read_bytes()
    lines = data.splitlines()
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            try:
                record = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark an editor wrote, left out
            except UnicodeDecodeError as error:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line)") from None
            except ValueError as error:  # not JSON, or an integer of thousands of digits
                if number == len(lines) and not data.endswith(b"\n"):  # a last record cut short by a crash
                    print(f"warning: {path}:{number}: a damaged record (cut short by a crash?) was left out",
                          file=sys.stderr)
                    continue
                raise UserError(f"{path}:{number}: not a JSON record ({getattr(error, 'msg', error)})") from error
            records.append((number, check_record(record, f"{path}:{number}", epoch_fields)))
    refuse_going_back(path, records)
    steps = [r for _, r in records if r["kind"] == "step"]
    epochs = [r for _, r in records if r["kind"] == "epoch"]
    if not steps:
        raise UserError(f"{path} holds no step records yet")
    return steps, epochs


def refuse_going_back(path: Path, numbered: list[tuple[int, dict[str, Any]]]) -> None:
    """A step record whose step, or an epoch record whose epoch, is not past the one before it is a
    :class:`UserError` naming its line: one run's log counts them up (a resume first cuts what the checkpoint
    lacks), so the file mixes runs, or repeats one."""
    last = {"step": 0, "epoch": 0}
    for number, record in numbered:
        key = record["kind"]  # a step record counts steps, an epoch record epochs
        if record[key] <= last[key]:
            raise UserError(f"{path}:{number}: {key} {record[key]} follows {key} {last[key]}: the log mixes runs "
                            "or repeats one (a copy, or files joined?)")
        last[key] = record[key]


def checked_output(out: Path) -> Path:
    """``out`` if matplotlib can write an image of its suffix's format by itself (PGF needs a LaTeX install)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf"}
    if out.suffix[1:].lower() not in formats:
        raise UserError(f"--out {out}: not an image format matplotlib writes; give a file ending in "
                        f"{', '.join('.' + name for name in sorted(formats))}")
    return out


def refuse_run_files(out: Path, run: RunDir) -> Path:
    """``out`` unless it is (through links too) one of the files the curves are drawn from, the run's weights, or in
    its ``checkpoints/`` or ``tensorboard/``; else a :class:`UserError`."""
    target = out.resolve()
    read = [path.resolve() for path in (run.metrics, run.record, run.model)]
    if target in read or any(target.is_relative_to(folder.resolve()) for folder in (run.checkpoints, run.tensorboard)):
        raise UserError(f"--out {out}: would write over {run.root}'s own files (its metrics, record, weights or "
                        "checkpoints); give another --out")
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the learning curves of ``run_dir`` as an image (default ``RUN_DIR/curves.png``; another format
    by ``out``'s suffix)."""
    out = checked_output(refuse_run_files(Path(out), RunDir(run_dir))) if out is not None else RunDir(run_dir).curves
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    steps, epochs = read_metrics(run_dir)
    fig, (loss_ax, err_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    fig.suptitle(f"{Path(run_dir).resolve().name}: {len(epochs)} epochs, {steps[-1]['step']} steps")

    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.5, label="step")
    if epochs:
        loss_ax.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="epoch mean")
    loss_ax.set(title="training loss", xlabel="step", ylabel=loss_name(epochs))
    loss_ax.legend()
    draw_validation(err_ax, epochs)

    lr_ax.step([r["step"] for r in steps], [r["lr"] for r in steps], where="post")
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr", yscale="log")

    for ax in (loss_ax, err_ax, lr_ax):
        ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format=out.suffix[1:].lower()))  # a link to it stays whole
    plt.close(fig)
    return out


def loss_name(epochs: Sequence[dict[str, Any]]) -> str:
    """The loss the run minimises, known by the validation figure its epoch records hold (``loss`` before any)."""
    return next((name for key, name in LOSSES.items() if any(key in r for r in epochs)), "loss")


def draw_validation(ax: Any, epochs: Sequence[dict[str, Any]]) -> None:
    """The validation errors of the epochs validated, each figure of :data:`VALIDATION` the run logged; or a
    note that none was."""
    ax.set(title="validation error", xlabel="step", ylabel="error (%)")
    for key, (label, accuracy) in VALIDATION.items():
        validated = [r for r in epochs if r.get(key) is not None]
        if validated:
            errors = [100.0 - r[key] if accuracy else r[key] for r in validated]
            ax.plot([r["step"] for r in validated], errors, "o-", label=label)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "not validated yet", ha="center", va="center", transform=ax.transAxes)


def error_bars(groups: Sequence[tuple[str, dict[str, float]]], series: Sequence[str], title: str) -> Figure:
    """Grouped bars of errors (%): a group per label, in it a bar per series it has (in ``series``' order and
    colours), each labelled with its value, on a y axis from zero, so that bars' lengths compare as the
    errors do (Sec. 4's tables, drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [name for name in series if any(name in values for _, values in groups)]
    bars = sum(len(values) for _, values in groups)
    fig = Figure(figsize=(3 + max(4.0, 0.25 * bars + 0.3 * len(groups)), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(shown))
    for k, name in enumerate(shown):
        placed = [(i + (k - (len(shown) - 1) / 2) * width, values[name])
                  for i, (_, values) in enumerate(groups) if name in values]
        bars = ax.bar([x for x, _ in placed], [v for _, v in placed], width, label=name, color=f"C{series.index(name)}")
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2, rotation=90 if len(shown) > 2 else 0)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], rotation=30, ha="right")
    margin = 0.5 + max(0.0, (3 - len(groups)) / 2)  # a group or two keep the bars' width of three
    ax.set_xlim(-margin, len(groups) - 1 + margin)
    ax.set_ylim(0, 1.15 * max((v for _, values in groups for v in values.values()), default=1.0))
    ax.set(ylabel="top-1 test error %", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="learning curves of a training run (loss, validation error, lr): "
                              "PNG, or any format matplotlib writes")
    p.add_argument("run_dir", type=input_path, help="a run directory written by verydeep train")
    p.add_argument("--out", type=output_file, default=None, help="image file to write, its format by its suffix "
                   "(.png, .pdf, .svg ...; default RUN_DIR/curves.png)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    print(plot_run(args.run_dir, args.out))
