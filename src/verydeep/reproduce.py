"""The paper's experiments (Sec. 4, Tables 3-6) reproduced at a scale the machine allows.

Every size of the paper is multiplied by one factor, ``crop / 224``: on CIFAR-10 (crop 32) the
training scales S = 256, 384 and [256, 512] become 36, 54 and [36, 73], the test offsets S +- 32
become S +- 4. Every net gets the same budget (epochs, schedule, width); the nets are trained one
after another, each in its own run directory, so an interrupted reproduction resumes where it
stopped. The output is the paper's Tables 3 to 6 with our figures beside the paper's, a table of
the paper's claims saying whether each held at this scale, plots, and ``REPRODUCTION.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from verydeep import report
from verydeep.cli import device_name, natural_int, output_dir, positive_float, positive_int
from verydeep.errors import UserError
from verydeep.evaluate import EvalRow, PaperFigures
from verydeep.paper import PaperNet, scale_text, single_test_scale
from verydeep.plot import read_metrics
from verydeep.recipe import TrainConfig
from verydeep.report import Column, Row, Table


@dataclass(frozen=True)
class Net:
    """One net of the reproduction: a configuration and its training scale (paper's pixels)."""

    name: str
    config: str
    scale: tuple[int, int]  # at the paper's 224-pixel crop

    @property
    def jittered(self) -> bool:
        return self.scale[0] != self.scale[1]

    @property
    def paper_net(self) -> PaperNet:
        """The paper's net of this configuration and training scale, whose figures ours stand beside."""
        return PaperNet.trained_at(self.config, *self.scale)


#: The ablations: depth (A, B, D, E), LRN (A-LRN), 1x1 vs 3x3 (C vs D), fixed vs jittered S,
#: and the two jittered nets whose fusion is Table 6.
NETS = (
    Net("A", "A", (256, 256)),
    Net("A-LRN", "A-LRN", (256, 256)),
    Net("B", "B", (256, 256)),
    Net("C", "C", (256, 256)),
    Net("D", "D", (256, 256)),
    Net("E", "E", (256, 256)),
    Net("D-jitter", "D", (256, 512)),
    Net("E-jitter", "E", (256, 512)),
)


@dataclass(frozen=True)
class Preset:
    """Sizes and budget of a reproduction; every paper size is scaled by ``crop / 224``."""

    crop: int
    width: float
    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    init: str = "he"
    nets: tuple[str, ...] = tuple(n.name for n in NETS)
    limit_train: int | None = None
    limit_test: int | None = None
    workers: int = 2
    patience: int = 2  # the paper's rule: lr / 10 when validation top-1 stops improving, at most 3 times
    fixed_protocols: tuple[str, ...] = ("dense",)  # jittered nets always get dense, multi-crop and both

    def scale(self, paper: tuple[int, int]) -> tuple[int, int]:
        """A training scale of the paper (224-pixel crops) at this preset's crop."""
        factor = self.crop / 224
        return (math.floor(paper[0] * factor), math.floor(paper[1] * factor))

    def train_config(self, net: Net, data: Path, run_dir: Path, device: str, progress: bool) -> TrainConfig:
        """``net``'s training settings: the paper's (TrainConfig's defaults), overridden by every field of
        this preset that is also a training setting (crop, width, epochs, batch size, lr, ...)."""
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)}
        return replace(TrainConfig(), **{name: getattr(self, name) for name in shared}, data=str(data),
                       out=str(run_dir), config=net.config, scale=self.scale(net.scale), limit_val=self.limit_test,
                       device=device, progress=progress, resume=(run_dir / "checkpoints" / "last.pt").is_file())


PRESETS: dict[str, Preset] = {
    "cifar10": Preset(crop=32, width=0.5, epochs=20,
                      nets=("D-jitter", "E-jitter", "A", "A-LRN", "B", "C", "D", "E")),
    "imagenette": Preset(crop=112, width=0.25, epochs=30, batch_size=64),
    # the demo: 8x8 digits lose too much under S in [36, 73], so one net A at S = 36, all protocols
    "digits": Preset(crop=32, width=0.25, epochs=12, batch_size=32, nets=("A",),
                     fixed_protocols=("dense", "multicrop", "dense+multicrop")),
}


def train_net(net: Net, preset: Preset, data: Path, out: Path, device: str, progress: bool) -> Path:
    """Train one net unless it is done (an interrupted run resumes); returns its run directory."""
    from verydeep.train import train

    run_dir = out / "nets" / net.name
    done = run_dir / "train_summary.json"
    if not done.is_file():
        summary = train(preset.train_config(net, data, run_dir, device, progress))
        done.write_text(json.dumps(summary.to_dict(), indent=1))
    return run_dir


def evaluate_nets(run_dirs: dict[str, Path], data: Path, protocols: tuple[str, ...], limit: int | None,
                  out: Path, device: str, progress: bool) -> list[EvalRow]:
    """Evaluate these nets together (each at its recipe's scales; fused when several); cached in ``out``.

    Returns the rows with each ``nets`` entry renamed to the reproduction's net names.
    """
    from verydeep.evaluate import evaluate

    cache = out / "eval" / ("+".join(run_dirs) + ".json")
    if cache.is_file():
        return [EvalRow.from_dict(row) for row in json.loads(cache.read_text())]
    result = evaluate([str(d) for d in run_dirs.values()], str(data), protocols=protocols, limit=limit,
                      device=device, progress=progress)
    names = dict(zip([n.name for n in result.nets], run_dirs, strict=True))
    rows = [replace(row, nets=[names[n] for n in row.nets]) for row in result.rows]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([report.to_json_dict(row) for row in rows], indent=1))
    return rows


def _find(rows: list[EvalRow], nets: list[str], protocol: str, q: int | None = None) -> EvalRow | None:
    """The row of ``protocol`` for exactly these nets: at scale ``q``, or over all their scales."""
    for row in rows:
        if row.protocol == protocol and row.nets == nets:
            if (q is None and (row.multi_scale or row.fusion)) or row.scales == [q]:
                return row
    return None


def _single_scale(net: Net, preset: Preset) -> int:
    """The test scale of ``net``'s Table 3 row at this preset: Q = S, or the midpoint of a jittered S."""
    return single_test_scale(*preset.scale(net.scale))


@dataclass
class PaperTable:
    """One of Tables 3 to 6 at this scale: the rows it shows (the paper's figures attached) and the table."""

    rows: list[EvalRow]
    table: Table

    @property
    def markdown(self) -> str:
        return self.table.markdown()


def paper_tables(rows: list[EvalRow], nets: list[Net], preset: Preset) -> dict[str, PaperTable]:
    """Tables 3 to 6: our top-1 / top-5 errors (%) beside the paper's, by title."""
    by_name = {n.name: n for n in NETS}

    def beside_paper(row: EvalRow, table: int, members: Sequence[Net]) -> EvalRow:
        return replace(row, paper=PaperFigures.lookup(table, [m.paper_net for m in members], row.protocol))

    def by_scale(table: int, q: int | None, net: Net) -> tuple[list[str], EvalRow] | None:
        row = _find(rows, [net.name], "dense", q)
        if row is None:
            return None
        train = f"{scale_text(*preset.scale(net.scale))} ({net.paper_net.scale})"
        return [net.name, train, ",".join(map(str, row.scales))], beside_paper(row, table, [net])

    single = [entry for net in nets if (entry := by_scale(3, _single_scale(net, preset), net))]
    multi = [entry for net in nets if (entry := by_scale(4, None, net))]
    methods = [([net.name, protocol], beside_paper(row, 5, [net]))
               for net in nets if _find(rows, [net.name], "multicrop")
               for protocol in ("dense", "multicrop", "dense+multicrop")
               if (row := _find(rows, [net.name], protocol)) is not None]
    fused = [([" + ".join(row.nets), row.protocol], beside_paper(row, 6, [by_name[n] for n in row.nets]))
             for row in rows if row.fusion]
    scale_labels = ("ConvNet", "train S (paper's)", "test Q")
    layouts = [
        ("Table 3: single test scale", scale_labels, single, "(paper, ILSVRC val)"),
        ("Table 4: multiple test scales", scale_labels, multi, "(paper, ILSVRC val)"),
        ("Table 5: dense vs multi-crop vs both (multi-scale)", ("ConvNet", "evaluation method"), methods, "(paper)"),
        ("Table 6: fusion", ("fused nets", "evaluation method"), fused, "(paper, D + E)"),
    ]
    tables = {}
    for title, labels, entries, paper_header in layouts:
        errors = replace(report.PAIRED, paper=(Column(paper_header),))
        table = report.error_table(title, labels, entries, errors, empty="(no such nets in this run)")
        tables[title] = PaperTable([row for _, row in entries], table)
    return tables


def _standard_error(error_pct: float, images: int) -> float:
    """Binomial standard error (in %) of an error rate measured on ``images`` images."""
    p = error_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / images)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper (Sec. 4), whether it held at this scale, and our figures for it."""

    claim: str
    verdict: str  # "held", "did not hold" or "inconclusive (within noise)"
    figures: str


def _verdict(better: EvalRow | None, worse: EvalRow | None) -> tuple[str, str]:
    """Did ``better`` (the paper's winner) have a lower top-1 error than ``worse``? With the margin."""
    if better is None or worse is None:
        return "not measured", ""
    a, b = 100 * better.top1_error, 100 * worse.top1_error
    noise = 2 * math.hypot(_standard_error(a, better.images), _standard_error(b, worse.images))
    figures = f"{a:.1f}% vs {b:.1f}% (difference {b - a:+.1f} pp, 2 s.e. = {noise:.1f} pp)"
    if abs(b - a) < noise:
        return "inconclusive (within noise)", figures
    return ("held" if a < b else "did not hold"), figures


def claims(rows: list[EvalRow], nets: list[Net], preset: Preset) -> list[Claim]:
    """The paper's claims (Sec. 4), each checked on our figures with a two-standard-error margin."""
    by_name = {n.name: n for n in nets}

    def single(name: str) -> EvalRow | None:  # single-scale dense at Q = S (or the jittered midpoint)
        return _find(rows, [name], "dense", _single_scale(by_name[name], preset)) if name in by_name else None

    def multi(name: str, protocol: str = "dense") -> EvalRow | None:
        return _find(rows, [name], protocol) if name in by_name else None

    checks = [
        ("Error falls with depth: B beats A", single("B"), single("A")),
        ("Error falls with depth: D beats B", single("D"), single("B")),
        ("Error falls with depth: E beats B", single("E"), single("B")),
        ("LRN does not help: A beats A-LRN (paper: 29.6 vs 29.7)", single("A"), single("A-LRN")),
        ("At equal depth 3x3 beats 1x1: D beats C", single("D"), single("C")),
        ("Scale jittering in training helps: D [S jittered] beats D [S fixed]", single("D-jitter"), single("D")),
        ("Scale jittering in training helps: E [S jittered] beats E [S fixed]", single("E-jitter"), single("E")),
    ]
    for name in [n.name for n in nets]:
        checks.append((f"Multi-scale testing helps: {name}, 3 scales beat Q = S", multi(name), single(name)))
    for name in [n.name for n in nets if multi(n.name, "multicrop")]:
        both = multi(name, "dense+multicrop")
        checks.append((f"Dense + multi-crop beat dense alone: {name}", both, multi(name, "dense")))
        checks.append((f"Dense + multi-crop beat multi-crop alone: {name}", both, multi(name, "multicrop")))
    fused = next((r for r in rows if r.fusion and r.protocol == "dense+multicrop"), None)
    if fused is not None:
        members = [row for n in fused.nets if (row := multi(n, "dense+multicrop")) is not None]
        best = min(members, key=lambda r: r.top1_error, default=None)
        checks.append((f"Fusing two nets helps: {' + '.join(fused.nets)} beats the better one", fused, best))
    out = []
    for claim, better, worse in checks:
        verdict, figures = _verdict(better, worse)
        if verdict != "not measured":
            out.append(Claim(claim, verdict, figures))
    return out


def _epochs(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir)[1]


def plot(run_dirs: dict[str, Path], rows: list[EvalRow], nets: list[Net], preset: Preset,
         out: Path) -> list[Path]:
    """``learning_curves.png`` (validation error per epoch, every net) and ``errors.png`` (test errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run_dir in run_dirs.items():
        epochs = _epochs(run_dir)
        x = [r["epoch"] for r in epochs]
        loss_ax.plot(x, [r["train_loss"] for r in epochs], label=name)
        err_ax.plot(x, [100 - r["val_top1"] if r["val_top1"] is not None else None for r in epochs], label=name)
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    err_ax.set(title="validation top-1 error (centre crop)", xlabel="epoch", ylabel="error %")
    for ax in (loss_ax, err_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    curves = out / "learning_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    labels, single, multi = [], [], []
    for net in nets:
        one, many = _find(rows, [net.name], "dense", _single_scale(net, preset)), _find(rows, [net.name], "dense")
        if one is None:
            continue
        labels.append(net.name)
        single.append(100 * one.top1_error)
        multi.append(100 * many.top1_error if many else float("nan"))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2), 4.5))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], single, width=0.4, label="dense, single scale (Table 3)")
    ax.bar([x + 0.2 for x in xs], multi, width=0.4, label="dense, multi-scale (Table 4)")
    fused = [r for r in rows if r.fusion and r.protocol == "dense+multicrop"]
    for r in fused:
        label = f"fusion {' + '.join(r.nets)}, dense+multi-crop"
        ax.axhline(100 * r.top1_error, color="k", linestyle="--", label=label)
    ax.set_xticks(list(xs), labels)
    ax.set(ylabel="top-1 test error %", title="test error per net")
    lowest = min([*single, *multi], default=0)
    ax.set_ylim(bottom=max(0, lowest - 5))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    errors = out / "errors.png"
    fig.savefig(errors, dpi=120)
    plt.close(fig)
    return [curves, errors]


def _hardware(device: str) -> str:
    from verydeep.runtime import pick_device

    if pick_device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def report_markdown(preset_name: str, preset: Preset, data: Path, tables: dict[str, PaperTable],
                    checked: list[Claim], seconds: dict[str, float], device: str, command: str) -> str:
    """``REPRODUCTION.md``: settings, Tables 3-6 beside the paper's, the claims and where the figures come from."""
    total = sum(seconds.values())
    lines = [
        f"# Reproduction at small scale: preset `{preset_name}`",
        "",
        f"- data: `{data}`; command: `{command}`",
        f"- hardware: {_hardware(device)}; wall time {total / 60:.1f} min "
        f"({', '.join(f'{k} {v / 60:.1f}' for k, v in seconds.items())} min)",
        f"- every net: width x{preset.width:g}, crop {preset.crop} (the paper's 224 x {preset.crop / 224:.3f}), "
        f"{preset.epochs} epochs, batch {preset.batch_size}, SGD momentum 0.9, weight decay 5e-4, dropout 0.5, "
        f"lr {preset.lr:g} divided by 10 when validation top-1 has not improved for {preset.patience} epochs "
        f"(at most 3 times, Sec. 3.1), init `{preset.init}`, no batch norm",
        f"- training scales: S = 256 -> {preset.scale((256, 256))[0]}, [256; 512] -> "
        f"{list(preset.scale((256, 512)))}; test scales from each recipe ({{S-32, S, S+32}} or {{Smin, mid, Smax}}, "
        f"scaled); errors on {f'{preset.limit_test} (class-balanced)' if preset.limit_test else 'all'}"
        " test images",
        "- the paper's figures are ILSVRC-2012 validation errors at full scale: compare directions, not values",
        "",
    ]
    claims_table = Table("The paper's claims at this scale",
                         [Column("claim"), Column("verdict"), Column("top-1 error, ours (winner vs loser)")],
                         [Row((c.claim, c.verdict, c.figures)) for c in checked], empty="(no claim measured)")
    lines += [report.join_markdown((t.table for t in tables.values()), heading="##"), ""]
    lines += [f"## {claims_table.title}", "",
              "A claim held when our error moved the paper's way by more than two standard errors of the "
              "difference (binomial, on the test images); within that margin it is inconclusive.", "",
              claims_table.markdown()]
    lines += ["", "Plots: `learning_curves.png` (training loss and validation error per epoch), "
              "`errors.png` (test error per net, single vs multi-scale)."]
    return "\n".join(lines) + "\n"


@dataclass
class Reproduction:
    """A reproduction's outcome: its preset, Tables 3 to 6, the claims checked, the time spent
    (training, evaluation) and ``REPRODUCTION.md``'s text."""

    preset: str
    settings: Preset
    tables: dict[str, PaperTable]
    claims: list[Claim]
    seconds: dict[str, float]
    markdown: str

    def to_dict(self) -> dict[str, Any]:
        """``results.json``: every field; each table as its rows, its rendered headers and cells, and markdown."""
        tables = {title: {"rows": [report.to_json_dict(row) for row in t.rows], "table": t.table.to_dict(),
                          "markdown": t.markdown} for title, t in self.tables.items()}
        return {**report.to_json_dict(replace(self, tables={})), "tables": tables}


def reproduce(data: Path, preset: Preset, preset_name: str, out: Path, device: str = "auto",
              progress: bool = True, command: str = "") -> Reproduction:
    """Train every net of ``preset`` (resumably), evaluate them with the paper's protocols, report."""
    from verydeep.data import find_split

    find_split(data, "train")
    test = find_split(data, "val")
    by_name = {n.name: n for n in NETS}
    order = [by_name[name] for name in preset.nets]  # the preset's order: what matters most first
    nets = [n for n in NETS if n.name in preset.nets]  # the tables' order
    out.mkdir(parents=True, exist_ok=True)
    run_dirs: dict[str, Path] = {}
    seconds = {"training": 0.0, "evaluation": 0.0}
    rows: list[EvalRow] = []
    jittered = [n.name for n in order if n.jittered]
    for net in order:  # each net is evaluated as soon as it can be, so a cut-short run still reports
        run_dirs[net.name] = train_net(net, preset, data, out, device, progress)
        seconds["training"] += sum(r["seconds"] for r in _epochs(run_dirs[net.name]))
        start = time.time()
        if not net.jittered:
            rows += evaluate_nets({net.name: run_dirs[net.name]}, test, preset.fixed_protocols, preset.limit_test,
                                  out, device, progress)
        elif all(name in run_dirs for name in jittered):  # the jittered nets together: Tables 5 and 6
            rows += evaluate_nets({name: run_dirs[name] for name in jittered}, test,
                                  ("dense", "multicrop", "dense+multicrop"), preset.limit_test, out, device, progress)
        seconds["evaluation"] += time.time() - start
    tables = paper_tables(rows, nets, preset)
    checked = claims(rows, nets, preset)
    plot(run_dirs, rows, nets, preset, out)
    markdown = report_markdown(preset_name, preset, data, tables, checked, seconds, device, command)
    (out / "REPRODUCTION.md").write_text(markdown)
    result = Reproduction(preset_name, preset, tables, checked, seconds, markdown)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reproduce", help="the paper's ablations (Tables 3-6) at a scale this machine allows")
    p.add_argument("--data", required=True, help="dataset root with train/ and val/ (or test/)")
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--out", type=output_dir, default=None, help="output directory (default runs/reproduce-PRESET)")
    p.add_argument("--budget", type=positive_int, default=None, help="epochs per net (the same for every net)")
    p.add_argument("--width", type=positive_float, default=None, help="width multiplier of every net")
    p.add_argument("--nets", default=None, help=f"comma-separated subset of {','.join(n.name for n in NETS)}")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="train on a class-balanced subset of N images")
    p.add_argument("--limit-test", type=positive_int, default=None, help="test on a class-balanced subset of N images")
    p.add_argument("--workers", type=natural_int, default=None, help="data loading processes")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    changes = {"epochs": args.budget, "width": args.width, "batch_size": args.batch_size,
               "limit_train": args.limit_train, "limit_test": args.limit_test, "workers": args.workers}
    preset = replace(PRESETS[args.preset], **{k: v for k, v in changes.items() if v is not None})
    if args.nets is not None:
        wanted = tuple(dict.fromkeys(n.strip() for n in args.nets.split(",") if n.strip()))
        unknown = [n for n in wanted if n not in {net.name for net in NETS}]
        if unknown or not wanted:
            named = f"unknown {', '.join(unknown)}" if unknown else "no net named"
            raise UserError(f"--nets: {named}; choose from {', '.join(n.name for n in NETS)}")
        preset = replace(preset, nets=wanted)
    out = Path(args.out or f"runs/reproduce-{args.preset}")
    command = "verydeep " + " ".join(sys.argv[1:])
    result = reproduce(Path(args.data), preset, args.preset, out, args.device, not args.no_progress, command)
    print(result.markdown)
