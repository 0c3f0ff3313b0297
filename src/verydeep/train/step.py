"""One training step on this process (Sec. 3.1, 3.3): micro-batches forward and backward, then one update.

Every micro-batch loss is a sum divided by the process's share of the global batch (DDP's gradient
averaging divides the world size back), so a step in micro-batches, on any number of processes,
equals one on the whole batch. Each image carries its colour shift and its dropout masks' seed
(:class:`~verydeep.data.sampling.Draws`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from verydeep.data import Batch, Preprocess, to_input
from verydeep.data import gpu as gpu_decode
from verydeep.data.sampling import Draws
from verydeep.errors import UserError
from verydeep.nn.tasks import Task
from verydeep.runtime.ahead import run_ahead
from verydeep.runtime.precision import autocast
from verydeep.runtime.processes import Processes
from verydeep.train.master_weights import MasterWeights, bf16_copies


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stopped before any update or checkpoint with it."""


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse to save weights that are not finite: the last good checkpoint stays the last one."""
    bad = [name for name, p in model.named_parameters() if not p.detach().isfinite().all()]
    if bad:
        raise NonFiniteLossError(f"weights became non-finite ({', '.join(bad[:3])}) {where}")


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of ``tensors`` is finite (a 0-d bool tensor): then each tensor's sum is, and an
    infinity or NaN anywhere makes it not. A sum reads a bf16 gradient as it is, where a norm converts it, and
    would overflow only past 3e38, a norm's squares past 2e19."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([t.sum().float() for t in tensors]).isfinite().all()


class Stepper:
    """The step's work: batches onto the device, the network's input, micro-steps and the update."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, task: Task,
                 procs: Processes, device: torch.device, dtype: torch.dtype | None, pre: Preprocess,
                 crop: int, channels_last: bool, local_batch: int, decode: str) -> None:
        self.model, self.optimizer, self.task, self.procs = model, optimizer, task, procs
        self.device, self.dtype, self.pre, self.crop = device, dtype, pre, crop
        self.channels_last, self.local_batch, self.decode = channels_last, local_batch, decode
        self.forward_model: torch.nn.Module = model
        self.ddp: DistributedDataParallel | None = None
        self.masters: MasterWeights | None = None  # the bf16 copies the net trains on, when it does
        self.input_memory = torch.empty(0)  # the float input of every CPU batch (no fresh pages per step)

    def wrap(self, compile: bool) -> str:
        """DDP over the processes, then ``torch.compile`` when asked. Else, in bf16 on a CPU on one process, the net
        trains on bf16 copies of its weights (:mod:`.master_weights`): returns what the log says of how the weights
        train."""
        if self.procs.distributed:
            index = self.device.index
            self.ddp = DistributedDataParallel(self.model, device_ids=[index] if index is not None else None)
            self.forward_model = self.ddp
        if compile:
            self.forward_model = torch.compile(self.forward_model)
        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            return ""
        if self.ddp is not None or compile:
            return "; fp32 weights cast by autocast (several processes or --compile)"
        self.masters, why = bf16_copies(self.model, self.optimizer)
        if self.masters is None:
            return f"; fp32 weights cast by autocast ({why})"
        self.forward_model = self.masters
        return "; bf16 copies of the weights, their fp32 masters updated in one pass"

    def on_device(self, loaded: Any, draws: Draws | None = None) -> tuple[Batch, Draws | None]:
        """A loader's batch as uint8 images (decoded on the device when JPEGs go to the GPU), with the
        draws of the images kept (the device decoder may drop a file the workers could not check)."""
        if self.decode != "gpu":
            return loaded, draws
        batch = gpu_decode.decode_batch(loaded, self.device)
        if draws is not None and len(batch.skipped) > len(loaded.skipped):
            dropped = set(batch.skipped)
            draws = draws.kept(torch.tensor([path not in dropped for path in loaded.paths], dtype=torch.bool))
        return batch, draws

    def batches(self, loaded: Iterable[tuple[Any, Draws | None]]) -> Iterator[tuple[Batch, Draws | None]]:
        """:meth:`on_device` of each loaded batch and its draws; JPEGs decoded on the GPU are decoded one batch
        ahead, on a side stream, while the caller's step runs (:func:`~verydeep.runtime.ahead.run_ahead`)."""
        if self.decode != "gpu":
            yield from loaded
            return
        yield from run_ahead(loaded, lambda pair: self.on_device(*pair), self.device)

    def input(self, batch: Batch, shifts: torch.Tensor | None = None) -> torch.Tensor:
        """The network's float input: colour shift and normalisation (Sec. 3.1), in the memory format."""
        images = batch.images.to(self.device, non_blocking=True)
        if self.device.type == "cpu" and self.input_memory.numel() < images.numel():
            self.input_memory = torch.empty(images.numel())
        out = self.input_memory if self.device.type == "cpu" else None  # CUDA has its caching allocator
        shifts = None if shifts is None else shifts.to(self.device, non_blocking=True)
        x = to_input(images, self.pre, shifts, out)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def reduce(self, *values: float) -> list[float]:
        """Sums over the processes."""
        if not self.procs.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def micro_step(self, batch: Batch, draws: Draws, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch, each image with its colour shift and dropout masks;
        returns its summed loss (detached). Gradients are averaged over the processes when ``sync``."""
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            if batch.images.shape[0] == 0:  # every file of this micro-batch unreadable: a zero-gradient pass
                x = torch.zeros(1, 3, self.crop, self.crop, device=self.device)
                with autocast(self.device, self.dtype):
                    loss = self.forward_model(x).float().sum() * 0.0
            else:
                x, targets = self.input(batch, draws.shifts), self.task.targets(batch, self.device)
                seeds = draws.seeds.to(self.device, non_blocking=True)
                with autocast(self.device, self.dtype):
                    loss = self.task.loss(self.forward_model(x, seeds).float(), targets)
            (loss / self.local_batch).backward()
        if self.masters is not None and not sync:
            self.masters.hold_gradients()
        return loss.detach()

    def update(self, loss_sum: torch.Tensor, images: int, skipped: int, where: Callable[[], str], step: int,
               lr: float) -> QueuedUpdate:
        """Queue the optimizer step once global batch ``step``'s gradients are in, without waiting for the device:
        a loss or gradient that is not finite leaves the weights and momenta as they were (the fused update skips
        itself), and :meth:`read` of the returned record stops training (:class:`NonFiniteLossError`, saying
        ``where()``)."""
        gradients = (self.masters.gradients() if self.masters is not None
                     else [p.grad for p in self.model.parameters() if p.grad is not None])
        not_finite = (~(loss_sum.isfinite() & all_finite(gradients))).float()
        if self.procs.distributed:  # each process's loss is its own: all skip if any sees one not finite
            torch_dist.all_reduce(not_finite, op=torch_dist.ReduceOp.MAX)
        if self.masters is not None:
            self.masters.step(not_finite)
        else:
            self.optimizer.found_inf = not_finite  # read by torch's fused SGD: the step is skipped where it is 1
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return QueuedUpdate(loss_sum.detach(), images, skipped, not_finite, where, step, lr, time.perf_counter())

    def read(self, queued: QueuedUpdate) -> tuple[float, float, float]:
        """A queued update's summed loss, images and skipped files over the processes (waits for them); a
        loss or gradient that was not finite raises :class:`NonFiniteLossError`."""
        loss_total, images_total, skipped_total = self.reduce(queued.loss_sum.item(), queued.images, queued.skipped)
        loss = loss_total / max(images_total, 1)
        if queued.not_finite.item() or not math.isfinite(loss):
            what = f"loss is {loss}" if not math.isfinite(loss) else "gradients are not finite"
            raise NonFiniteLossError(f"{what} {queued.where()}")
        return loss_total, images_total, skipped_total


@dataclass(frozen=True)
class QueuedUpdate:
    """An update queued on the device, with what :meth:`Stepper.read` reads of it later."""

    loss_sum: torch.Tensor  # this process's summed loss of the batch, on the device
    images: int
    skipped: int
    not_finite: torch.Tensor  # 1.0 on the device where the loss or a gradient was not finite: the update skipped
    where: Callable[[], str]  # the step, for the error that names it
    step: int
    lr: float
    queued_at: float  # time.perf_counter() once the update was queued


@dataclass(frozen=True)
class StepFigures:
    """A training step as read: its summed loss, images and skipped files over the processes, and its seconds."""

    step: int
    lr: float
    loss_sum: float
    images: float
    skipped: float
    seconds: float


class StepQueue:
    """The update queued last, read only once the next one is queued, so that the host never waits for the device
    between two steps. A step's seconds run from the end of the step read before it to when its own update was
    queued, or, for one read with no next (:meth:`pop`), to the moment it is read: so they add up to the epoch's."""

    def __init__(self, stepper: Stepper) -> None:
        self.stepper = stepper
        self.queued: QueuedUpdate | None = None
        self.last_end = time.perf_counter()

    def start_clock(self) -> None:
        """The next step's seconds run from now (an epoch starts)."""
        self.last_end = time.perf_counter()

    def push(self, queued: QueuedUpdate) -> StepFigures | None:
        """Hold ``queued``; the figures of the update held before it (:meth:`Stepper.read`: may raise)."""
        previous, self.queued = self.queued, queued
        return None if previous is None else self._read(previous, previous.queued_at)

    def pop(self) -> StepFigures | None:
        """The figures of the update held, if any, read now (before a checkpoint, at the epoch's end)."""
        previous, self.queued = self.queued, None
        return None if previous is None else self._read(previous, time.perf_counter())

    def _read(self, queued: QueuedUpdate, end: float) -> StepFigures:
        loss_sum, images, skipped = self.stepper.read(queued)
        seconds, self.last_end = max(end - self.last_end, 1e-9), end
        return StepFigures(queued.step, queued.lr, loss_sum, images, skipped, seconds)


def zero_momenta(optimizer: torch.optim.Optimizer) -> None:
    """Momentum buffers of zeros for every parameter before the first step: the same first update (with no
    dampening, momentum times zero plus the gradient is the gradient), and torch's fused SGD, told to skip
    its first step, would otherwise leave the buffers it creates for it uninitialised."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in (p for p in group["params"] if p.requires_grad):
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
