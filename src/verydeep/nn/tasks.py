"""What the trainer teaches a net: its head, targets, loss and validation metric.

The training loop (:mod:`verydeep.train`) knows SGD, schedules, micro-batches, processes and
checkpoints, not what is being learnt; a :class:`Task` supplies that. Classification (Sec. 3.1:
softmax cross-entropy, top-1/top-5 on validation) is the paper's first task; box regression
(Appendix A) plugs in the same way.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from verydeep.data.batches import Batch
from verydeep.data.datasets import ImageFolder, LabelledImages, Transform, find_split
from verydeep.data.splits import open_split
from verydeep.eval.metrics import topk_correct


class Task(ABC):
    """One learning problem. Losses and metric sums are over a batch's images; the trainer divides by
    the images of the global batch or of the whole validation set."""

    #: Recorded in the run record, so that a resumed run can check it is the same task.
    name: str
    #: Validation metrics, logged as ``val_<name>``; the first decides the schedule and the best checkpoint.
    metrics: tuple[str, ...]
    #: Whether a larger first metric is better.
    higher_is_better: bool = True

    @abstractmethod
    def outputs(self, num_classes: int) -> int:
        """Outputs of the net's last layer (FC8) for a dataset of ``num_classes`` classes."""

    @abstractmethod
    def targets(self, batch: Batch, device: torch.device) -> Tensor:
        """What the net should predict for each image of ``batch``, on ``device``."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The summed loss of a batch (fp32 outputs)."""

    @abstractmethod
    def metric_sums(self, outputs: Tensor, targets: Tensor) -> list[float]:
        """Per metric, its sum over the batch's images."""

    def open_splits(self, data: str, train: Transform, val: Transform | None
                    ) -> tuple[LabelledImages, LabelledImages | None]:
        """The training and validation splits of the dataset at ``data``, read through ``train`` and ``val``
        (class folders; a task may add what its targets need, such as object boxes); with ``val`` None the
        training split alone (validation is then held out of it: :meth:`held_out`)."""
        train_set = ImageFolder(find_split(data, "train"), train)
        return train_set, None if val is None else open_split(find_split(data, "val"), val)

    def fit(self, train_set: LabelledImages, indices: Sequence[int]) -> None:  # noqa: B027 (a hook)
        """Learn what the targets need from the images training reads, ``train_set``'s at ``indices`` (once
        ``--val-split`` and ``--limit-train`` have taken theirs out); by default nothing."""

    def held_out(self, train_set: LabelledImages, val: Transform) -> LabelledImages:
        """The training images read as validation reads them, through ``val`` (``--val-split``)."""
        held = copy.copy(train_set)
        held.transform = val
        return held

    def summarise(self, sums: list[float], images: int) -> dict[str, float]:
        """The validation metrics from their sums over ``images`` images."""
        if images <= 0:
            raise ValueError("validation metrics over no image")
        return {name: total / images for name, total in zip(self.metrics, sums, strict=True)}

    def record(self) -> dict[str, Any]:
        """What the task adds to the run record once its splits are open (e.g. the annotations it read)."""
        return {}


class Classification(Task):
    """Sec. 3.1: softmax over the classes, multinomial logistic regression; validation top-1 and top-5
    accuracy in % (ties counted as :func:`verydeep.eval.metrics.topk_correct` does)."""

    name = "classification"
    metrics = ("top1", "top5")

    def outputs(self, num_classes: int) -> int:
        return num_classes

    def targets(self, batch: Batch, device: torch.device) -> Tensor:
        return batch.labels.to(device, non_blocking=True)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="sum")

    def metric_sums(self, outputs: Tensor, targets: Tensor) -> list[float]:
        return [100.0 * float(topk_correct(outputs, targets, k).sum()) for k in (1, 5)]
