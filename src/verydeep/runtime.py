"""Where and how to run: device choice, mixed precision and memory format.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA GPUs with bf16
support, and CPUs with AMX or AVX-512 BF16. On other CPUs (AVX2 only) PyTorch emulates bf16 and
a VGG training step runs about 20x *slower* than fp32 (measured on a 2-core AVX2 EPYC), so
``precision="auto"`` picks bf16 only where it is fast. channels_last helps convolutions on both.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``, ``bf16`` or ``fp32``); None means fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32; got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` when ``dtype`` is set, a no-op otherwise."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    """Move ``model`` to ``device``, in channels_last memory format when asked."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


#: glibc ``mallopt`` parameters: the size above which memory is mapped afresh (capped by glibc at
#: 32 MiB on 64-bit), and the free memory at the heap's top above which it is given back.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse rather than return it to the system.

    PyTorch's CPU allocator is plain ``malloc``: every step's activations, freed at its end, go
    back to the system and return as fresh pages, each a page fault. For a width-1/2 net A at
    batch 128 that is ~14,000 faults a step and a fifth of its time (measured here). The cost:
    the process keeps its peak memory. True when applied (glibc only; elsewhere nothing changes).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    except (OSError, AttributeError):
        return False
