"""Localisation's scoring (Appendix A): the ILSVRC criterion, a box right when its IoU with a
ground-truth box is above 0.5, and OverFeat's greedy merging of boxes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from verydeep.data.boxes import iou

#: A box is right when its IoU with a ground-truth box is above this (the ILSVRC criterion).
IOU_RIGHT = 0.5
#: How far the IoU of boxes in a crop's pixels (protocol 1's, float64) may be from the IoU of the same boxes in
#: the image's: the crop's scaling leaves an IoU as it is, its rounding moves it by some 1e-15, so that an IoU of
#: exactly 0.5 (the whole image against a box of half its width and all its height) could count as above.
CROP_ROUNDING = 1e-9


def wrong(predicted: Tensor, truth: Tensor) -> Tensor:
    """Per image, whether box ``predicted`` (N, 4) has IoU <= 0.5 with every box of ``truth`` (N, M, 4), rows of
    NaN being padding, both in a crop's pixels: an IoU within :data:`CROP_ROUNDING` of 0.5 is the image's 0.5."""
    valid = ~truth.isnan().any(-1)
    boxes = truth.double().nan_to_num(0)
    overlaps = torch.stack([iou(p[None], t)[0] for p, t in zip(predicted.double(), boxes, strict=True)])
    return ~((overlaps > IOU_RIGHT + CROP_ROUNDING) & valid).any(dim=1)


def ilsvrc_wrong(predictions: Sequence[tuple[int, Tensor]], truth: Sequence[tuple[int, Tensor]]) -> bool:
    """The ILSVRC localisation criterion: wrong unless one of the top-5 ``(class, box)`` predictions
    has the class of a ground-truth ``(class, box)`` and IoU > 0.5 with its box."""
    return not any(label == true_label and float(iou(box[None], true_box[None])) > IOU_RIGHT
                   for label, box in predictions[:5] for true_label, true_box in truth)


def merge_greedily(boxes: Tensor, scores: Tensor, threshold: float = IOU_RIGHT) -> tuple[Tensor, Tensor]:
    """OverFeat's greedy merge (Sermanet et al., 2014), as Appendix A uses it: while the two closest
    boxes (the highest IoU) overlap by at least ``threshold``, replace them by the average of their
    coordinates, scored by the sum of their scores. Returns the boxes and scores, best first."""
    boxes, scores = boxes.float().clone(), scores.float().clone()
    while len(boxes) > 1:
        overlaps = iou(boxes, boxes).fill_diagonal_(-1.0)
        best = int(overlaps.argmax())
        i, j = divmod(best, len(boxes))
        if overlaps[i, j] < threshold:
            break
        keep = [k for k in range(len(boxes)) if k not in (i, j)]
        boxes = torch.cat([boxes[keep], ((boxes[i] + boxes[j]) / 2)[None]])
        scores = torch.cat([scores[keep], (scores[i] + scores[j])[None]])
    order = scores.argsort(descending=True)
    return boxes[order], scores[order]
