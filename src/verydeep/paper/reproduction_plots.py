"""The reproduction's plots (Sec. 4): ``learning_curves.png`` (every net's training loss and
validation error per epoch) and ``errors.png`` (the top-1 test error of every row of Tables 3-6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from verydeep.paper.measure import Measured, find_row, single_scale
from verydeep.paper.plot import error_bars
from verydeep.paper.presets import Net, Preset
from verydeep.paper.train_nets import epochs_of


def plot(run_dirs: dict[str, Path], measured: list[Measured], nets: list[Net], preset: Preset,
         out: Path) -> list[Path]:
    """``learning_curves.png`` (validation error per epoch, every net) and ``errors.png`` (test errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = {n.name: n.seed for n in nets}
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run_dir in run_dirs.items():
        epochs = epochs_of(run_dir)
        x = [r["epoch"] for r in epochs]
        style = "o--" if seeds.get(name) else "o-"  # a marker each epoch: one epoch is a point, not nothing
        loss_ax.plot(x, [r["train_loss"] for r in epochs], style, label=name)
        err_ax.plot(x, [100 - r["val_top1"] if r.get("val_top1") is not None else None for r in epochs], style,
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


#: ``errors.png``'s bars, in the order of the tables that report them (a net's in Tables 3, 4, 5 and 5, a fusion's in
#: Table 6): (protocol, at one test scale, legend).
ERROR_BARS = (("dense", True, "dense, single scale"), ("dense", False, "dense, multi-scale"),
              ("multicrop", False, "multi-crop, multi-scale"),
              ("dense+multicrop", False, "dense + multi-crop, multi-scale"))


def error_groups(measured: list[Measured], nets: list[Net], preset: Preset) -> list[tuple[str, dict[str, float]]]:
    """Every row of Tables 3 to 6 as ``(group, {legend: top-1 error %})``: a group per net with its
    protocols, then a group per fusion (Table 6) with the protocols it was fused under."""
    groups: dict[str, dict[str, float]] = {}
    for net in nets:
        for protocol, single, legend in ERROR_BARS:
            found = find_row(measured, [net.name], protocol, single_scale(net, preset) if single else None)
            if found is not None:
                groups.setdefault(net.name, {})[legend] = 100 * found.row.top1_error
    multi_scale = {protocol: legend for protocol, single, legend in ERROR_BARS if not single}
    for fused in (m for m in measured if m.row.fusion and m.row.protocol in multi_scale):
        group = groups.setdefault(f"{' + '.join(fused.row.nets)} (fused, Table 6)", {})
        group[multi_scale[fused.row.protocol]] = 100 * fused.row.top1_error
    return list(groups.items())


def errors_figure(measured: list[Measured], nets: list[Net], preset: Preset) -> Any:
    """``errors.png``'s figure: the top-1 test error of every row of Tables 3 to 6, as bars from zero."""
    return error_bars(error_groups(measured, nets, preset), [legend for *_, legend in ERROR_BARS],
                      "top-1 test error: each net's rows of Tables 3 to 5, each fusion's of Table 6")


def _plot_errors(measured: list[Measured], nets: list[Net], preset: Preset, out: Path) -> Path:
    errors = out / "errors.png"
    errors_figure(measured, nets, preset).savefig(errors, dpi=120)
    return errors
