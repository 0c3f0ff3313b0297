"""Classification metrics shared by training's validation and ``verydeep eval`` (Sec. 4).

Top-k ties: an image counts as correct at k when fewer than k classes score *strictly* higher
than the true class (ties go to the true class, so a row of equal scores is correct at top-1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_correct(posteriors: Tensor, targets: Tensor, k: int) -> Tensor:
    """Per image, whether the true class is among the top ``k``: fewer than ``k`` classes score strictly higher."""
    true_score = posteriors.gather(1, targets.view(-1, 1))
    return (posteriors > true_score).sum(dim=1) < k


def topk_error(posteriors: Tensor, targets: Tensor, k: int) -> float:
    """Fraction of images whose true class is not in the top ``k`` (see :func:`topk_correct` for ties)."""
    return (~topk_correct(posteriors, targets, k)).double().mean().item()


def per_class_accuracy(posteriors: Tensor, targets: Tensor, num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class (None for a class with no images)."""
    correct = topk_correct(posteriors, targets, 1).double()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, targets, correct)
    counts = torch.bincount(targets, minlength=num_classes)
    return [float(h / c) if c else None for h, c in zip(hits.tolist(), counts.tolist(), strict=True)]
