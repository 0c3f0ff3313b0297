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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from verydeep.evaluate import PAPER_RESULTS
from verydeep.plot import read_metrics


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
    def paper_scale(self) -> str:
        """The training scale as ``evaluate.PAPER_RESULTS`` keys it: ``256`` or ``[256;512]``."""
        return f"[{self.scale[0]};{self.scale[1]}]" if self.jittered else str(self.scale[0])


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


PRESETS: dict[str, Preset] = {
    "cifar10": Preset(crop=32, width=0.5, epochs=20,
                      nets=("D-jitter", "E-jitter", "A", "A-LRN", "B", "C", "D", "E")),
    "imagenette": Preset(crop=112, width=0.25, epochs=30, batch_size=64),
    # the demo: 8x8 digits lose too much under S in [36, 73], so one net A at S = 36, all protocols
    "digits": Preset(crop=32, width=0.25, epochs=12, batch_size=32, nets=("A",),
                     fixed_protocols=("dense", "multicrop", "dense+multicrop")),
}


def train_net(net: Net, preset: Preset, data: Path, out: Path, device: str, progress: bool) -> tuple[Path, float]:
    """Train one net (resuming an interrupted run); returns its run directory and seconds spent."""
    from verydeep.train import TrainConfig, train

    run_dir = out / "nets" / net.name
    done = run_dir / "train_summary.json"
    if done.is_file():
        return run_dir, json.loads(done.read_text())["seconds"]
    cfg = TrainConfig(
        data=str(data),
        config=net.config,
        scale=preset.scale(net.scale),
        crop=preset.crop,
        width=preset.width,
        epochs=preset.epochs,
        patience=preset.patience,
        batch_size=preset.batch_size,
        lr=preset.lr,
        init=preset.init,
        limit_train=preset.limit_train,
        limit_val=preset.limit_test,
        workers=preset.workers,
        device=device,
        out=str(run_dir),
        resume=(run_dir / "checkpoints" / "last.pt").is_file(),
        progress=progress,
    )
    start = time.time()
    summary = train(cfg)
    summary["seconds"] = summary.get("seconds", time.time() - start)
    done.write_text(json.dumps(summary, indent=1))
    return run_dir, summary["seconds"]



def evaluate_nets(run_dirs: dict[str, Path], data: Path, protocols: tuple[str, ...], limit: int | None,
                  out: Path, device: str, progress: bool) -> list[dict[str, Any]]:
    """Evaluate these nets together (each at its recipe's scales; fused when several); cached in ``out``.

    Returns the rows with each ``nets`` entry renamed to the reproduction's net names.
    """
    from verydeep.evaluate import evaluate

    cache = out / "eval" / ("+".join(run_dirs) + ".json")
    if cache.is_file():
        return json.loads(cache.read_text())
    result = evaluate([str(d) for d in run_dirs.values()], str(data), protocols=protocols, limit=limit,
                      device=device, progress=progress)
    names = dict(zip([n["name"] for n in result["nets"]], run_dirs, strict=True))
    rows = [{**row, "nets": [names[n] for n in row["nets"]]} for row in result["rows"]]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def _find(rows: list[dict[str, Any]], nets: list[str], protocol: str, q: int | None = None) -> dict | None:
    """The row of ``protocol`` for exactly these nets: at scale ``q``, or over all their scales."""
    for row in rows:
        if row["protocol"] == protocol and row["nets"] == nets:
            if (q is None and (row["multi_scale"] or row["fusion"])) or row["scales"] == [q]:
                return row
    return None


def _errors(row: dict[str, Any] | None) -> tuple[float, float] | None:
    return None if row is None else (100 * row["top1_error"], 100 * row["top5_error"])


def _cells(ours: tuple[float, float] | None, paper: tuple[float, float] | None) -> str:
    show = lambda e: "-" if e is None else f"{e[0]:.1f} / {e[1]:.1f}"  # noqa: E731
    return f" {show(ours)} | {show(paper)} |"


def paper_tables(rows: list[dict[str, Any]], nets: list[Net], preset: Preset) -> dict[str, dict[str, Any]]:
    """Tables 3-6: our top-1 / top-5 errors (%) beside the paper's, as ``{title: {rows, markdown}}``."""
    tables: dict[str, dict[str, Any]] = {}
    by_name = {n.name: n for n in NETS}
    head = "| ConvNet | train S (paper's) | test Q | top-1 / top-5 err. % (ours) | (paper, ILSVRC val) |"
    for title, multi, paper in (("Table 3: single test scale", False, PAPER_RESULTS["Table 3"]),
                                ("Table 4: multiple test scales", True, PAPER_RESULTS["Table 4"])):
        lines, found = [head, "|---|---|---|---|---|"], []
        for net in nets:
            smin, smax = preset.scale(net.scale)
            row = _find(rows, [net.name], "dense", None if multi else (smin + smax) // 2)
            if row is None:
                continue
            train = f"[{smin};{smax}]" if net.jittered else str(smin)
            test = ",".join(map(str, row["scales"]))
            lines.append(f"| {net.name} | {train} ({net.paper_scale}) | {test} |"
                         + _cells(_errors(row), paper.get((net.config, net.paper_scale))))
            found.append({"net": net.name, **row})
        tables[title] = {"rows": found, "markdown": "\n".join(lines)}
    lines, found = ["| ConvNet | evaluation method | top-1 / top-5 err. % (ours) | (paper) |", "|---|---|---|---|"], []
    for net in nets:
        for protocol in ("dense", "multicrop", "dense+multicrop") if _find(rows, [net.name], "multicrop") else ():
            row = _find(rows, [net.name], protocol)
            if row is not None:
                paper = PAPER_RESULTS["Table 5"].get((net.config, net.paper_scale, protocol))
                lines.append(f"| {net.name} | {protocol} |" + _cells(_errors(row), paper))
                found.append({"net": net.name, **row})
    tables["Table 5: dense vs multi-crop vs both (multi-scale)"] = {"rows": found, "markdown": "\n".join(lines)}
    lines, found = ["| fused nets | evaluation method | top-1 / top-5 err. % (ours) | (paper, D + E) |",
                    "|---|---|---|---|"], []
    for row in rows:
        if row["fusion"]:
            fused = sorted((by_name[n].config, by_name[n].paper_scale) for n in row["nets"])
            lines.append(f"| {' + '.join(row['nets'])} | {row['protocol']} |"
                         + _cells(_errors(row), PAPER_RESULTS["Table 6"].get((*fused, row["protocol"]))))
            found.append(row)
    tables["Table 6: fusion"] = {"rows": found, "markdown": "\n".join(lines)}
    return tables


def _standard_error(error_pct: float, images: int) -> float:
    """Binomial standard error (in %) of an error rate measured on ``images`` images."""
    p = error_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / images)


def _verdict(better: dict[str, Any] | None, worse: dict[str, Any] | None) -> tuple[str, str]:
    """Did ``better`` (the paper's winner) have a lower top-1 error than ``worse``? With the margin."""
    if better is None or worse is None:
        return "not measured", ""
    a, b = 100 * better["top1_error"], 100 * worse["top1_error"]
    noise = 2 * math.hypot(_standard_error(a, better["images"]), _standard_error(b, worse["images"]))
    figures = f"{a:.1f}% vs {b:.1f}% (difference {b - a:+.1f} pp, 2 s.e. = {noise:.1f} pp)"
    if abs(b - a) < noise:
        return "inconclusive (within noise)", figures
    return ("held" if a < b else "did not hold"), figures


def claims(rows: list[dict[str, Any]], nets: list[Net], preset: Preset) -> list[dict[str, str]]:
    """The paper's claims (Sec. 4), each checked on our figures with a two-standard-error margin."""
    names = {n.name for n in nets}

    def single(name: str) -> dict | None:  # single-scale dense at Q = S (or the jittered midpoint)
        if name not in names:
            return None
        smin, smax = preset.scale(next(n for n in nets if n.name == name).scale)
        return _find(rows, [name], "dense", (smin + smax) // 2)

    def multi(name: str, protocol: str = "dense") -> dict | None:
        return _find(rows, [name], protocol) if name in names else None

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
    fused = next((r for r in rows if r["fusion"] and r["protocol"] == "dense+multicrop"), None)
    if fused is not None:
        best = min((multi(n, "dense+multicrop") for n in fused["nets"]), key=lambda r: r["top1_error"])
        checks.append((f"Fusing two nets helps: {' + '.join(fused['nets'])} beats the better one", fused, best))
    out = []
    for claim, better, worse in checks:
        verdict, figures = _verdict(better, worse)
        if verdict != "not measured":
            out.append({"claim": claim, "verdict": verdict, "figures": figures})
    return out


def _epochs(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir)[1]


def plot(run_dirs: dict[str, Path], rows: list[dict[str, Any]], nets: list[Net], preset: Preset,
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
        smin, smax = preset.scale(net.scale)
        one, many = _find(rows, [net.name], "dense", (smin + smax) // 2), _find(rows, [net.name], "dense")
        if one is None:
            continue
        labels.append(net.name)
        single.append(100 * one["top1_error"])
        multi.append(100 * many["top1_error"] if many else float("nan"))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2), 4.5))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], single, width=0.4, label="dense, single scale (Table 3)")
    ax.bar([x + 0.2 for x in xs], multi, width=0.4, label="dense, multi-scale (Table 4)")
    fused = [r for r in rows if r["fusion"] and r["protocol"] == "dense+multicrop"]
    for r in fused:
        label = f"fusion {' + '.join(r['nets'])}, dense+multi-crop"
        ax.axhline(100 * r["top1_error"], color="k", linestyle="--", label=label)
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


def report_markdown(preset_name: str, preset: Preset, data: Path, nets: list[Net], tables: dict[str, Any],
                    checked: list[dict[str, str]], seconds: dict[str, float], device: str, command: str) -> str:
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
    for title, table in tables.items():
        lines += [f"## {title}", "", table["markdown"] if table["rows"] else "(no such nets in this run)", ""]
    lines += ["## The paper's claims at this scale", "",
              "A claim held when our error moved the paper's way by more than two standard errors of the "
              "difference (binomial, on the test images); within that margin it is inconclusive.", "",
              "| claim | verdict | top-1 error, ours (winner vs loser) |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['verdict']} | {c['figures']} |" for c in checked]
    lines += ["", "Plots: `learning_curves.png` (training loss and validation error per epoch), "
              "`errors.png` (test error per net, single vs multi-scale)."]
    return "\n".join(lines) + "\n"


def reproduce(data: Path, preset: Preset, preset_name: str, out: Path, device: str = "auto",
              progress: bool = True, command: str = "") -> dict[str, Any]:
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
    rows: list[dict[str, Any]] = []
    jittered = [n.name for n in order if n.jittered]
    for net in order:  # each net is evaluated as soon as it can be, so a cut-short run still reports
        run_dirs[net.name], _ = train_net(net, preset, data, out, device, progress)
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
    markdown = report_markdown(preset_name, preset, data, nets, tables, checked, seconds, device, command)
    (out / "REPRODUCTION.md").write_text(markdown)
    result = {"preset": preset_name, "settings": asdict(preset), "tables": tables, "claims": checked,
              "seconds": seconds, "markdown": markdown}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reproduce", help="the paper's ablations (Tables 3-6) at a scale this machine allows")
    p.add_argument("--data", required=True, help="dataset root with train/ and val/ (or test/)")
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce-PRESET)")
    p.add_argument("--budget", type=int, default=None, help="epochs per net (the same for every net)")
    p.add_argument("--width", type=float, default=None, help="width multiplier of every net")
    p.add_argument("--nets", default=None, help=f"comma-separated subset of {','.join(n.name for n in NETS)}")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--limit-train", type=int, default=None, help="train on a class-balanced subset of N images")
    p.add_argument("--limit-test", type=int, default=None, help="test on a class-balanced subset of N images")
    p.add_argument("--workers", type=int, default=None, help="data loading processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    changes = {"epochs": args.budget, "width": args.width, "batch_size": args.batch_size,
               "limit_train": args.limit_train, "limit_test": args.limit_test, "workers": args.workers}
    preset = replace(preset, **{k: v for k, v in changes.items() if v is not None})
    if args.nets:
        wanted = tuple(n.strip() for n in args.nets.split(","))
        unknown = [n for n in wanted if n not in {net.name for net in NETS}]
        if unknown:
            raise ValueError(f"--nets: unknown {', '.join(unknown)}; choose from {', '.join(n.name for n in NETS)}")
        preset = replace(preset, nets=wanted)
    out = Path(args.out or f"runs/reproduce-{args.preset}")
    command = "verydeep " + " ".join(sys.argv[1:])
    result = reproduce(Path(args.data), preset, args.preset, out, args.device, not args.no_progress, command)
    print(result["markdown"])
