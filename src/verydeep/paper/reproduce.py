"""The paper's experiments (Sec. 4, Tables 3-6) reproduced at a scale the machine allows.

Every size of the paper is multiplied by one factor, ``crop / 224``: on CIFAR-10 (crop 32) the
training scales S = 256, 384 and [256, 512] become 36, 54 and [36, 73], the test offsets S +- 32
become S +- 4. Under the paper's protocol (Sec. 3.1) net A starts from random weights, the deeper
nets from A's first four convs and three FC layers, the S = 384 nets from the S = 256 ones and the
jittered nets from the S = 384 ones; under ``scratch`` every net starts from random weights. Every
net has the same width, schedule and epoch bound; the nets are trained one after another, each in
its own run directory, so an interrupted reproduction resumes where it stopped. The output is the
paper's Tables 3 to 6 with our figures beside the paper's, the paper's claims each judged by a
paired test on the same test images (with the spread over seeds), plots, and ``REPRODUCTION.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verydeep.bench import machine
from verydeep.cli import add_device, add_workers, output_dir, positive_int, width_multiplier
from verydeep.data import find_split
from verydeep.errors import UserError
from verydeep.eval.evaluate import EvalRow, PaperFigures, evaluate
from verydeep.eval.metrics import PairedDifference, paired_difference, topk_correct, topk_error
from verydeep.io.checkpoint import atomic_write
from verydeep.paper import report
from verydeep.paper.figures import PaperNet, scale_text, single_test_scale
from verydeep.paper.plot import error_bars, read_metrics
from verydeep.paper.report import Column, Row, Table
from verydeep.runtime import pick_device
from verydeep.train import train
from verydeep.train.recipe import TrainConfig, parse_milestones


@dataclass(frozen=True)
class Net:
    """One net of the reproduction: a configuration, its training scale (paper's pixels), the net it
    starts from under the paper's protocol (Sec. 3.1) and its seed."""

    name: str
    config: str
    scale: tuple[int, int]  # at the paper's 224-pixel crop
    parent: str | None = None
    seed: int = 0

    @property
    def jittered(self) -> bool:
        return self.scale[0] != self.scale[1]

    @property
    def base(self) -> str:
        """The name of the net this one replicates with another seed (its own name at seed 0)."""
        return self.name.removesuffix(f"-s{self.seed}") if self.seed else self.name

    @property
    def paper_net(self) -> PaperNet:
        """The paper's net of this configuration and training scale, whose figures ours stand beside."""
        return PaperNet.trained_at(self.config, *self.scale)

    def replica(self, seed: int, seeded: Sequence[str]) -> Net:
        """This net trained with another seed; it starts from its parent's replica of that seed when the
        parent is seeded too, so that replicas share no training."""
        parent = f"{self.parent}-s{seed}" if self.parent in seeded else self.parent
        return replace(self, name=f"{self.name}-s{seed}", parent=parent, seed=seed)


#: The ablations: depth (A, B, D, E), LRN (A-LRN), 1x1 vs 3x3 (C vs D), S = 256 vs 384 vs jittered,
#: and the two jittered nets whose fusion is Table 6. Parents follow Sec. 3.1: A from random weights,
#: the deeper nets from A's first four convs and three FC layers, S = 384 from S = 256 (lr 1e-3), the
#: jittered nets from S = 384. A-LRN is as shallow as A and starts from random weights too.
NETS = (
    Net("A", "A", (256, 256)),
    Net("A-LRN", "A-LRN", (256, 256)),
    Net("B", "B", (256, 256), parent="A"),
    Net("C", "C", (256, 256), parent="A"),
    Net("C-384", "C", (384, 384), parent="C"),
    Net("C-jitter", "C", (256, 512), parent="C-384"),
    Net("D", "D", (256, 256), parent="A"),
    Net("D-384", "D", (384, 384), parent="D"),
    Net("D-jitter", "D", (256, 512), parent="D-384"),
    Net("E", "E", (256, 256), parent="A"),
    Net("E-384", "E", (384, 384), parent="E"),
    Net("E-jitter", "E", (256, 512), parent="E-384"),
)
PROTOCOLS = ("paper", "scratch")


@dataclass(frozen=True)
class Preset:
    """Sizes and budget of a reproduction; every paper size is scaled by ``crop / 224``.

    ``protocol``: ``paper`` trains each net from its parent (Sec. 3.1; a same-configuration parent is
    fine-tuned with ``finetune_lr`` for at most ``finetune_epochs``), ``scratch`` every net from random
    weights. ``epochs`` is an upper bound: a net stops once validation has not improved for
    ``stop_patience`` epochs. ``seeds`` > 1 trains the ``seeded`` nets that many times.
    """

    crop: int
    width: float
    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    init: str = "he"
    nets: tuple[str, ...] = tuple(n.name for n in NETS)
    protocol: str = "paper"
    finetune_lr: float = 1e-3
    finetune_epochs: int = 6
    stop_patience: int | None = 4
    seeds: int = 1
    seeded: tuple[str, ...] = ("A", "D")
    limit_train: int | None = None
    limit_test: int | None = None
    limit_val: int | None = 1000  # the class-balanced test images that the plateau rule watches
    val_split: int | None = None  # instead: validate on this many held-out training images (test images decide nothing)
    milestones: tuple[int, ...] = ()  # a fixed schedule (lr / 10 after each), instead of the plateau rule
    workers: int = 2
    patience: int = 2  # the paper's rule: lr / 10 when validation top-1 stops improving, at most 3 times
    fixed_protocols: tuple[str, ...] = ("dense",)  # jittered nets always get dense, multi-crop and both

    def scale(self, paper: tuple[int, int]) -> tuple[int, int]:
        """A training scale of the paper (224-pixel crops) at this preset's crop."""
        factor = self.crop / 224
        return (math.floor(paper[0] * factor), math.floor(paper[1] * factor))

    def starts_from(self, net: Net) -> str | None:
        """The net whose weights ``net`` starts from under this preset's protocol (None: random weights)."""
        return net.parent if self.protocol == "paper" else None

    def fine_tuned(self, net: Net, by_name: dict[str, Net]) -> bool:
        """Whether ``net`` continues a parent of its own configuration (every weight copied, lr 1e-3)."""
        parent = self.starts_from(net)
        return parent is not None and by_name[parent].config == net.config

    def train_config(self, net: Net, by_name: dict[str, Net], data: Path, nets_dir: Path, device: str,
                     progress: bool) -> TrainConfig:
        """``net``'s training settings: the paper's (TrainConfig's defaults), overridden by every field of
        this preset that is also a training setting (crop, width, epochs, batch size, lr, ...), then by
        where ``net`` starts from under the protocol."""
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)} - {"milestones"}
        run_dir = nets_dir / net.name
        cfg = replace(TrainConfig(), **{name: getattr(self, name) for name in shared}, data=str(data),
                      out=str(run_dir), config=net.config, scale=self.scale(net.scale), seed=net.seed,
                      device=device, progress=progress, resume=(run_dir / "checkpoints" / "last.pt").is_file(),
                      milestones=list(self.milestones))
        parent = self.starts_from(net)
        if parent is None:
            return cfg
        cfg = replace(cfg, weights=str(nets_dir / parent / "checkpoints" / "last.pt"))
        if self.fine_tuned(net, by_name):  # a short fine-tuning: the plateau rule within its few epochs
            return replace(cfg, lr=self.finetune_lr, epochs=self.finetune_epochs, milestones=[])
        return replace(cfg, warm_start=True)  # Sec. 3.1: A's first four convs and FC6-8 into a deeper net

    def members(self) -> list[Net]:
        """Every net this preset trains, in training order: the preset's order (what matters most
        first), each net's parents before it under the paper's protocol, then the seed replicas."""
        by_name = {n.name: n for n in NETS}
        order: list[Net] = []

        def add(name: str) -> None:
            net = by_name[name]
            parent = self.starts_from(net)
            if parent is not None:
                add(parent)
            if net not in order:
                order.append(net)

        for name in self.nets:
            add(name)
        replicas = [net.replica(seed, self.seeded) for seed in range(1, self.seeds)
                    for net in order if net.name in self.seeded]
        return order + replicas


PRESETS: dict[str, Preset] = {
    "cifar10": Preset(crop=32, width=0.25, epochs=14, finetune_epochs=5, seeds=2,
                      nets=("A", "D", "B", "E", "A-LRN", "C", "D-jitter", "E-jitter")),
    "imagenette": Preset(crop=112, width=0.25, epochs=30, batch_size=64),
    # the depth claim trained to convergence: A, B, D and E, four seeds each, a fixed schedule, validation
    # held out of the training images (docs/REPRODUCTION.md)
    "cifar10-depth": Preset(crop=32, width=0.25, epochs=45, milestones=(25, 35, 40), nets=("A", "D", "B", "E"),
                            seeds=4, seeded=("A", "B", "D", "E"), stop_patience=None, limit_val=None,
                            val_split=2000, workers=1),
    # the demo: 8x8 digits lose too much under S in [36, 73], so one net A at S = 36, all protocols
    "digits": Preset(crop=32, width=0.25, epochs=12, batch_size=32, nets=("A",), limit_val=None,
                     fixed_protocols=("dense", "multicrop", "dense+multicrop")),
}


def train_net(net: Net, by_name: dict[str, Net], preset: Preset, data: Path, out: Path, device: str,
              progress: bool) -> Path:
    """Train one net unless it is done (an interrupted run resumes); returns its run directory."""

    nets_dir = out / "nets"
    done = nets_dir / net.name / "train_summary.json"
    if not done.is_file():
        summary = train(preset.train_config(net, by_name, data, nets_dir, device, progress))
        text = json.dumps(summary.to_dict(), indent=1)
        atomic_write(done, lambda tmp: Path(tmp).write_text(text))
    return nets_dir / net.name


@dataclass(frozen=True)
class Measured:
    """A row of errors and its per-image posteriors (N, classes) on the readable test images, whose
    paths and labels come with it: what fusing rows and the paired test need."""

    row: EvalRow
    posteriors: np.ndarray
    targets: np.ndarray
    paths: np.ndarray

    def correct(self) -> np.ndarray:
        """Per image, right at top-1 (ties as :func:`verydeep.eval.metrics.topk_correct`)."""
        return topk_correct(torch.from_numpy(self.posteriors), torch.from_numpy(self.targets), 1).numpy()


def evaluate_net(name: str, run_dir: Path, data: Path, protocols: tuple[str, ...], limit: int | None, out: Path,
                 device: str, progress: bool) -> tuple[list[Measured], float]:
    """One net's rows under ``protocols`` at its recipe's scales, with their posteriors, and the
    evaluation's wall time (s); cached in ``out``."""

    cache, arrays = out / "eval" / f"{name}.json", out / "eval" / f"{name}.npz"
    if not (cache.is_file() and arrays.is_file()):
        result = evaluate([str(run_dir)], str(data), protocols=protocols, limit=limit, device=device,
                          progress=progress, keep_posteriors=True)
        kept = result.posteriors
        rows = [replace(row, nets=[name]) for row in result.rows]
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(arrays, targets=kept.targets[kept.readable], paths=np.array(kept.paths)[kept.readable],
                 seconds=np.array(result.timing.seconds),
                 **{f"row{i}": kept.rows[row.name] for i, row in enumerate(result.rows)})
        cache.write_text(json.dumps([report.to_json_dict(row) for row in rows], indent=1))
    saved = np.load(arrays)
    seconds = float(saved["seconds"]) if "seconds" in saved else 0.0  # caches written before it was kept: 0
    rows = [EvalRow.from_dict(row) for row in json.loads(cache.read_text())]
    return [Measured(row, saved[f"row{i}"], saved["targets"], saved["paths"]) for i, row in enumerate(rows)], seconds


def fuse(members: Sequence[Measured]) -> Measured:
    """Sec. 4.4: several nets' rows fused by averaging their posteriors (images common to all)."""
    paths = members[0].paths
    for m in members[1:]:
        paths = paths[np.isin(paths, m.paths)]
    picked = [m.posteriors[_positions(m.paths, paths)] for m in members]
    targets = members[0].targets[_positions(members[0].paths, paths)]
    posteriors = np.mean(picked, axis=0)
    first = members[0].row
    nets = [name for m in members for name in m.row.nets]
    scales = sorted({q for m in members for q in m.row.scales})
    t_post, t_targets = torch.from_numpy(posteriors), torch.from_numpy(targets)
    row = EvalRow(f"{' + '.join(nets)}: {first.protocol}", first.protocol, scales, nets, multi_scale=True,
                  fusion=True, top1_error=topk_error(t_post, t_targets, 1),
                  top5_error=topk_error(t_post, t_targets, 5), images=len(paths))
    return Measured(row, posteriors, targets, paths)


def _positions(paths: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of ``wanted`` sits in ``paths``."""
    index = {p: i for i, p in enumerate(paths.tolist())}
    return np.array([index[p] for p in wanted.tolist()], dtype=np.int64)


def paired(better: Measured, worse: Measured) -> PairedDifference:
    """The paired difference of two rows on their common test images (positive: ``better`` is better)."""
    common = better.paths[np.isin(better.paths, worse.paths)]
    return paired_difference(better.correct()[_positions(better.paths, common)],
                             worse.correct()[_positions(worse.paths, common)])


def _find(measured: list[Measured], nets: list[str], protocol: str, q: int | None = None) -> Measured | None:
    """The row of ``protocol`` for exactly these nets: at scale ``q``, or over all their scales."""
    for m in measured:
        row = m.row
        if row.protocol == protocol and row.nets == nets:
            if (q is None and (row.multi_scale or row.fusion)) or row.scales == [q]:
                return m
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


def paper_tables(measured: list[Measured], nets: list[Net], preset: Preset) -> dict[str, PaperTable]:
    """Tables 3 to 6: our top-1 / top-5 errors (%) beside the paper's, by title."""
    by_name = {n.name: n for n in nets}

    def beside_paper(row: EvalRow, table: int, members: Sequence[Net]) -> EvalRow:
        return replace(row, paper=PaperFigures.lookup(table, [m.paper_net for m in members], row.protocol))

    def by_scale(table: int, q: int | None, net: Net) -> tuple[list[str], EvalRow] | None:
        found = _find(measured, [net.name], "dense", q)
        if found is None:
            return None
        train = f"{scale_text(*preset.scale(net.scale))} ({net.paper_net.scale})"
        return [net.name, train, ",".join(map(str, found.row.scales))], beside_paper(found.row, table, [net])

    single = [entry for net in nets if (entry := by_scale(3, _single_scale(net, preset), net))]
    multi = [entry for net in nets if (entry := by_scale(4, None, net))]
    methods = [([net.name, protocol], beside_paper(found.row, 5, [net]))
               for net in nets if _find(measured, [net.name], "multicrop")
               for protocol in ("dense", "multicrop", "dense+multicrop")
               if (found := _find(measured, [net.name], protocol)) is not None]
    fused = [([" + ".join(m.row.nets), m.row.protocol], beside_paper(m.row, 6, [by_name[n] for n in m.row.nets]))
             for m in measured if m.row.fusion]
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


@dataclass(frozen=True)
class Claim:
    """A claim of the paper (Sec. 4), whether it held at this scale, our figures for it, the paired
    difference (percentage points, positive: the paper's winner is better) and its spread over seeds."""

    claim: str
    verdict: str  # "held", "did not hold" or "inconclusive (within noise)"
    figures: str
    difference: float | None = None
    margin: float | None = None
    seed_spread: str = ""


def _verdict(better: Measured | None, worse: Measured | None) -> tuple[str, str, PairedDifference | None]:
    """Did ``better`` (the paper's winner) have a lower top-1 error than ``worse``, beyond two standard
    errors of the paired per-image difference?"""
    if better is None or worse is None:
        return "not measured", "", None
    a, b = 100 * better.row.top1_error, 100 * worse.row.top1_error
    test = paired(better, worse)
    figures = (f"{a:.1f}% vs {b:.1f}% (paired difference {test.difference:+.2f} pp, 2 s.e. = {test.margin:.2f} pp, "
               f"{test.images} images)")
    if not test.significant:
        return "inconclusive (within noise)", figures, test
    return ("held" if test.difference > 0 else "did not hold"), figures, test


#: Finds a net's row by the net's name (None when it has none).
RowOf = Callable[[str], "Measured | None"]


def _replicas(name: str, nets: list[Net]) -> list[Net]:
    """``name`` and its seed replicas, by seed."""
    return sorted((n for n in nets if n.base == name), key=lambda n: n.seed)


def seed_spread(better: str, worse: str, nets: list[Net], row_of: RowOf) -> str:
    """The spread over seeds: of the difference where both nets have replicas of the same seeds, else of
    the error of whichever has replicas. ``row_of(name)`` finds a net's row. Empty with one seed."""
    def errors(name: str) -> dict[int, float]:
        return {n.seed: 100 * m.row.top1_error for n in _replicas(name, nets) if (m := row_of(n.name)) is not None}

    a, b = errors(better), errors(worse)
    both = sorted(set(a) & set(b))
    if len(both) >= 2:
        diffs = [b[s] - a[s] for s in both]
        margin = 2 * np.std(diffs, ddof=1) / math.sqrt(len(diffs))
        return f"difference over {len(both)} seeds: {np.mean(diffs):+.2f} +- {np.std(diffs, ddof=1):.2f} pp " \
               f"(2 s.e. of the mean {margin:.2f} pp; per seed {', '.join(f'{d:+.2f}' for d in diffs)})"
    for name, errs in ((better, a), (worse, b)):
        if len(errs) >= 2:
            return f"{name}'s error over {len(errs)} seeds: {np.mean(list(errs.values())):.2f} +- " \
                   f"{np.std(list(errs.values()), ddof=1):.2f}%"
    return ""


def claims(measured: list[Measured], nets: list[Net], preset: Preset) -> list[Claim]:
    """The paper's claims (Sec. 4), each judged by the paired test on the same test images."""
    by_name = {n.name: n for n in nets}

    def single(name: str) -> Measured | None:  # single-scale dense at Q = S (or the jittered midpoint)
        return _find(measured, [name], "dense", _single_scale(by_name[name], preset)) if name in by_name else None

    def multi(name: str, protocol: str = "dense") -> Measured | None:
        return _find(measured, [name], protocol) if name in by_name else None

    checks = [(f"Error falls with depth: {b} beats {a}", b, a) for a, b in
              (("A", "B"), ("A", "D"), ("B", "D"), ("B", "E"))]
    checks += [("LRN does not help: A beats A-LRN (paper: 29.6 vs 29.7)", "A", "A-LRN"),
               ("At equal depth 3x3 beats 1x1: D beats C", "D", "C")]
    for c in "CDE":
        checks += [(f"Scale jittering in training helps: {c} [S jittered] beats {c} [S = {s}]", f"{c}-jitter", ref)
                   for s, ref in (("256", c), ("384", f"{c}-384"))]
    out = []
    for claim, better, worse in checks:
        verdict, figures, test = _verdict(single(better), single(worse))
        if test is not None:
            verdict = _across_seeds(better, worse, nets, single) or verdict
            out.append(Claim(claim, verdict, figures, test.difference, test.margin,
                             seed_spread(better, worse, nets, single)))
    out += _protocol_claims(measured, nets, multi, single)
    return out


def _across_seeds(better: str, worse: str, nets: list[Net], row_of: RowOf) -> str | None:
    """The verdict over every seed both nets were trained with (None with fewer than two): held (or did
    not hold) when each seed's paired test says so and the mean difference over the seeds lies beyond
    two of its standard errors (training's noise, as the paired test measures the test set's); else
    inconclusive, with the reason."""
    pairs = [(a, b) for x in _replicas(better, nets) for y in _replicas(worse, nets)
             if x.seed == y.seed and (a := row_of(x.name)) is not None and (b := row_of(y.name)) is not None]
    if len(pairs) < 2:
        return None
    verdicts = {_verdict(a, b)[0] for a, b in pairs}
    if len(verdicts) > 1:
        return f"inconclusive (seeds disagree: {', '.join(sorted(verdicts))})"
    verdict = verdicts.pop()
    mean, margin = _seed_mean(pairs)
    if verdict in ("held", "did not hold") and abs(mean) <= margin:
        return f"inconclusive (each seed {verdict}, but the mean over seeds {mean:+.2f} pp is within 2 s.e. " \
               f"{margin:.2f} pp)"
    return f"{verdict} (each of {len(pairs)} seeds)"


def _seed_mean(pairs: list[tuple[Measured, Measured]]) -> tuple[float, float]:
    """The mean over seeds of the top-1 difference (pp, positive: the first net is better) and two
    standard errors of that mean."""
    diffs = np.array([100 * (b.row.top1_error - a.row.top1_error) for a, b in pairs])
    return float(diffs.mean()), float(2 * diffs.std(ddof=1) / math.sqrt(len(diffs)))


def _protocol_claims(measured: list[Measured], nets: list[Net], multi: Callable[..., Measured | None],
                     single: RowOf) -> list[Claim]:
    """The claims about testing (multi-scale, dense + multi-crop) and fusion."""
    checks = [(f"Multi-scale testing helps: {n.name}, 3 scales beat Q = S", multi(n.name), single(n.name))
              for n in nets]
    for name in [n.name for n in nets if multi(n.name, "multicrop")]:
        both = multi(name, "dense+multicrop")
        checks.append((f"Dense + multi-crop beat dense alone: {name}", both, multi(name, "dense")))
        checks.append((f"Dense + multi-crop beat multi-crop alone: {name}", both, multi(name, "multicrop")))
    for fused in (m for m in measured if m.row.fusion):
        members = [found for n in fused.row.nets if (found := multi(n, fused.row.protocol)) is not None]
        best = min(members, key=lambda m: m.row.top1_error, default=None)
        checks.append((f"Fusing nets helps: {' + '.join(fused.row.nets)} ({fused.row.protocol}) beats the better "
                       "one", fused, best))
    out = []
    for claim, better, worse in checks:
        verdict, figures, test = _verdict(better, worse)
        if test is not None:
            out.append(Claim(claim, verdict, figures, test.difference, test.margin))
    return out


def _epochs(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir)[1]


def plot(run_dirs: dict[str, Path], measured: list[Measured], nets: list[Net], preset: Preset,
         out: Path) -> list[Path]:
    """``learning_curves.png`` (validation error per epoch, every net) and ``errors.png`` (test errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = {n.name: n.seed for n in nets}
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run_dir in run_dirs.items():
        epochs = _epochs(run_dir)
        x = [r["epoch"] for r in epochs]
        style = "--" if seeds.get(name) else "-"
        loss_ax.plot(x, [r["train_loss"] for r in epochs], style, label=name)
        err_ax.plot(x, [100 - r["val_top1"] if r["val_top1"] is not None else None for r in epochs], style,
                    label=name)
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    err_ax.set(title="validation top-1 error (centre crop)", xlabel="epoch", ylabel="error %")
    for ax in (loss_ax, err_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves = out / "learning_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)
    return [curves, _plot_errors(measured, nets, preset, out)]


#: ``errors.png``'s bars, in the order of the tables that report them: (protocol, at one test scale, legend).
ERROR_BARS = (("dense", True, "dense, single scale (Table 3)"), ("dense", False, "dense, multi-scale (Table 4)"),
              ("multicrop", False, "multi-crop, multi-scale (Table 5)"),
              ("dense+multicrop", False, "dense + multi-crop, multi-scale (Table 5)"))


def error_groups(measured: list[Measured], nets: list[Net], preset: Preset) -> list[tuple[str, dict[str, float]]]:
    """Every row of Tables 3 to 6 as ``(group, {legend: top-1 error %})``: a group per net with its
    protocols, then a group per fusion (Table 6) with the protocols it was fused under."""
    groups: dict[str, dict[str, float]] = {}
    for net in nets:
        for protocol, single, legend in ERROR_BARS:
            found = _find(measured, [net.name], protocol, _single_scale(net, preset) if single else None)
            if found is not None:
                groups.setdefault(net.name, {})[legend] = 100 * found.row.top1_error
    multi_scale = {protocol: legend for protocol, single, legend in ERROR_BARS if not single}
    for fused in (m for m in measured if m.row.fusion and m.row.protocol in multi_scale):
        group = groups.setdefault(f"{' + '.join(fused.row.nets)} (fused)", {})
        group[multi_scale[fused.row.protocol]] = 100 * fused.row.top1_error
    return list(groups.items())


def errors_figure(measured: list[Measured], nets: list[Net], preset: Preset) -> Any:
    """``errors.png``'s figure: the top-1 test error of every row of Tables 3 to 6, as bars from zero."""
    return error_bars(error_groups(measured, nets, preset), [legend for *_, legend in ERROR_BARS],
                      "top-1 test error, every row of Tables 3 to 6")


def _plot_errors(measured: list[Measured], nets: list[Net], preset: Preset, out: Path) -> Path:
    errors = out / "errors.png"
    errors_figure(measured, nets, preset).savefig(errors, dpi=120)
    return errors


def _hardware(device: str) -> str:

    if pick_device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}"

    facts = machine(torch.device("cpu"))
    flags = ", ".join(name for name in ("amx", "avx512_bf16", "avx2") if facts.get(name)) or "no AVX2"
    return f"{facts['cpu']} CPU ({facts['cores']} cores; {flags}), {torch.get_num_threads()} threads, " \
           f"torch {torch.__version__}"


def _settings_lines(preset: Preset, data: Path, device: str, command: str, seconds: dict[str, float]) -> list[str]:
    """The report's list of settings: data, command, hardware and time, the nets' recipe."""
    total = sum(seconds.values())
    start = ("the paper's (Sec. 3.1): A and A-LRN from random weights, B-E from A's first four convs and FC6-8, "
             f"S = 384 from S = 256 and the jittered nets from S = 384 at lr {preset.finetune_lr:g} for at most "
             f"{preset.finetune_epochs} epochs" if preset.protocol == "paper" else "every net from random weights")
    stop = f"; a net stops once validation has not improved for {preset.stop_patience} epochs" \
        if preset.stop_patience else ""
    schedule = (f"lr {preset.lr:g} divided by 10 after epochs {', '.join(map(str, preset.milestones))} (a fixed "
                "schedule)" if preset.milestones else
                f"lr {preset.lr:g} divided by 10 when validation top-1 has not improved for {preset.patience} "
                "epochs (at most 3 times, Sec. 3.1)")
    validation = (f"{preset.val_split} class-balanced training images held out by each net's seed (not trained on; "
                  "no test image decides anything)" if preset.val_split else
                  f"{preset.limit_val or 'all the'} class-balanced test images")
    return [
        f"- data: `{data}`; command: `{command}`",
        f"- hardware: {_hardware(device)}; wall time {total / 60:.1f} min "
        f"({', '.join(f'{k} {v / 60:.1f}' for k, v in seconds.items())} min)",
        f"- every net: width x{preset.width:g}, crop {preset.crop} (the paper's 224 x {preset.crop / 224:.3f}), "
        f"at most {preset.epochs} epochs, batch {preset.batch_size}, SGD momentum 0.9, weight decay 5e-4, dropout "
        f"0.5, {schedule}{stop}, init `{preset.init}`, no batch norm",
        f"- protocol `{preset.protocol}`: {start}; validation on {validation}",
        f"- seeds: {preset.seeds} ({', '.join(preset.seeded)} trained {preset.seeds} times; a replica starts from "
        "its own seed's parent, so replicas share no training)" if preset.seeds > 1 else "- seeds: 1",
        f"- training scales: S = 256 -> {preset.scale((256, 256))[0]}, 384 -> {preset.scale((384, 384))[0]}, "
        f"[256; 512] -> {list(preset.scale((256, 512)))}; test scales from each recipe ({{S-32, S, S+32}} or "
        f"{{Smin, mid, Smax}}, scaled); errors on "
        f"{f'{preset.limit_test} (class-balanced)' if preset.limit_test else 'all'} test images",
        "- the paper's figures are ILSVRC-2012 validation errors at full scale: compare directions, not values",
    ]


def nets_table(trained: list[NetRecord]) -> Table:
    """Each net as it ended: epochs, final lr and training loss, how flat its last three epochs were,
    and its test errors at Q = S."""
    def change(value: float | None) -> str:
        return "-" if value is None else f"{value:+.3f}"

    rows = [Row((n.name, str(n.seed), n.init_from and Path(n.init_from).parent.parent.name or "random",
                 str(n.epochs), f"{n.final_lr:g}", f"{n.final_train_loss:.3f}", change(n.train_loss_change_last3),
                 change(n.val_error_change_last3),
                 "-" if n.test_top1_error is None else f"{n.test_top1_error:.2f} / {n.test_top5_error:.2f}"))
            for n in trained]
    return Table("The nets as trained", [Column("net"), Column("seed"), Column("from"), Column("epochs"),
                                         Column("final lr"), Column("final training loss"),
                                         Column("loss change, last 3 epochs"),
                                         Column("validation error change, last 3 epochs (pp)"),
                                         Column("test top-1 / top-5 error %, Q = S")], rows, empty="(no net)")


def report_markdown(preset_name: str, preset: Preset, data: Path, tables: dict[str, PaperTable],
                    checked: list[Claim], trained: list[NetRecord], seconds: dict[str, float], device: str,
                    command: str) -> str:
    """``REPRODUCTION.md``: settings, the nets, Tables 3-6 beside the paper's, the claims and where the
    figures come from."""
    lines = [f"# Reproduction at small scale: preset `{preset_name}`", "",
             *_settings_lines(preset, data, device, command, seconds), "",
             f"## {nets_table(trained).title}", "", nets_table(trained).markdown(), ""]
    claims_table = Table("The paper's claims at this scale",
                         [Column("claim"), Column("verdict"), Column("top-1 error, ours (winner vs loser)"),
                          Column("spread over seeds")],
                         [Row((c.claim, c.verdict, c.figures, c.seed_spread or "-")) for c in checked],
                         empty="(no claim measured)")
    lines += [report.join_markdown((t.table for t in tables.values()), heading="##"), ""]
    lines += [f"## {claims_table.title}", "",
              "Each claim is judged on the same test images, image by image: the paired difference is the mean "
              "of (loser wrong - winner wrong) over the images, and the claim held when it passed two of its "
              "standard errors; within that margin it is inconclusive. That margin measures the test set's noise; "
              "the spread over seeds (where nets were trained more than once) measures training's. Where both nets "
              "were trained with several seeds, a claim held (or did not) only when every seed's paired test says "
              "so; the figures are seed 0's.", "",
              claims_table.markdown()]
    lines += ["", "Plots: `learning_curves.png` (training loss and validation error per epoch; seed replicas "
              "dashed), `errors.png` (the top-1 test error of every row of Tables 3 to 6, bars from zero)."]
    return "\n".join(lines) + "\n"


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
        tables = {title: {"rows": [report.to_json_dict(row) for row in t.rows], "table": t.table.to_dict(),
                          "markdown": t.markdown} for title, t in self.tables.items()}
        return {**report.to_json_dict(replace(self, tables={})), "tables": tables}


def fusions(measured: list[Measured], nets: list[Net]) -> list[Measured]:
    """Table 6: the jittered nets of seed 0 fused under each protocol they were evaluated with (the
    paper's D + E), and each seeded net fused with its replicas (dense, multi-scale): nets that share
    no training."""
    groups = [[n.name for n in nets if n.jittered and n.seed == 0]]
    groups += [[n.name for n in _replicas(n.name, nets)] for n in nets if n.seed == 0]
    out = []
    for group in (g for g in groups if len(g) > 1):
        for protocol in ("dense", "multicrop", "dense+multicrop"):
            members = [_find(measured, [name], protocol) for name in group]
            if all(members):
                out.append(fuse(members))
    return out


@dataclass(frozen=True)
class Trained:
    """The nets trained and measured so far: their run directories, rows and time spent."""

    run_dirs: dict[str, Path]
    measured: list[Measured]
    seconds: dict[str, float]


def train_and_measure(order: list[Net], preset: Preset, data: Path, out: Path, device: str,
                      progress: bool) -> Trained:
    """Train each net of ``order`` (resumably, each from its parent under the paper's protocol) and
    evaluate it on the test images as soon as it is trained, so that a cut-short run still reports."""

    find_split(data, "train")
    test = find_split(data, "val")
    by_name = {n.name: n for n in preset.members()}
    out.mkdir(parents=True, exist_ok=True)
    done = Trained({}, [], {"training": 0.0, "evaluation": 0.0})
    for net in order:
        run_dir = done.run_dirs[net.name] = train_net(net, by_name, preset, data, out, device, progress)
        done.seconds["training"] += sum(r["seconds"] for r in _epochs(run_dir))
        protocols = ("dense", "multicrop", "dense+multicrop") if net.jittered else preset.fixed_protocols
        rows, spent = evaluate_net(net.name, run_dir, test, protocols, preset.limit_test, out, device, progress)
        done.seconds["evaluation"] += spent
        done.measured.extend(rows)
    return done


def shard_of(preset: Preset, part: int, parts: int) -> list[Net]:
    """The nets of part ``part`` (1-based) of ``parts``: those whose seed is ``part - 1`` modulo
    ``parts``. A replica's parent has its seed, so each part trains on its own; several processes
    (one per core) train a seeded reproduction side by side into the same ``--out``."""
    return [net for net in preset.members() if net.seed % parts == part - 1]


def reproduce(data: Path, preset: Preset, preset_name: str, out: Path, device: str = "auto",
              progress: bool = True, command: str = "") -> Reproduction:
    """Train every net of ``preset`` (nets already trained, for instance by ``--shard`` processes, are
    read back), evaluate each with the paper's protocols, fuse, report."""
    order = preset.members()
    nets = sorted(order, key=lambda n: ([m.name for m in NETS].index(n.base), n.seed))  # the tables' order
    done = train_and_measure(order, preset, data, out, device, progress)
    measured = done.measured + fusions(done.measured, nets)
    tables = paper_tables(measured, nets, preset)
    checked = claims(measured, nets, preset)
    plot(done.run_dirs, measured, nets, preset, out)
    trained = [net_record(net, done.run_dirs[net.name], measured, preset) for net in nets]
    markdown = report_markdown(preset_name, preset, data, tables, checked, trained, done.seconds, device, command)
    atomic_write(out / "REPRODUCTION.md", lambda tmp: Path(tmp).write_text(markdown))
    result = Reproduction(preset_name, preset, tables, checked, trained, done.seconds, markdown)
    text = json.dumps(result.to_dict(), indent=1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    return result


@dataclass(frozen=True)
class NetRecord:
    """One trained net as ``results.json`` lists it: where it started, how its training ended (the
    change of training loss and validation error over its last three epochs says whether it was
    flat), the images it was trained and validated on, and its test errors at Q = S."""

    name: str
    config: str
    seed: int
    init_from: str | None
    epochs: int
    final_lr: float
    final_train_loss: float
    train_loss_change_last3: float | None
    val_error_change_last3: float | None
    training: dict[str, Any]
    validation: dict[str, Any]
    test_top1_error: float | None
    test_top5_error: float | None


def net_record(net: Net, run_dir: Path, measured: list[Measured], preset: Preset) -> NetRecord:
    """``net``'s :class:`NetRecord` from its run directory and its rows."""
    record = json.loads((run_dir / "recipe.json").read_text())
    epochs = _epochs(run_dir)
    losses = [r["train_loss"] for r in epochs]
    errors = [100 - r["val_top1"] for r in epochs if r.get("val_top1") is not None]
    row = _find(measured, [net.name], "dense", _single_scale(net, preset))
    start = record.get("weights") or record.get("init_from")  # runs recorded before --weights started every net
    return NetRecord(net.name, net.config, net.seed, start, len(epochs), epochs[-1]["lr"],
                     losses[-1], _change_last3(losses), _change_last3(errors),
                     {**record.get("training", {}),
                      "excluding": "the validation images" if record.get("val_split") else None},
                     record.get("validation", {}), row and 100 * row.row.top1_error,
                     row and 100 * row.row.top5_error)


def _change_last3(values: list[float]) -> float | None:
    """The change over the last three epochs (last minus three before it); None when shorter."""
    return values[-1] - values[-4] if len(values) >= 4 else None


def shard(value: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N."""
    part, _, parts = value.partition("/")
    if not (part.isdigit() and parts.isdigit() and 1 <= int(part) <= int(parts)):
        raise argparse.ArgumentTypeError(f"must be K/N with 1 <= K <= N (e.g. 1/2); got {value!r}")
    return int(part), int(parts)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reproduce", help="the paper's ablations (Tables 3-6) at a scale this machine allows")
    p.add_argument("--data", required=True, help="dataset root with train/ and val/ (or test/)")
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--out", type=output_dir, default=None, help="output directory (default runs/reproduce-PRESET)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="paper: each net from its parent as in Sec. 3.1 (default); scratch: every net from random "
                        "weights")
    p.add_argument("--budget", type=positive_int, default=None,
                   help="at most this many epochs per net (every net the same)")
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
    p.add_argument("--milestones", type=parse_milestones, default=None,
                   help="a fixed schedule: lr / 10 after each of these comma-separated epochs, instead of the "
                        "plateau rule")
    p.add_argument("--shard", type=shard, default=None,
                   help="K/N: train and evaluate only the nets whose seed is K-1 modulo N, without the report; run "
                        "N such processes side by side into one --out, then the same command without --shard")
    p.add_argument("--nets", default=None, help=f"comma-separated subset of {','.join(n.name for n in NETS)} "
                                                "(under --protocol paper their parents are trained too)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="train on a class-balanced subset of N images")
    p.add_argument("--limit-test", type=positive_int, default=None, help="test on a class-balanced subset of N images")
    add_workers(p)
    add_device(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    changes = {"epochs": args.budget, "finetune_epochs": args.finetune_budget, "stop_patience": args.stop_patience,
               "seeds": args.seeds, "protocol": args.protocol, "width": args.width, "batch_size": args.batch_size,
               "limit_train": args.limit_train, "limit_test": args.limit_test, "workers": args.workers,
               "val_split": args.val_split, "milestones": args.milestones and tuple(args.milestones)}
    preset = replace(PRESETS[args.preset], **{k: v for k, v in changes.items() if v is not None})
    if preset.val_split is not None:
        preset = replace(preset, limit_val=None)  # the held-out training images are the validation set
    if preset.milestones and max(preset.milestones) >= preset.epochs:
        raise UserError(f"--milestones {','.join(map(str, preset.milestones))}: each must be below the epoch budget "
                        f"{preset.epochs} (--budget)")
    if args.nets is not None:
        wanted = tuple(dict.fromkeys(n.strip() for n in args.nets.split(",") if n.strip()))
        unknown = [n for n in wanted if n not in {net.name for net in NETS}]
        if unknown or not wanted:
            named = f"unknown {', '.join(unknown)}" if unknown else "no net named"
            raise UserError(f"--nets: {named}; choose from {', '.join(n.name for n in NETS)}")
        preset = replace(preset, nets=wanted)
    out = Path(args.out or f"runs/reproduce-{args.preset}")
    if args.shard is not None:
        part, parts = args.shard
        done = train_and_measure(shard_of(preset, part, parts), preset, Path(args.data), out, args.device,
                                 not args.no_progress)
        print(f"shard {part}/{parts}: trained and evaluated {', '.join(done.run_dirs) or 'no net'} in {out}; "
              "the same command without --shard writes the report")
        return
    command = "verydeep " + " ".join(sys.argv[1:])
    result = reproduce(Path(args.data), preset, args.preset, out, args.device, not args.no_progress, command)
    print(result.markdown)
