"""Which images a training step sees, and with which random draws (Sec. 3.1, 3.3), by construction.

- The order of an epoch is a permutation drawn from ``(seed, epoch)``, cut into global batches;
  process ``rank`` takes its slice of each, in micro-batches (:class:`GlobalBatchSampler`).
- Each image's augmentation (scale, crop, flip, colour-shift alphas) is drawn from a generator
  seeded by ``(seed, epoch, index)`` (:class:`SeededSamples`), in whichever worker or process
  reads it; so is the seed of its dropout masks, which travels with the batch (:class:`Draws`) to
  the model's :class:`~verydeep.nn.model.SeededDropout` layers.

So a resumed run, and a run on N processes, see exactly the images and draws of one
uninterrupted process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from verydeep.data.batches import Batch, collate
from verydeep.data.datasets import LabelledImages
from verydeep.data.preprocess import Preprocess, pca_shift


class Stream(IntEnum):
    """The independent random streams of a run, each seeded by :func:`derived_seed`."""

    ORDER = 0  # the permutation of an epoch's images
    AUGMENT = 1  # one image's scale, crop, flip and colour shift
    PROCESS = 2  # a process's global torch RNG, from the start of a run (a task may draw from it)
    PROCESS_RESHARDED = 3  # a process's global torch RNG after resuming on another number of processes
    DROPOUT = 4  # one image's dropout masks (Sec. 3.1), in an epoch


def derived_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, stream, keys)`` (a BLAKE2 hash: cheap, well
    mixed)."""
    text = ",".join(map(str, (seed, int(stream), *keys)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def stream_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    """A CPU generator seeded for ``stream`` at ``keys``."""
    return torch.Generator().manual_seed(derived_seed(seed, stream, *keys))


SeededItem = tuple[Any, int, str, Tensor, int]


class Draws(NamedTuple):
    """The random draws that travel with a batch, a row for each image kept: colour shifts (n, 3) and
    dropout seeds (n,) int64."""

    shifts: Tensor
    seeds: Tensor

    def kept(self, keep: Tensor) -> Draws:
        """The rows of the images where ``keep`` (bool, one per image) is true."""
        return Draws(self.shifts[keep], self.seeds[keep])


class SeededSamples(Dataset):
    """Item ``(epoch, index)`` -> ``(image or None, label, path, colour shift (3,), dropout seed)``.

    The image's augmentation and its PCA alphas are drawn from the :data:`Stream.AUGMENT`
    generator of ``(seed, epoch, index)``, and its dropout seed is :data:`Stream.DROPOUT`'s of the same
    key, so they are the same whichever process, worker or batch reads the image; no global RNG is
    touched.
    """

    def __init__(self, dataset: LabelledImages, seed: int, pre: Preprocess, alpha_std: float) -> None:
        self.dataset, self.seed, self.pre, self.alpha_std = dataset, seed, pre, alpha_std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> SeededItem:
        epoch, index = key
        generator = stream_generator(self.seed, Stream.AUGMENT, epoch, index)
        image, label, path = self.dataset.load(index, generator)
        shift = pca_shift(1, self.pre, self.alpha_std, generator)[0] if self.alpha_std > 0 else torch.zeros(3)
        return image, label, path, shift, derived_seed(self.seed, Stream.DROPOUT, epoch, index)


def collate_shifted(collate_images: Callable[[Sequence[tuple[Any, int, str]]], Any] = collate,
                    ) -> Callable[[Sequence[SeededItem]], tuple[Batch, Draws]]:
    """A collate for :class:`SeededSamples`: ``collate_images`` of the images, plus the :class:`Draws`
    (colour shifts and dropout seeds) of the images kept."""

    def collate_with_shifts(items: Sequence[SeededItem]) -> tuple[Batch, Draws]:
        kept = [item for item in items if item[0] is not None]
        shifts = torch.stack([item[3] for item in kept]) if kept else torch.zeros(0, 3)
        seeds = torch.tensor([item[4] for item in kept], dtype=torch.int64)
        return collate_images([item[:3] for item in items]), Draws(shifts, seeds)

    return collate_with_shifts


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """The distributed sampler: an epoch's order is a permutation drawn from ``(seed, epoch)``, cut into
    global batches of ``batch_size`` (an incomplete last one is dropped); process ``rank`` yields its
    slice of each, ``micro_batch`` images at a time, as ``(epoch, index)`` keys for :class:`SeededSamples`."""

    def __init__(self, indices: Sequence[int], batch_size: int, micro_batch: int, rank: int, world: int,
                 seed: int) -> None:
        self.indices = list(indices)
        self.batch_size, self.micro_batch = batch_size, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.local = batch_size // world
        self.micro_per_step = math.ceil(self.local / micro_batch)
        self.steps_per_epoch = len(self.indices) // batch_size
        self.epoch, self.step_in_epoch = 0, 0

    def set_epoch(self, epoch: int, step_in_epoch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its global batch ``step_in_epoch`` (after a resume)."""
        self.epoch, self.step_in_epoch = epoch, step_in_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = stream_generator(self.seed, Stream.ORDER, self.epoch)
        order = torch.randperm(len(self.indices), generator=generator).tolist()
        for step in range(self.step_in_epoch, self.steps_per_epoch):
            first = step * self.batch_size + self.rank * self.local
            mine = order[first:first + self.local]
            for i in range(0, self.local, self.micro_batch):
                yield [(self.epoch, self.indices[j]) for j in mine[i:i + self.micro_batch]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.step_in_epoch) * self.micro_per_step
