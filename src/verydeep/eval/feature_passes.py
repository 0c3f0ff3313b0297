"""The passes of Appendix B's extraction: how descriptors are computed (:class:`Settings`), and one pass per
test scale Q over the images not yet done, whole images batched by their size after the rescale (bf16 where
fast), every net's descriptors of each batch kept in the :class:`~verydeep.eval.feature_store.Partial` state,
saved every ``checkpoint_every`` batches and on Ctrl-C; under ``torchrun`` the processes share each pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from verydeep.data import RescaleTransform, SizeGroupedBatchSampler, to_input
from verydeep.data.datasets import IndexedImages
from verydeep.errors import UserError
from verydeep.eval.descriptors import AGGREGATES, DEFAULT_SCALES, FeatureNet, pooled_descriptor
from verydeep.eval.feature_store import Partial
from verydeep.eval.image_sets import ImageSet, loaded_batches
from verydeep.runtime import sharding
from verydeep.runtime.device import pick_device
from verydeep.runtime.precision import autocast, autocast_dtype
from verydeep.runtime.processes import Processes, loader_workers
from verydeep.runtime.progress import progress_bar


@dataclass(frozen=True)
class Settings:
    """How descriptors are computed: scales Q, aggregation, device, autocast dtype, batch size, loader
    workers, progress bar, and how many batches between saves of a partial extraction."""

    scales: tuple[int, ...] = DEFAULT_SCALES
    aggregate: str = "stack"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    batch_size: int = 16
    workers: int = 0
    progress: bool = True
    checkpoint_every: int = 50

    @classmethod
    def create(cls, scales: Sequence[int] = DEFAULT_SCALES, aggregate: str = "stack", device: str = "auto",
               precision: str = "auto", batch_size: int = 16, workers: int | None = None, progress: bool = True,
               checkpoint_every: int = 50) -> Settings:
        """Settings with the device picked (``auto``: CUDA when there is one), bf16 where it is fast
        (``precision`` auto), and the loader workers defaulting to the cores less one."""

        if aggregate not in AGGREGATES:
            raise UserError(f"--aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
        if not scales or min(scales) < 1 or batch_size < 1 or checkpoint_every < 1:
            raise UserError("--scales, --batch-size and --checkpoint-every must be positive")
        torch_device = pick_device(device)
        dtype = sharding.agreed(autocast_dtype(torch_device, precision))  # measured: the first process's
        return cls(tuple(sorted(set(scales))), aggregate, torch_device, dtype,
                   batch_size, loader_workers(workers), progress, checkpoint_every)


def run_passes(nets: Sequence[FeatureNet], images: ImageSet, state: Partial, settings: Settings,
               partial_path: Path | None, dataset: IndexedImages | None = None) -> None:
    """Fill ``state`` with every net's descriptors of every image not yet done, one pass per Q; save it
    every ``checkpoint_every`` batches and when interrupted. Under ``torchrun`` the processes share each
    pass's batches in lockstep, merge their work at every save and at the end of each pass, and the
    first alone writes."""

    if dataset is None:  # else the caller's items, one per row (person boxes: verydeep.eval.box_features)
        dataset = IndexedImages(images.paths)  # its image sizes are read once, for every pass
    procs, batches = Processes.from_env(), 0
    main, left = procs.main, None if procs.distributed else int((~state.done).sum())  # of this process's share
    with progress_bar(left, settings.progress and main, unit="img") as bar:
        try:
            for p, q in enumerate(settings.scales):
                bar.set_description(f"features Q={q}", refresh=False)
                fresh: list[int] = []  # the rows this process did since the last merge
                for rows in run_pass(nets, dataset, p, state, settings):
                    bar.update(len(rows))
                    fresh += rows
                    batches += 1
                    if batches % settings.checkpoint_every == 0:
                        state.merge(p, q, fresh)
                        fresh = []
                        if partial_path is not None and main:
                            state.save(partial_path)
                state.merge(p, q, fresh)
        except KeyboardInterrupt:
            if partial_path is not None and main:  # its own rows and those merged: each done one is right
                state.save(partial_path)
            raise


def run_pass(nets: Sequence[FeatureNet], dataset: IndexedImages, p: int, state: Partial, settings: Settings
             ) -> Iterator[list[int]]:
    """The pass at the ``p``-th Q over the images it has not done, whole images batched by their size after
    the rescale (this process's share of the batches, :func:`verydeep.runtime.sharding.shard`); yields the rows
    each batch completed, and nothing for the rounds in which another process is still at work."""

    q = settings.scales[p]
    dataset.transform = RescaleTransform(q)
    position = {str(path): i for path, i in dataset.samples}
    batches = [[i for i in batch if not state.done[p, i]]
               for batch in SizeGroupedBatchSampler(dataset, q, settings.batch_size).batches]
    batches = [b for b in batches if b]
    mine = sharding.shard(batches)
    for indices, batch, skipped in loaded_batches(dataset, mine, settings.workers):
        describe_batch(nets, batch, indices, q, state, settings)
        state.skipped.update(skipped)
        rows = [*indices.tolist(), *(position[path] for path in skipped)]
        state.done[p, rows] = True
        yield rows
    for _ in range(sharding.rounds(len(batches)) - len(mine)):
        yield []


@torch.inference_mode()
def describe_batch(nets: Sequence[FeatureNet], images: Tensor, indices: np.ndarray, q: int, state: Partial,
                   settings: Settings) -> None:
    """Every net's descriptors of one batch of uint8 images at Q = ``q``, into ``state``."""

    if not len(indices):
        return
    images = images.to(settings.device)
    for i, net in enumerate(nets):
        x = to_input(images, net.preprocess).contiguous(memory_format=torch.channels_last)
        with autocast(settings.device, settings.dtype):
            state.arrays[f"net{i}_Q{q}"][indices] = pooled_descriptor(net.dense, x).cpu().numpy()
