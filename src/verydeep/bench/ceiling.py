"""The kernel ceiling of ``verydeep bench``: how fast a step made of nothing but the net's own kernels could be.

Every conv and FC layer of the net (Table 1) is timed alone at the bench's batch, in the same rounds as the
roofline: each pass a training step runs (forward, backward to the input but for the first layer, whose input
needs no gradient, backward to the weights), a convolution in channels_last and in NCHW, the faster kept. Their
sum is a step in which ReLU, pooling, dropout, casts, the loss and the update take no time: the fastest any
implementation built on these kernels can be. Its FLOP rate (the model's FLOPs, as every contender's) over the
roofline is therefore the highest roofline share such an implementation can reach, and a contender's rate over
it is the share of what the kernels allow that it gets.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from verydeep.bench.measure import layer_calls
from verydeep.bench.roofline import (
    FORMATS,
    FORWARD,
    PASSES,
    TO_INPUT,
    TO_WEIGHTS,
    conv_flops,
    conv_kernels,
    conv_label,
    conv_shape,
)

#: A layer call as the ceiling needs it: the kernels' names of each pass it runs in training, and its FLOPs.
Layer = tuple[dict[str, list[str]], float]


def fc_label(module: nn.Linear) -> str:
    """The name of an FC layer's kernels, to which each pass's name is added."""
    return f"fc {module.in_features}->{module.out_features}"


def fc_flops(module: nn.Linear, batch: int) -> int:
    """FLOPs of one of an FC layer's products on ``batch`` inputs."""
    return 2 * batch * module.in_features * module.out_features


def layers(model: nn.Module, size: int, batch: int) -> list[Layer]:
    """Each conv and FC call of ``model`` on ``batch`` images of ``size``: for each pass of a training step (no
    backward to the input of the first layer), the names of the kernels that can run it, and the call's FLOPs."""
    out: list[Layer] = []
    for i, (module, inputs, _) in enumerate(layer_calls(model, size)):
        passes = PASSES if i else (FORWARD, TO_WEIGHTS)
        if isinstance(module, nn.Conv2d):
            shape = conv_shape(module, inputs[-1])
            out.append(({p: [f"{conv_label(shape, layout)} {p}" for layout in FORMATS] for p in passes},
                        conv_flops(shape, batch)))
        else:
            out.append(({p: [f"{fc_label(module)} {p}"] for p in passes}, fc_flops(module, batch)))
    return out


def layer_kernels(model: nn.Module, size: int, batch: int, device: torch.device, dtype: torch.dtype | None
                  ) -> dict[str, tuple[Callable[[], Any], float]]:
    """The kernels :func:`layers` names that the roofline's convolutions lack: the first convolution's forward
    and backward to the weights, and each FC layer's three matrix products, at ``batch`` in ``dtype``."""
    calls = layer_calls(model, size)
    first, inputs, _ = calls[0]
    kernels = {name: k for name, k in conv_kernels(conv_shape(first, inputs[-1]), batch, device,
                                                   dtype or torch.float32).items()
               if not name.endswith(TO_INPUT)}
    for module, _, _ in calls:
        if isinstance(module, nn.Linear):
            kernels.update(fc_kernels(module, batch, device, dtype or torch.float32))
    return kernels


def fc_kernels(module: nn.Linear, batch: int, device: torch.device, dtype: torch.dtype
               ) -> dict[str, tuple[Callable[[], Any], float]]:
    """An FC layer's products on ``batch`` inputs: forward, backward to the input and to the weights."""
    x = torch.randn(batch, module.in_features, device=device, dtype=dtype)
    w = torch.randn(module.out_features, module.in_features, device=device, dtype=dtype) / module.in_features**0.5
    g = torch.randn(batch, module.out_features, device=device, dtype=dtype)
    flops, label = fc_flops(module, batch), fc_label(module)
    return {f"{label} {FORWARD}": (partial(torch.mm, x, w.t()), flops),
            f"{label} {TO_INPUT}": (partial(torch.mm, g, w), flops),
            f"{label} {TO_WEIGHTS}": (partial(torch.mm, g.t(), x), flops)}


def seconds(rates: dict[str, float], net: list[Layer], passes: tuple[str, ...]) -> float:
    """Seconds of ``net``'s ``passes``, each at its fastest kernel's FLOP/s in ``rates`` (one measurement's)."""
    return sum(flops / max(rates[name] for name in names[p]) for names, flops in net for p in passes if p in names)


def per_round(measured: list[dict[str, float]], net: list[Layer], train_flops: float, infer_flops: float
              ) -> dict[str, list[float]]:
    """The ceiling's training and inference TFLOP/s (``ceiling_train_tflops``, ``ceiling_infer_tflops``) in each
    round, from each round's kernel rates ``measured`` (:attr:`~.roofline.Roofline.rates`), in the model's FLOPs
    (``train_flops`` and ``infer_flops`` a batch)."""
    return {"ceiling_train_tflops": [train_flops / seconds(r, net, PASSES) / 1e12 for r in measured],
            "ceiling_infer_tflops": [infer_flops / seconds(r, net, (FORWARD,)) / 1e12 for r in measured]}
