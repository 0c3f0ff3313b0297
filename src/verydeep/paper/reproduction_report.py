"""The reproduction's report (Sec. 4, Tables 3-6): the paper's tables with our errors beside its
figures, each net as it ended its training, and ``REPRODUCTION.md`` (settings, nets, tables, claims).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from verydeep.eval.rows import EvalRow, PaperFigures
from verydeep.paper import report
from verydeep.paper.claims import Claim
from verydeep.paper.figures import scale_text
from verydeep.paper.measure import Measured, find_row, single_scale
from verydeep.paper.presets import Net, Preset
from verydeep.paper.report import Column, Row, Table
from verydeep.paper.train_nets import epochs_of
from verydeep.runtime.device import machine, pick_device
from verydeep.train.recipe import stored_settings


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
        found = find_row(measured, [net.name], "dense", q)
        if found is None:
            return None
        train = f"{scale_text(*preset.scale(net.scale))} ({net.paper_net.scale})"
        return [net.name, train, ",".join(map(str, found.row.scales))], beside_paper(found.row, table, [net])

    single = [entry for net in nets if (entry := by_scale(3, single_scale(net, preset), net))]
    multi = [entry for net in nets if (entry := by_scale(4, None, net))]
    methods = [([net.name, protocol], beside_paper(found.row, 5, [net]))
               for net in nets if find_row(measured, [net.name], "multicrop")
               for protocol in ("dense", "multicrop", "dense+multicrop")
               if (found := find_row(measured, [net.name], protocol)) is not None]
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
    record = stored_settings(run_dir)  # the run record, else its copy in the last checkpoint
    epochs = epochs_of(run_dir)
    losses = [r["train_loss"] for r in epochs]
    errors = [100 - r["val_top1"] for r in epochs if r.get("val_top1") is not None]
    row = find_row(measured, [net.name], "dense", single_scale(net, preset))
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
    seeded = sorted({n.base for n in preset.members() if n.seed > 0})  # the nets trained again
    deeper = set(preset.nets) - {"A", "A-LRN"}  # the nets the paper starts from others' weights
    start = ("the paper's (Sec. 3.1): A and A-LRN from random weights, B-E from A's first four convs and FC6-8, "
             f"S = 384 from S = 256 and the jittered nets from S = 384 at lr {preset.finetune_lr:g} for at most "
             f"{preset.finetune_epochs} epochs" if preset.protocol == "paper" and deeper
             else "every net from random weights")
    by_name = {n.name: n for n in preset.members()}
    fine_tuned = f" ({preset.finetune_epochs} for a net fine-tuned at another S)" \
        if any(preset.fine_tuned(n, by_name) for n in by_name.values()) else ""
    stop = f"; a net stops once validation has not improved for {preset.stop_patience} epochs" \
        if preset.stop_patience else ""
    schedule = (f"lr {preset.lr:g} divided by 10 after epochs {', '.join(map(str, preset.milestones))} (a fixed "
                "schedule)" if preset.milestones else
                f"lr {preset.lr:g} divided by 10 when validation top-1 has not improved for {preset.patience} "
                "epochs (at most 3 times, Sec. 3.1)")
    validation = (f"{preset.val_split} class-balanced training images held out by each net's seed (not trained on; "
                  "no test image decides anything)" if preset.val_split else
                  (f"at most {preset.limit_val} class-balanced" if preset.limit_val else "all the") + " test images")
    return [
        f"- data: `{data}`; command: `{command}`",
        f"- hardware: {_hardware(device)}; compute time {total / 60:.1f} min, summed over the nets (not wall "
        f"time: shards run side by side) ({', '.join(f'{k} {v / 60:.1f}' for k, v in seconds.items())} min)",
        f"- every net: width x{preset.width:g}, crop {preset.crop} (the paper's 224 x {preset.crop / 224:.3f}), "
        f"at most {preset.epochs} epochs{fine_tuned}, batch {preset.batch_size}, SGD momentum 0.9, weight decay "
        "5e-4, dropout "
        f"0.5, {schedule}{stop}, init `{preset.init}`, no batch norm",
        f"- protocol `{preset.protocol}`: {start}; validation on {validation}",
        f"- seeds: {preset.seeds} ({', '.join(seeded)} trained {preset.seeds} times; a replica starts from "
        "its own seed's parent, so replicas share no training)" if seeded else "- seeds: 1",
        f"- training scales: S = 256 -> {preset.scale((256, 256))[0]}, 384 -> {preset.scale((384, 384))[0]}, "
        f"[256; 512] -> {list(preset.scale((256, 512)))}; test scales from each recipe ({{S-32, S, S+32}} or "
        f"{{Smin, mid, Smax}}, scaled); errors on "
        + (f"at most {preset.limit_test} (class-balanced) test images (the claims below give how many)"
           if preset.limit_test else "all test images"),
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
