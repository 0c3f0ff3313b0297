"""Fitting the micro-batch to the memory: how many images a training step can take at once.

Without ``--micro-batch`` a new run splits each process's share of the batch into the largest
micro-batches whose step fits (gradient accumulation is exact, Sec. 3.3): on CUDA by the peak the
allocator measures, on a CPU, where nothing is measured, by counting what the forward pass saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist

from verydeep.errors import UserError
from verydeep.runtime import memory
from verydeep.runtime.precision import autocast
from verydeep.runtime.processes import Processes


class MemoryProbe:
    """Probes of a training step's memory on ``images`` blank crops of ``model``, as the trainer runs it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, crop: int, channels_last: bool,
                 dtype: torch.dtype | None) -> None:
        self.model, self.device, self.crop, self.channels_last, self.dtype = model, device, crop, channels_last, dtype

    @contextlib.contextmanager
    def probing(self, images: int) -> Iterator[torch.Tensor]:
        """``images`` blank crops in the trainer's memory format, to run through the model in eval mode (no
        dropout draw, batch-norm statistics as they are) under autocast; train mode again after."""
        x = torch.zeros(images, 3, self.crop, self.crop, device=self.device)
        self.model.eval()
        try:
            with autocast(self.device, self.dtype):
                yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        finally:
            self.model.train()

    def peak_bytes(self, images: int) -> int:
        """Peak CUDA memory of a forward and backward pass on ``images`` blank crops; the gradients are
        dropped after."""
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with self.probing(images) as x:
                self.model(x).float().sum().backward()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        finally:
            self.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    def activation_bytes(self, images: int) -> int:
        """Memory beyond the weights that a training step on ``images`` crops holds at its peak, as a CPU
        measures nothing of it: what the forward pass saves for the backward pass (each storage once, the
        weights not), and twice the largest of it for the gradients flowing back."""
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        saved: dict[int, int] = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), self.probing(images) as x:
            self.model(x)
        return sum(saved.values()) + 2 * max(saved.values(), default=0)

    def fitted(self, local_batch: int) -> int | None:
        """This process's largest micro-batch that fits (:func:`verydeep.runtime.memory.fit_micro_batch`; the whole
        ``local_batch`` when it fits), 0 when not even the smallest probe fits, None when the machine does
        not say how much memory it has."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        if self.device.type == "cuda":  # the probes' peak holds the gradients; the momentum comes at the first step
            probe, budget = self.peak_bytes, memory.cuda_memory_budget(self.device, weights)
        else:  # the count holds neither gradients nor momentum
            probe, budget = self.activation_bytes, memory.cpu_memory_budget(2 * weights)
            if budget is None:
                return None
        try:
            return memory.fit_micro_batch(local_batch, probe, budget)
        except torch.OutOfMemoryError:
            return 0
        finally:
            if self.device.type == "cuda":  # the epochs' peak memory is the training's, not the probes'
                torch.cuda.reset_peak_memory_stats(self.device)


def fit_micro_batch(probe: MemoryProbe, local_batch: int, micro_batch: int, procs: Processes,
                    batch_size: int) -> int:
    """The micro-batch every process trains with: the smallest that fits over the processes, so that they
    step together (``micro_batch`` where the memory is not known); a :class:`UserError` when none fits."""
    fitted = probe.fitted(local_batch)
    fitted = micro_batch if fitted is None else fitted
    if procs.distributed:  # every process learns the smallest, a failure (0) included
        smallest = torch.tensor(fitted, device=probe.device)
        torch_dist.all_reduce(smallest, op=torch_dist.ReduceOp.MIN)
        fitted = int(smallest)
    if fitted == 0:
        raise UserError(f"--batch-size {batch_size}: a training step of {memory.PROBE_SIZES[0]} images does not "
                        f"fit the memory of {probe.device} (of a process); give --micro-batch")
    return fitted
