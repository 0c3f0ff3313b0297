"""The one place a ``DataLoader`` is built: every command reads its images through :func:`image_loader`.

Batches are given whole (a list of index lists, or a batch sampler), so that training's global
batches, evaluation's size-grouped batches and the subsets of the other commands all cut the data
the same way; worker seeds come from a generator of their own, never from the process's RNG, so
that reading images draws nothing that training or evaluation would otherwise draw. An unreadable
image is named once a process (:func:`~verydeep.data.datasets.report_skip`); the main process notes the
images each batch skipped, so that the workers of its next pass, forked from it, do not name them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from verydeep.data.datasets import note_reported


def image_loader(dataset: Dataset, batches: Iterable[list[int]] | None, workers: int,
                 collate_fn: Callable[[list[Any]], Any] | None = None, device: torch.device | None = None,
                 persistent: bool = False, prefetch: int | None = None) -> DataLoader:
    """A loader of ``dataset`` in ``batches`` (``None``: one item at a time, as the dataset returns
    it) with ``workers`` processes; pinned memory for a CUDA ``device``; workers kept between epochs
    when ``persistent``; ``prefetch`` batches read ahead per worker (PyTorch's default when ``None``)."""
    many = workers > 0
    return _NotingLoader(dataset, batch_sampler=batches, batch_size=None if batches is None else 1,
                         num_workers=workers, collate_fn=collate_fn,
                         pin_memory=device is not None and device.type == "cuda",
                         persistent_workers=persistent and many, prefetch_factor=prefetch if many else None,
                         generator=torch.Generator())


def skipped_paths(item: Any) -> list[str]:
    """The paths of the images a loaded item (a batch, or a tuple led by one) skipped."""
    if not hasattr(item, "skipped") and isinstance(item, tuple) and item:
        item = item[0]
    return list(getattr(item, "skipped", ()))


class _NotingLoader(DataLoader):
    """A ``DataLoader`` whose main process notes each batch's skipped images as named (see the module's text)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for item in super().__iter__():
            note_reported(skipped_paths(item))
            yield item
