"""The reproduction's measurements (Sec. 3.2, 4.4): each net's rows of errors with their per-image
posteriors on the test images (evaluated once, then read from the cache), the fusion of nets by
averaging posteriors (Table 6), the paired difference of two rows on their common images, and the
lookup of a net's row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from verydeep.eval.evaluate import evaluate
from verydeep.eval.metrics import PairedDifference, paired_difference, topk_correct, topk_error
from verydeep.eval.rows import EvalRow
from verydeep.io.jsonable import to_json_dict
from verydeep.paper.figures import single_test_scale
from verydeep.paper.presets import Net, Preset


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
        cache.write_text(json.dumps([to_json_dict(row) for row in rows], indent=1))
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


def find_row(measured: list[Measured], nets: list[str], protocol: str, q: int | None = None) -> Measured | None:
    """The row of ``protocol`` for exactly these nets: at scale ``q``, or over all their scales."""
    for m in measured:
        row = m.row
        if row.protocol == protocol and row.nets == nets:
            if (q is None and (row.multi_scale or row.fusion)) or row.scales == [q]:
                return m
    return None


def single_scale(net: Net, preset: Preset) -> int:
    """The test scale of ``net``'s Table 3 row at this preset: Q = S, or the midpoint of a jittered S."""
    return single_test_scale(*preset.scale(net.scale))


def replicas(name: str, nets: list[Net]) -> list[Net]:
    """``name`` and its seed replicas, by seed."""
    return sorted((n for n in nets if n.base == name), key=lambda n: n.seed)


def fusions(measured: list[Measured], nets: list[Net]) -> list[Measured]:
    """Table 6: the jittered nets of seed 0 fused under each protocol they were evaluated with (the
    paper's D + E), and each seeded net fused with its replicas (dense, multi-scale): nets that share
    no training."""
    groups = [[n.name for n in nets if n.jittered and n.seed == 0]]
    groups += [[n.name for n in replicas(n.name, nets)] for n in nets if n.seed == 0]
    out = []
    for group in (g for g in groups if len(g) > 1):
        for protocol in ("dense", "multicrop", "dense+multicrop"):
            members = [find_row(measured, [name], protocol) for name in group]
            if all(members):
                out.append(fuse(members))
    return out
