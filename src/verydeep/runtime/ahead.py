"""Work one item ahead of its consumer, in a background thread (on CUDA, on a side stream).

JPEGs decoded on the GPU (``--decode gpu``) were decoded between two training steps, so the GPU
sat idle while the host launched the decode and the step waited for it. :func:`run_ahead` decodes
batch i + 1 while the caller's step i runs: the host launches both at once, and on the GPU the
decode's kernels fill the gaps of the step's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_END = object()  # ``items`` ran out


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value`` and in the tuples and lists it nests (a batch, a (batch, draws) pair)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def run_ahead(items: Iterable[T], work: Callable[[T], R], device: torch.device) -> Iterator[R]:
    """``work(item)`` for each of ``items``, in order, each computed in one background thread while
    the caller uses the result before it. On CUDA the work runs on a side stream: the caller's
    stream waits for it before using a result, and the result's tensors (in tuples and lists)
    are marked as used on the caller's stream, so the allocator keeps them until the
    caller's kernels are done with them. An exception in ``work`` is raised to the caller."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(item: T) -> tuple[R, torch.cuda.Event | None]:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            result = work(item)
        return result, stream.record_event() if stream is not None else None

    source = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="verydeep-ahead") as pool:
        def submit() -> Future | None:
            item = next(source, _END)
            return None if item is _END else pool.submit(run, item)

        pending = submit()
        while pending is not None:
            result, event = pending.result()
            pending = submit()
            if event is not None:
                caller = torch.cuda.current_stream(device)
                caller.wait_event(event)
                for tensor in _tensors(result):
                    if tensor.device.type == "cuda":
                        tensor.record_stream(caller)
            yield result
