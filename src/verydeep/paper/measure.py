"""The reproduction's measurements (Sec. 3.2, 4.4): each net's rows of errors with their per-image
posteriors on the test images (evaluated once, then read from the cache), the fusion of nets by
averaging posteriors (Table 6), the paired difference of two rows on their common images, and the
lookup of a net's row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from verydeep.errors import UserError
from verydeep.eval.evaluate import evaluate, write_outputs
from verydeep.eval.metrics import PairedDifference, paired_difference, topk_correct
from verydeep.eval.posteriors_file import load_posteriors
from verydeep.eval.rows import EvalRow, fuse_rows, measured_figures
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
        """Per image, right at top-1, 0 to 1 (ties as :func:`verydeep.eval.metrics.topk_correct`)."""
        return topk_correct(torch.from_numpy(self.posteriors), torch.from_numpy(self.targets), 1).numpy()


def evaluate_net(name: str, run_dir: Path, data: Path, protocols: tuple[str, ...], limit: int | None, out: Path,
                 device: str, workers: int, progress: bool) -> tuple[list[Measured], float]:
    """One net's rows under ``protocols`` at its recipe's scales, with their posteriors, and the
    evaluation's wall time (s), read by ``workers`` loader processes; cached in ``out/eval/NAME/`` as ``eval
    --out`` writes them, each row's posteriors kept (float32, as computed)."""

    cache = out / "eval" / name
    if not ((cache / "results.json").is_file() and (cache / "posteriors.npz").is_file()):
        result = evaluate([str(run_dir)], str(data), protocols=protocols, limit=limit, device=device,
                          workers=workers, progress=progress, keep_posteriors=True)
        write_outputs(result, cache, rows=True)  # the posteriors last, whole: both files mean a finished evaluation
    return read_cached(cache, name)


def read_cached(cache: Path, name: str) -> tuple[list[Measured], float]:
    """The rows of a cached evaluation, their errors scored again from the posteriors kept (the numbers in
    ``results.json`` are not trusted: only its rows' names and protocols, and its time); a damaged cache is
    a :class:`UserError` naming the file."""
    path = cache / "results.json"

    def damaged(why: str) -> UserError:
        return UserError(f"{path}: damaged cached evaluation ({why}); delete {cache} to evaluate again")

    try:
        saved = json.loads(path.read_text())
        specs = [replace(EvalRow.from_dict(row), nets=[name]) for row in saved["rows"]]
        seconds = float(saved["timing"]["seconds"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise damaged(f"{type(error).__name__}: {error}") from None
    kept = load_posteriors(cache / "posteriors.npz")
    targets, paths = kept.targets[kept.readable], np.array(kept.paths)[kept.readable]
    lost = [spec.name for spec in specs if spec.name not in kept.rows]
    if not specs or lost or not len(targets):
        raise damaged(f"no posteriors of its row {lost[0]!r}" if lost else "no rows" if not specs
                      else "no readable test image")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise damaged(f"a time of {seconds} s")
    labels = torch.from_numpy(targets)
    return [Measured(replace(spec, **measured_figures(torch.from_numpy(kept.rows[spec.name]), labels)),
                     kept.rows[spec.name], targets, paths) for spec in specs], seconds


def fuse(members: Sequence[Measured]) -> Measured:
    """Sec. 4.4: separately evaluated nets' rows fused (:func:`verydeep.eval.rows.fuse_rows`) on the
    images common to all, aligned by path."""
    paths = members[0].paths
    for m in members[1:]:
        paths = paths[np.isin(paths, m.paths)]
    targets = members[0].targets[_positions(members[0].paths, paths)]
    row, posteriors = fuse_rows([(m.row, torch.from_numpy(m.posteriors[_positions(m.paths, paths)]))
                                 for m in members], torch.from_numpy(targets))
    return Measured(row, posteriors.numpy(), targets, paths)


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
    """Table 6: the paper's D + E (the jittered nets of seed 0) fused under each protocol they were evaluated
    with, and all the jittered nets of seed 0 where there are more (C too); and each seeded net fused with
    its replicas (dense, multi-scale): nets that share no training."""
    jittered = [n for n in nets if n.jittered and n.seed == 0]
    groups = [[n.name for n in jittered if n.config in ("D", "E")], [n.name for n in jittered]]
    groups = [group for i, group in enumerate(groups) if group not in groups[:i]]  # the pair may be all of them
    groups += [[n.name for n in replicas(n.name, nets)] for n in nets if n.seed == 0]
    out = []
    for group in (g for g in groups if len(g) > 1):
        for protocol in ("dense", "multicrop", "dense+multicrop"):
            members = [find_row(measured, [name], protocol) for name in group]
            if all(members):
                out.append(fuse(members))
    return out
