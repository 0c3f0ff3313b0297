"""Testing over the processes ``torchrun`` starts: Sec. 3.3's data parallelism, applied to evaluation.

Under ``torchrun`` (RANK and WORLD_SIZE set) every process reads the same list of images and plans the
same batches as one process would; each takes every WORLD_SIZE-th batch (:func:`shard`), so an image
goes through the nets in the very batch one process puts it in. The rows each process computed are
then gathered into every process's arrays, in the data's order (:func:`gather_rows`); counts are summed
(:func:`total`) and the names of the images skipped joined (:func:`union`). Every process so holds one
process's result, and only the first (:attr:`~verydeep.runtime.processes.Processes.main`) writes files and prints.
On a single process each of these functions returns what it was given.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from verydeep.errors import UserError
from verydeep.runtime.processes import Processes

T = TypeVar("T")


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Processes]:
    """This process's place among those ``torchrun`` started, inside their process group: NCCL with each
    process on the GPU of its LOCAL_RANK when ``device`` is ``auto`` or ``cuda`` and CUDA is there, else
    gloo. A single process, or a group already set up (a caller's), is left as it is."""
    procs = Processes.from_env()
    if not procs.distributed or dist.is_initialized():
        yield procs
        return
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(procs.local_rank)  # before NCCL starts, so each process binds its own GPU
    try:
        dist.init_process_group("nccl" if cuda else "gloo")  # a process lost while they connect counts too
        yield procs
    except RuntimeError as error:
        if not lost_process(error):
            raise
        raise UserError(f"another process of this run stopped ({_said(error)}), so this one stops too; what the "
                        "run had written stands (train --resume continues from its last checkpoint)") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


#: The words of a connection another process closed by ending (gloo's, the rendezvous store's, NCCL's): not a
#: timeout, which a process still running but stuck elsewhere also causes (a bug, whose traceback says where).
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote process exit")


def lost_process(error: RuntimeError) -> bool:
    """Whether ``error`` is one of a collective (or of the group's set-up) finding another process of the group
    gone, a crash or a kill: its connection closed (:data:`PEER_GONE`), in gloo's words or in torch's
    ``DistError``."""
    return (isinstance(error, dist.DistError) or "gloo" in str(error)) and bool(PEER_GONE.search(str(error)))


def _said(error: RuntimeError) -> str:
    """The gist of a backend's error: its first sentence, without the source file it names."""
    words = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0].strip()
    return words.splitlines()[0] if words else type(error).__name__


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _wire() -> torch.device:
    """Where tensors must be to travel between the processes: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (batches, in the order one process takes them): every
    WORLD_SIZE-th, from its RANK on."""
    if not _active():
        return list(items)
    return list(items[dist.get_rank()::dist.get_world_size()])


def rounds(count: int) -> int:
    """How many of :func:`shard`'s ``count`` items the busiest process takes: the steps that processes
    working in lockstep (a collective after every few items) each go through, the idle ones with nothing."""
    return math.ceil(count / dist.get_world_size()) if _active() else count


def gather_rows(array: torch.Tensor | np.ndarray, rows: Sequence[int]) -> None:
    """Fill, in every process, the rows of ``array`` (along its first axis) that each process computed:
    ``rows``, this process's (their values travel unchanged, NaN included; the processes' shares may
    differ in size). ``array`` is changed in place; a numpy array shares its memory with the tensor sent."""
    if not _active():
        return
    full = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    wire, world = _wire(), dist.get_world_size()
    mine = torch.as_tensor(list(rows), dtype=torch.long)
    counts = [torch.zeros(1, dtype=torch.long, device=wire) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(mine)], device=wire))
    sizes = [int(c) for c in counts]
    width = max(sizes)
    if width == 0:
        return
    values = full[mine]
    values = values.view(torch.uint8) if values.dtype == torch.bool else values  # gloo sends no bools
    sent = values.new_zeros((width, *values.shape[1:]))
    sent[: len(mine)] = values
    indices = torch.full((width,), -1, dtype=torch.long)
    indices[: len(mine)] = mine
    got_values = [torch.empty_like(sent, device=wire) for _ in range(world)]
    got_indices = [torch.empty(width, dtype=torch.long, device=wire) for _ in range(world)]
    dist.all_gather(got_values, sent.to(wire))
    dist.all_gather(got_indices, indices.to(wire))
    for size, where, value in zip(sizes, got_indices, got_values, strict=True):
        value = value[:size].cpu()
        full[where[:size].cpu()] = value.view(torch.bool) if full.dtype == torch.bool else value.to(full.dtype)


def total(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the processes (counts: exact in any order while below 2^24 in float32)."""
    if not _active():
        return values
    summed = values.to(_wire())
    dist.all_reduce(summed)
    return summed.to(values.device)


def slowest(seconds: Sequence[float]) -> list[float]:
    """Each of ``seconds`` (times of the same steps) at its largest over the processes: when all had done it."""
    if not _active():
        return list(seconds)
    longest = torch.tensor(list(seconds), dtype=torch.float64, device=_wire())
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return longest.cpu().tolist()


def agreed(value: T) -> T:
    """The first process's ``value`` in every process: for a choice each might make differently (a
    precision measured on a busy machine)."""
    if not _active():
        return value
    chosen = [value]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


@contextlib.contextmanager
def failing_together() -> Iterator[None]:
    """Run a process's share of work that a :class:`~verydeep.errors.UserError` may end (an image protocol 2
    cannot leave out); at its end the processes tell each other, and each raises the first process's error
    that failed. Without it the others would wait in their next collective for a process that has left."""
    if not _active():
        yield
        return
    error: UserError | None = None
    try:
        yield
    except UserError as raised:
        error = raised
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, None if error is None else str(error))
    first = next((message for message in everyone if message is not None), None)
    if error is not None:
        raise error
    if first is not None:
        raise UserError(first)


def union(names: set[str]) -> set[str]:
    """The names every process gathered (images skipped), joined."""
    if not _active():
        return set(names)
    everyone: list[set[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, set(names))
    return set().union(*(found or set() for found in everyone))
