"""The paper's claims (Sec. 4) judged at the reproduction's scale: each by the paired test of the
winner's and the loser's rows on the same test images, and over every seed where both nets were
trained more than once, with the spread over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from verydeep.eval.metrics import PairedDifference
from verydeep.paper.measure import Measured, find_row, paired, replicas, single_scale
from verydeep.paper.presets import Net, Preset


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


def seed_spread(better: str, worse: str, nets: list[Net], row_of: RowOf) -> str:
    """The spread over seeds: of the difference where both nets have replicas of the same seeds, else of
    the error of whichever has replicas. ``row_of(name)`` finds a net's row. Empty with one seed."""
    def errors(name: str) -> dict[int, float]:
        return {n.seed: 100 * m.row.top1_error for n in replicas(name, nets) if (m := row_of(n.name)) is not None}

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
        return find_row(measured, [name], "dense", single_scale(by_name[name], preset)) if name in by_name else None

    def multi(name: str, protocol: str = "dense") -> Measured | None:
        return find_row(measured, [name], protocol) if name in by_name else None

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
    pairs = [(a, b) for x in replicas(better, nets) for y in replicas(worse, nets)
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
