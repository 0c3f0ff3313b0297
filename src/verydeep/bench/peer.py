"""torchvision's VGG as a user who cares about speed runs it: the peer ``verydeep bench`` measures us against.

Autocast to bf16 where the device multiplies it fast (fp16, with a gradient scaler, on a GPU without
bf16; fp32 on a CPU without fast bf16), channels_last, and SGD's fused update with the trainer's
momentum and weight decay; eager, and compiled with ``torch.compile``. Which of the two is faster
depends on the machine, so both are measured in the bench's rounds and the faster is kept, for
training and for inference each, and named.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from verydeep.bench.measure import images_per_second, inference_step
from verydeep.runtime.precision import autocast, autocast_dtype, precision_name

#: The ways of running the peer, in the order they are measured.
VARIANTS = ("eager", "compiled")
#: The peer's update: SGD as the trainer runs it (momentum, weight decay), in one fused kernel.
UPDATE = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}


def peer_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the peer: bf16 where ``auto`` picks it, fp16 on a CUDA GPU without bf16, else fp32."""
    dtype = autocast_dtype(device, "auto")
    return torch.float16 if dtype is None and device.type == "cuda" else dtype


def best_steps(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, dtype: torch.dtype | None) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step (autocast, cross-entropy, backward, the fused update; an fp16 loss scaled) and an
    inference step of ``net`` (``model`` itself, or compiled) on ``x``."""
    device = x.device
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None

    def train_step() -> None:
        with autocast(device, dtype):
            loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return train_step, inference_step(net, model, x, dtype)


def peer_contenders(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None, steps: int,
                    warmup: int, compiled: bool = True) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
    """The peer's training step and inference, eager and (when ``compiled``) compiled, each as images per second
    over ``steps``, named ``torchvision_best_<variant>_<train|infer>``, after ``warmup`` steps of each (which
    compile); and what the peer is. A compiler that fails leaves the eager peer alone, its error reported."""
    device = x.device
    model = model.to(memory_format=torch.channels_last).train()
    x = x.contiguous(memory_format=torch.channels_last)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.SGD(model.parameters(), **UPDATE, fused=fused)
    info: dict[str, Any] = {"precision": precision_name(dtype), "channels_last": True,
                            "update": "SGD, fused" if fused else "SGD", "compile_error": None}
    contenders: dict[str, Callable[[], float]] = {}
    nets = {"eager": model, "compiled": torch.compile(model)} if compiled else {"eager": model}
    for variant, net in nets.items():
        train_step, infer_step = best_steps(net, model, optimizer, x, y, dtype)
        try:
            for _ in range(warmup):
                train_step()
                infer_step()
        except Exception as error:  # a compiler missing or failing on this machine: the eager peer stands
            if variant == "eager":
                raise
            info["compile_error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            continue
        contenders[f"torchvision_best_{variant}_train"] = partial(images_per_second, train_step, len(x), steps, device)
        contenders[f"torchvision_best_{variant}_infer"] = partial(images_per_second, infer_step, len(x), steps, device)
    return contenders, info


def best_variant(rounds: dict[str, list[float]], mode: str) -> str:
    """The peer's faster variant at ``mode`` (``train`` or ``infer``): the higher median rate over the rounds."""
    measured = [v for v in VARIANTS if f"torchvision_best_{v}_{mode}" in rounds]
    return max(measured, key=lambda v: statistics.median(rounds[f"torchvision_best_{v}_{mode}"]))
