"""The roofline of ``verydeep bench``: the fastest rate the machine reaches in a precision.

A net's rate can be no faster than its fastest kernel, so the roofline of a precision is the fastest
of the kernels a VGG spends its time in, timed on the machine at hand: large matrix products, and
the convolutions of the net's own shapes at the bench's batch (each layer's forward, backward to the
input and backward to the weights, in channels_last and in NCHW). On CPUs oneDNN's convolutions can
beat a large ``torch.mm``; on GPUs the matrix product usually wins. Each measurement names the
kernel that set it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from verydeep.bench.measure import layer_calls, sync
from verydeep.bench.settings import Settings
from verydeep.runtime.precision import PRECISION_NAMES, precision_name

#: The dtype of each precision's name.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Timings of each matrix product per measurement (the fastest kept): one product is short and noisy.
GEMM_REPEATS = 5
#: Timings of each convolution kernel per measurement: the fastest of dozens of kernels is kept already.
CONV_REPEATS = 1
#: The shortest timing of a kernel, in seconds: a shorter kernel is called back to back that long, since one call
#: alone also times, on a GPU, the wait for the device and the launch, and on a CPU the caches the kernels timed
#: before it left cold.
MIN_TIMING_S = 0.005
#: The passes of a layer in a training step, as the kernels' names end.
FORWARD, TO_INPUT, TO_WEIGHTS = "forward", "backward to the input", "backward to the weights"
PASSES = (FORWARD, TO_INPUT, TO_WEIGHTS)
#: A convolution's memory formats the roofline times it in.
FORMATS = {"channels_last": torch.channels_last, "NCHW": torch.contiguous_format}


class Roofline:
    """The fastest of a set of kernels, in TFLOP/s each time it is called, with the kernel that set each
    measurement in :attr:`winners`. ``kernels``: name to (a call of the kernel, its FLOPs); each is
    warmed up once when the roofline is made (kernel selection, caches) and taken as the fastest of
    ``repeats`` timings, since a roofline is the rate the hardware can reach and a kernel slowed by
    another process on a shared machine says nothing of that. ``timed_too``: kernels timed alongside that
    cannot set the roofline (the ceiling's first layer and FC products, :mod:`.ceiling`); every kernel's
    FLOP/s of each measurement is kept in :attr:`rates`. Each timing is of :func:`back_to_back` calls."""

    def __init__(self, kernels: dict[str, tuple[Callable[[], Any], float]], device: torch.device,
                 repeats: int, timed_too: dict[str, tuple[Callable[[], Any], float]] | None = None) -> None:
        self.kernels, self.device, self.repeats = kernels, device, repeats
        self.timed_too = timed_too or {}
        self.winners: list[str] = []
        self.rates: list[dict[str, float]] = []
        for run, _ in (kernels | self.timed_too).values():
            run()
        sync(device)
        self.calls = {name: back_to_back(self.seconds(run))
                      for name, (run, _) in (kernels | self.timed_too).items()}

    def seconds(self, run: Callable[[], Any], calls: int = 1) -> float:
        """Seconds of ``calls`` calls of ``run`` back to back."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        sync(self.device)
        return max(time.perf_counter() - start, 1e-12)

    def __call__(self) -> float:
        rates = {name: max(flops * self.calls[name] / self.seconds(run, self.calls[name])
                           for _ in range(self.repeats))
                 for name, (run, flops) in (self.kernels | self.timed_too).items()}
        best = max(self.kernels, key=rates.__getitem__)
        self.winners.append(best)
        self.rates.append(rates)
        return rates[best] / 1e12


def back_to_back(seconds: float) -> int:
    """Calls of a kernel that took ``seconds`` once to time together: enough for :data:`MIN_TIMING_S`, at most 100."""
    return max(1, min(100, math.ceil(MIN_TIMING_S / seconds)))


def gemm_roofline(device: torch.device, dtype: torch.dtype | None, n: int) -> Roofline:
    """An n x n x n ``torch.mm`` in ``dtype`` (None: fp32)."""
    a, b = (torch.randn(n, n, device=device).to(dtype or torch.float32) for _ in range(2))
    return Roofline({f"mm {n}": (partial(torch.mm, a, b), 2 * n**3)}, device, GEMM_REPEATS)


def conv_shapes(model: nn.Module, size: int) -> list[tuple[int, int, int, int]]:
    """The distinct (in channels, out channels, kernel side, input side) of ``model``'s convolutions on a
    ``size`` x ``size`` image, but the first (3 input channels: not a large product)."""
    shapes: list[tuple[int, int, int, int]] = []
    for module, inputs, _ in layer_calls(model, size):
        if isinstance(module, nn.Conv2d) and (shape := conv_shape(module, inputs[-1])) not in shapes:
            shapes.append(shape)
    return shapes[1:]


def conv_shape(conv: nn.Conv2d, side: int) -> tuple[int, int, int, int]:
    """(in channels, out channels, kernel side, input side) of ``conv`` on a ``side`` x ``side`` input."""
    return conv.in_channels, conv.out_channels, conv.kernel_size[0], side


def conv_flops(shape: tuple[int, int, int, int], batch: int) -> int:
    """FLOPs of a convolution of ``shape`` (:func:`conv_shape`, padded to keep its side) on ``batch`` images."""
    c_in, c_out, k, side = shape
    return 2 * batch * c_out * c_in * k * k * side * side


def conv_label(shape: tuple[int, int, int, int], layout: str) -> str:
    """The name of the kernels of a convolution of ``shape`` (:func:`conv_shapes`) in ``layout`` (of :data:`FORMATS`),
    to which each pass's name (:data:`PASSES`) is added."""
    c_in, c_out, k, side = shape
    return f"conv {c_in}->{c_out} {k}x{k} at {side}x{side} {layout}"


def conv_kernels(shape: tuple[int, int, int, int], batch: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, tuple[Callable[[], Any], float]]:
    """A convolution of ``shape`` (:func:`conv_shapes`) on ``batch`` images in ``dtype``: its forward, backward to
    the input and backward to the weights, in each of :data:`FORMATS`. Without the bias: adding it and summing
    its gradient are elementwise passes over the output, which a compiler fuses into the ReLU's."""
    c_in, c_out, k, side = shape
    flops = conv_flops(shape, batch)
    pad, one = [k // 2] * 2, [1, 1]
    kernels: dict[str, tuple[Callable[[], Any], float]] = {}
    for name, fmt in FORMATS.items():
        x = torch.randn(batch, c_in, side, side, device=device, dtype=dtype).contiguous(memory_format=fmt)
        w = (torch.randn(c_out, c_in, k, k, device=device, dtype=dtype) / (k * c_in**0.5)).contiguous(
            memory_format=fmt)
        g = torch.randn(batch, c_out, side, side, device=device, dtype=dtype).contiguous(memory_format=fmt)
        backward = partial(torch.ops.aten.convolution_backward, g, x, w, None, one, pad, one, False, [0, 0], 1)
        label = conv_label(shape, name)
        kernels[f"{label} {FORWARD}"] = (partial(F.conv2d, x, w, padding=k // 2), flops)
        kernels[f"{label} {TO_INPUT}"] = (partial(backward, [True, False, False]), flops)
        kernels[f"{label} {TO_WEIGHTS}"] = (partial(backward, [False, True, False]), flops)
    return kernels


def conv_roofline(model: nn.Module, size: int, batch: int, device: torch.device, dtype: torch.dtype | None,
                  timed_too: dict[str, tuple[Callable[[], Any], float]] | None = None) -> Roofline:
    """The convolutions of ``model``'s shapes (:func:`conv_shapes`) on ``batch`` images of ``size``, in ``dtype``
    (with ``timed_too``: see :class:`Roofline`)."""
    kernels: dict[str, tuple[Callable[[], Any], float]] = {}
    for shape in conv_shapes(model, size):
        kernels.update(conv_kernels(shape, batch, device, dtype or torch.float32))
    return Roofline(kernels, device, CONV_REPEATS, timed_too)


def per_round(rounds: dict[str, list[float]], kernels: dict[str, list[str]],
              precision: str) -> tuple[list[float], list[str]]:
    """A precision's roofline in every round, from the rounds' ``gemm_<p>_tflops`` and ``conv_<p>_tflops``
    (those measured): the faster in each round, and the kernel that set it (from ``kernels``, each
    measurement's winner by contender, else the contender's name)."""
    sets = [name for name in (f"gemm_{precision}_tflops", f"conv_{precision}_tflops") if name in rounds]
    rates, names = [], []
    for i in range(len(rounds[sets[0]])):
        best = max(sets, key=lambda name: rounds[name][i])
        rates.append(rounds[best][i])
        names.append(kernels[best][i] if best in kernels else best)
    return rates, names


def summary(rates: list[float], names: list[str]) -> dict[str, Any]:
    """A roofline's median over the rounds and the kernel that set it most often."""
    return {"tflops": statistics.median(rates), "kernel": Counter(names).most_common(1)[0][0]}


def roofline_contenders(settings: Settings, model: nn.Module, dtypes: set[torch.dtype | None],
                        device: torch.device,
                        timed_too: dict[torch.dtype | None, dict[str, tuple[Callable[[], Any], float]]] | None = None
                        ) -> dict[str, Roofline]:
    """The roofline of each precision in ``dtypes`` (None: fp32), in TFLOP/s each time it is measured: a large
    ``torch.mm`` (``gemm_<p>_tflops``) and the convolutions of ``model``'s shapes at the bench's batch
    (``conv_<p>_tflops``, with a precision's kernels in ``timed_too`` timed alongside), each recording the kernel
    that set it."""
    contenders = {}
    for dtype in sorted(dtypes, key=lambda d: list(PRECISION_NAMES).index(d)):
        p = precision_name(dtype)
        contenders[f"gemm_{p}_tflops"] = gemm_roofline(device, dtype, settings.gemm)
        contenders[f"conv_{p}_tflops"] = conv_roofline(model, settings.size, settings.batch, device, dtype,
                                                       (timed_too or {}).get(dtype))
    return contenders
