"""The one place a ``DataLoader`` is built: every command reads its images through :func:`image_loader`.

Batches are given whole (a list of index lists, or a batch sampler), so that training's global
batches, evaluation's size-grouped batches and the subsets of the other commands all cut the data
the same way; worker seeds come from a generator of their own, never from the process's RNG, so
that reading images draws nothing that training or evaluation would otherwise draw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def image_loader(dataset: Dataset, batches: Iterable[list[int]] | None, workers: int,
                 collate_fn: Callable[[list[Any]], Any] | None = None, device: torch.device | None = None,
                 persistent: bool = False, prefetch: int | None = None) -> DataLoader:
    """A loader of ``dataset`` in ``batches`` (``None``: one item at a time, as the dataset returns
    it) with ``workers`` processes; pinned memory for a CUDA ``device``; workers kept between epochs
    when ``persistent``; ``prefetch`` batches read ahead per worker (PyTorch's default when ``None``)."""
    many = workers > 0
    return DataLoader(dataset, batch_sampler=batches, batch_size=None if batches is None else 1,
                      num_workers=workers, collate_fn=collate_fn,
                      pin_memory=device is not None and device.type == "cuda",
                      persistent_workers=persistent and many, prefetch_factor=prefetch if many else None,
                      generator=torch.Generator())
