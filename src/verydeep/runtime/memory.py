"""Memory: how much a training step may hold at its peak on the machine at hand, the micro-batch that
fits it, and an allocator that keeps freed memory for the next step."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

#: Share of the device memory free to this process that a fitted micro-batch may fill at its peak.
MEMORY_HEADROOM = 0.85
#: The two micro-batch sizes whose peaks give the per-image memory of a training step.
PROBE_SIZES = (2, 8)


def fit_micro_batch(local_batch: int, peak_bytes: Callable[[int], int], budget_bytes: int) -> int:
    """The micro-batch for a step of ``local_batch`` images that fits ``budget_bytes`` at its peak: the whole
    batch when it fits, else the batch split evenly into as few micro-batches as fit (at least one image
    each). ``peak_bytes(m)`` measures a training step's peak memory on ``m`` images; memory is taken as
    linear in the images, from two measurements (:data:`PROBE_SIZES`); when the larger runs out of memory,
    the smaller's size is the answer."""
    small, large = PROBE_SIZES
    if local_batch <= small:
        return local_batch
    large = min(large, local_batch)
    low = peak_bytes(small)
    try:
        high = peak_bytes(large)
    except torch.OutOfMemoryError:
        return small
    # a peak that did not grow (a device's workspaces may vary with the images) says nothing of the slope:
    # then each image is taken to need as much as the whole step on ``large`` images
    per_image = (high - low) / (large - small) if high > low else high / large
    fixed = low - small * per_image
    fits = max(1, int((budget_bytes - fixed) // per_image))
    if fits >= local_batch:
        return local_batch
    return math.ceil(local_batch / math.ceil(local_batch / fits))


#: A control group's memory limit and usage (cgroup v2, then v1), for processes in a container.
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, or "max": no limit
        return None


def available_memory_bytes() -> int | None:
    """Memory new work can take without swapping or being killed: ``MemAvailable`` of ``/proc/meminfo``,
    or less where this process's control group (a container) has a memory limit; None where neither is
    known."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in CGROUP_MEMORY:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes a huge number for none
            room = max(0, limit - usage)
            available = room if available is None else min(available, room)
            break
    return available


def cpu_memory_budget(extra_bytes: int = 0) -> int | None:
    """Bytes a training step may hold at its peak on a CPU: :data:`MEMORY_HEADROOM` of the memory available,
    shared with the other processes ``torchrun`` started on this machine, less ``extra_bytes`` still to be
    allocated; None where the available memory is not known."""
    available = available_memory_bytes()
    if available is None:
        return None
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return int(MEMORY_HEADROOM * available / local_processes) - extra_bytes


def cuda_memory_budget(device: torch.device, extra_bytes: int = 0) -> int:
    """Bytes of ``device`` a training step may fill at its peak: :data:`MEMORY_HEADROOM` of what is free to
    this process (free on the device, and what PyTorch holds), less ``extra_bytes`` still to be allocated."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(MEMORY_HEADROOM * (free + torch.cuda.memory_reserved(device))) - extra_bytes


#: glibc ``mallopt`` parameters: the free memory at the heap's top above which it is given back, the
#: size above which memory is mapped afresh (capped by glibc at 32 MiB on 64-bit), and how many
#: blocks may be so mapped at once (0: none, every block from the heap).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse rather than return it to the system.

    PyTorch's CPU allocator is plain ``malloc``: every step's activations, freed at its end, go
    back to the system and return as fresh pages, each a page fault: thousands a step for a
    narrow net at batch 128, a sizeable share of its time (the README gives figures). Blocks above
    the mapping threshold's cap (VGG-16's FC6 weights in bf16 and their gradients, its first
    layers' activations at 224) would still be mapped afresh each time, some 200,000 page faults a
    step at batch 8 (docs/benchmarks.md), so no block is mapped: all come from the heap and are
    reused. The cost: the process keeps its peak memory. True when applied (glibc only; elsewhere
    nothing changes).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                    and libc.mallopt(_M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False
