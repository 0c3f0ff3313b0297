"""Classification metrics shared by training's validation, ``verydeep eval`` and ``reproduce`` (Sec. 4).

Top-k ties: an image whose true class ties with others counts as the chance that it is among the
first k when the tied classes are put in a random order, so a tie neither flatters nor penalises a net
(a row of C equal scores is 1/C correct at top-1). Ties are common in bf16 outputs, whose 8-bit
mantissa rounds near scores together; counting them for the true class would understate the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def topk_correct(posteriors: Tensor, targets: Tensor, k: int) -> Tensor:
    """Per image (float64), whether the true class is among the top ``k``: 1 when fewer than ``k`` classes
    score at least as high, 0 when ``k`` or more score strictly higher, and the chance of a random order of
    the tied classes between (module docstring)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a whole number of at least 1; got {k!r}")
    true_score = posteriors.gather(1, targets.view(-1, 1).long())
    higher = (posteriors > true_score).sum(dim=1)
    tied = (posteriors == true_score).sum(dim=1)  # the true class among them, unless its score is NaN
    hits = ((k - higher) / tied.clamp(min=1)).clamp(0, 1).double()
    return hits.masked_fill(tied == 0, 0.0)  # a NaN true score is no hit


def topk_error(posteriors: Tensor, targets: Tensor, k: int) -> float:
    """Fraction of images whose true class is not in the top ``k`` (see :func:`topk_correct` for ties); over no
    image there is none (a :class:`ValueError`)."""
    if len(targets) == 0:
        raise ValueError("a top-k error over no image")
    return 1.0 - topk_correct(posteriors, targets, k).mean().item()


def per_class_accuracy(posteriors: Tensor, targets: Tensor, num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class (None for a class with no images)."""
    correct = topk_correct(posteriors, targets, 1)
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, targets, correct)
    counts = torch.bincount(targets, minlength=num_classes)
    return [float(h / c) if c else None for h, c in zip(hits.tolist(), counts.tolist(), strict=True)]


@dataclass(frozen=True)
class PairedDifference:
    """Two nets judged on the same images: the mean per-image difference of their top-1 errors (``b``
    minus ``a``, in percentage points: positive when ``a`` is better) and its standard error."""

    difference: float
    standard_error: float
    images: int

    @property
    def margin(self) -> float:
        """Two standard errors: a difference beyond it is unlikely to be chance (about 95%)."""
        return 2 * self.standard_error

    @property
    def significant(self) -> bool:
        return abs(self.difference) > self.margin


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> PairedDifference:
    """Paired comparison of two nets' top-1 correctness on the same images (in the same order).

    Per image ``d = error_b - error_a`` is -1, 0 or 1 (between for a tie, as :func:`topk_correct` counts
    it); the test is on the mean of ``d`` with the standard error ``std(d) / sqrt(n)``. Images both nets
    get right (or wrong) add no variance, so this is tighter than comparing two binomial error rates as
    if the test sets were independent.
    """
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"paired test needs two equal-length vectors of at least 2 images; got {a.shape}, {b.shape}")
    d = a - b  # error_b - error_a = correct_a - correct_b
    return PairedDifference(100 * float(d.mean()), 100 * float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size))
