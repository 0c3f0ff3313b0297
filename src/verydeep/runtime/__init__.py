"""Where and how to run: processes, device, mixed precision, memory, RNG state, progress.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA GPUs with bf16
support, and CPUs with AMX or AVX-512 BF16. On other CPUs (AVX2 only) PyTorch emulates bf16 and
a training step is many times *slower* than fp32 (the README gives the figure), so
``precision="auto"`` picks bf16 only where it is fast: on a CPU it times a bf16 against an fp32
matrix product once per machine and caches the answer (:func:`cpu_precision`).
channels_last helps convolutions on both.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from verydeep.errors import UserError
from verydeep.io.atomic import atomic_write
from verydeep.runtime.limits import usable_cores


@dataclass(frozen=True)
class Processes:
    """This process's place among those ``torchrun`` started (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Processes:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def default_workers() -> int:
    """Data-loading processes: one per core this process may use, less one for the network, at
    least one and at most 8."""
    return max(1, min(8, usable_cores() - 1))


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``, ``bf16`` or ``fp32``); None means fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32; got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_precision() == "bf16" else None


#: Environment variable that forces the CPU's ``auto`` precision (bf16 or fp32), measuring nothing.
PRECISION_ENV = "VERYDEEP_PRECISION"
#: How much faster a bf16 matrix product must be than an fp32 one for ``auto`` to pick bf16.
BF16_MARGIN = 1.2


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """The hardware and software a measurement belongs to."""
    import torchvision  # its build label (+cu130) is in __version__ alone; imported here, not by every command

    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
        "avx2": bool(torch.cpu._is_avx2_supported()), "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def precision_cache() -> Path:
    """Where measured CPU precisions are kept: ``$XDG_CACHE_HOME/verydeep/precision.json``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "verydeep" / "precision.json"


def bf16_matmul_speedup(n: int = 512, repeats: int = 5) -> float:
    """fp32 time over bf16 time of an n x n matrix product on the CPU (best of ``repeats``)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-12)


def cpu_precision() -> str:
    """``bf16`` or ``fp32``, the faster on this CPU: ``$VERYDEEP_PRECISION`` when set, else measured
    once per CPU model, torch version and thread count and cached; from the CPU's flags when the
    measurement fails."""
    forced = os.environ.get(PRECISION_ENV)
    if forced:
        if forced not in ("bf16", "fp32"):
            raise UserError(f"{PRECISION_ENV} must be bf16 or fp32; got {forced!r}")
        return forced
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = precision_cache()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if cache.get(key) in ("bf16", "fp32"):
        return cache[key]
    try:
        choice = "bf16" if bf16_matmul_speedup() >= BF16_MARGIN else "fp32"
    except RuntimeError:
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    text = json.dumps({**cache, key: choice}, indent=1)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except UserError:
        pass  # a read-only home: measured again next time
    return choice


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` when ``dtype`` is set, a no-op otherwise."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool = True,
            dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move ``model`` to ``device``, in channels_last memory format when asked; for inference under
    autocast to ``dtype``, the weights of its convolutions and linear layers held in ``dtype``: autocast
    would cast those to it on every forward pass (FC6 alone is 100M weights for VGG-16), and nothing
    else (batch norm runs in fp32), so the results are the same, without the casts."""
    model = model.to(device)
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.to(dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


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


def rng_state() -> dict[str, Any]:
    """Every global RNG state of this process, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: Seconds between progress lines when stderr is a file or a pipe (a log), not a terminal.
LOG_INTERVAL = 60.0


class _LogLines:
    """stderr for a progress bar when it is a log: each of tqdm's carriage-return updates becomes
    a line of its own."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int | None = None, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr. Written to a log (not a terminal) it prints a line a minute, from the
    first minute on, instead of an update per step; shorter work leaves no bar lines."""
    if sys.stderr.isatty():
        return tqdm(total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True, **options)
    return tqdm(total=total, disable=not enabled, file=_LogLines(sys.stderr), mininterval=LOG_INTERVAL,
                maxinterval=LOG_INTERVAL, delay=LOG_INTERVAL, **options)
