"""The precision a command computes in: bf16 autocast where it pays, fp32 elsewhere.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA GPUs with bf16
support, and CPUs with AMX or AVX-512 BF16. On other CPUs (AVX2 only) PyTorch emulates bf16 and
a training step is many times *slower* than fp32 (the README gives the figure), so
``precision="auto"`` picks bf16 only where it is fast: on a CPU it times a bf16 against an fp32
matrix product once per machine and caches the answer (:func:`cpu_precision`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from verydeep.errors import UserError
from verydeep.io.atomic import atomic_write
from verydeep.runtime.device import cpu_model


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


#: Each precision's name, by autocast dtype (None: fp32, no autocast).
PRECISION_NAMES: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (None: no autocast), the name of an autocast dtype."""
    return PRECISION_NAMES[dtype]


#: Environment variable that forces the CPU's ``auto`` precision (bf16 or fp32), measuring nothing.
PRECISION_ENV = "VERYDEEP_PRECISION"
#: How much faster a bf16 matrix product must be than an fp32 one for ``auto`` to pick bf16.
BF16_MARGIN = 1.2


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
    """``torch.autocast`` on ``device`` to ``dtype``; with ``dtype`` None, autocast off, whatever a caller's own
    autocast around it asks (fp32 is fp32)."""
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            yield
    finally:  # inside another autocast (a caller's, own_modes') the weights' cached casts outlive this one, and
        torch.clear_autocast_cache()  # would be stale once the update changes the weights: dropped here


@contextlib.contextmanager
def own_modes() -> Iterator[None]:
    """Gradients on and autocast off, whatever a caller (a notebook's ``no_grad``, its bf16 autocast) set around
    the call: training and evaluation then run in the precision they chose, with the gradients they need, backward
    passes included (autocast reaches the backward of an autograd function)."""
    with contextlib.ExitStack() as modes:
        modes.enter_context(torch.enable_grad())
        for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            modes.enter_context(torch.autocast(kind, enabled=False))
        yield
