"""Batches: the collate that stacks uint8 images (and boxes) and drops the files that could not be read,
and the sampler that batches images sharing their size after the Sec. 3.2 rescale to Q."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Sampler, get_worker_info

from verydeep.data.datasets import LabelledImages
from verydeep.data.transforms import oversized, oversized_at, resized_size
from verydeep.errors import UserError


class Boxed(NamedTuple):
    """An image with its object boxes (Appendix A): ``boxes`` (k, 4) and the image's own extent
    ``frame`` (4,), corners in pixels of the (cropped) ``image``."""

    image: Tensor
    boxes: Tensor
    frame: Tensor


class Batch(NamedTuple):
    """A collated batch: uint8 images (N, 3, H, W) channels_last, int64 labels, skipped paths; for
    :class:`Boxed` items also ``boxes`` (N, M, 4), padded with NaN rows, and ``frames`` (N, 4)."""

    images: Tensor
    labels: Tensor
    skipped: list[str]
    boxes: Tensor | None = None
    frames: Tensor | None = None


def batch_memory(shape: Sequence[int]) -> Tensor:
    """An uninitialised uint8 tensor for a batch: in a DataLoader worker, straight in shared
    memory, which the batch goes through anyway (as ``default_collate`` does; ``share_memory_``
    would copy it there, costing as much as the collation)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(tuple(shape))


def nhwc_shape(images: Sequence[Tensor]) -> tuple[int, int, int, int]:
    """(N, h, w, channels) of images (channels, h, w) of one size, which a batch holds; a ValueError where two
    sizes differ."""
    shape = images[0].shape
    for image in images:
        if image.shape != shape:
            raise ValueError(f"images of sizes {tuple(shape)} and {tuple(image.shape)} in one batch")
    return len(images), shape[1], shape[2], shape[0]


def stack_images(images: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """uint8 (3, h, w) images of one size as (N, 3, h, w), channels_last: a plain copy of their
    HWC memory, on ``device`` (``None``: :func:`batch_memory`); no images: (0, 3, 0, 0)."""
    if not images:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=device)
    nhwc = nhwc_shape(images)
    out = batch_memory(nhwc) if device is None else torch.empty(nhwc, dtype=torch.uint8, device=device)
    torch.stack([image.permute(1, 2, 0) for image in images], out=out)
    return out.permute(0, 3, 1, 2)


def collate(batch: Sequence[tuple[Tensor | None, int, str]]) -> Batch:
    """Stack ``(image, label, path)`` samples; unreadable ones (image ``None``) are dropped and named.

    All images must share one size (use :class:`SizeGroupedBatchSampler` for whole images). The
    batch is channels_last, as the model wants it; an all-bad batch has zero images.
    """
    good = [(img, label) for img, label, _ in batch if img is not None]
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    skipped = [path for img, _, path in batch if img is None]
    boxed = [img for img, _ in good if isinstance(img, Boxed)]
    if not boxed:
        return Batch(stack_images([img for img, _ in good]), labels, skipped)
    most = max(len(item.boxes) for item in boxed)
    boxes = torch.full((len(boxed), most, 4), math.nan, dtype=boxed[0].boxes.dtype)
    for row, item in zip(boxes, boxed, strict=True):
        row[: len(item.boxes)] = item.boxes
    frames = torch.stack([item.frame for item in boxed])
    return Batch(stack_images([item.image for item in boxed]), labels, skipped, boxes, frames)


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices whose images share one size after the rescale to Q (Sec. 3.2).

    Sizes come from the image headers, read once per dataset. Groups appear in the order of
    their first image, indices ascending within a group; unreadable images form their own
    group (their samples come out as skipped). An image too large to test at Q (a long strip) is refused
    here, naming it: skipped as unreadable, it would leave the rows at other scales too.
    """

    def __init__(self, dataset: LabelledImages, q: int, batch_size: int) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1; got {batch_size}")
        groups: dict[tuple[int, int] | None, list[int]] = {}
        for index, size in enumerate(dataset.image_sizes()):
            key = resized_size(size, q) if size is not None else None
            if key is not None and oversized(key):
                raise UserError(f"{dataset.samples[index][0]}: {oversized_at(q, key)}; give a smaller test scale, or "
                                "leave the image out")
            groups.setdefault(key, []).append(index)
        self.batches = [
            indices[i : i + batch_size] for indices in groups.values() for i in range(0, len(indices), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
