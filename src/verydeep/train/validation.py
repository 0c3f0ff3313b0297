"""Validation (Sec. 3.1): the task's metrics over the validation images, whose first decides the schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from verydeep.errors import UserError
from verydeep.nn.tasks import Task
from verydeep.runtime.precision import autocast
from verydeep.train.step import Stepper


@torch.no_grad()
def validate(model: torch.nn.Module, stepper: Stepper, loader: DataLoader, task: Task, device: torch.device,
             dtype: torch.dtype | None, source: Any) -> dict[str, float]:
    """The task's validation metrics over the validation images of ``loader`` (``source``: their folder), one
    central crop each, with the ``images`` they were computed on and the ``skipped`` (unreadable) ones."""
    model.eval()
    sums = [0.0] * len(task.metrics)
    seen = skipped = 0
    for batch, _ in stepper.batches((loaded, None) for loaded in loader):
        skipped += len(batch.skipped)
        if batch.images.shape[0] == 0:
            continue
        with autocast(device, dtype):
            outputs = model(stepper.input(batch)).float()
        batch_sums = task.metric_sums(outputs, task.targets(batch, device))
        sums = [a + b for a, b in zip(sums, batch_sums, strict=True)]
        seen += batch.images.shape[0]
    model.train()
    *sums, seen, skipped = stepper.reduce(*sums, seen, skipped)
    if not seen:  # a metric over no image would read as a perfect (or the worst) score
        raise UserError(f"{source}: no validation image could be read ({int(skipped)} unreadable)")
    return {**task.summarise(sums, int(seen)), "images": int(seen), "skipped": int(skipped)}


def describe(metrics: dict[str, float], task: Task) -> str:
    """The epoch's line about validation: each metric, on how many images."""
    if not metrics:
        return "not validated"
    values = ", ".join(f"val {name} {metrics[name]:.4g}" for name in task.metrics)
    unreadable = f" ({metrics['skipped']} unreadable)" if metrics["skipped"] else ""
    return f"{values} on {metrics['images']} images{unreadable}"


def score(task: Task, value: float | None) -> float | None:
    """The schedule's score (higher is better) of the task's first validation metric."""
    if value is None:
        return None
    return value if task.higher_is_better else -value
