"""How the bench measures: a rate over steps, rounds in which the contenders take turns, and a net's
multiply-accumulates per image (Sec. 2's conv and FC layers), whence its FLOPs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from verydeep.runtime.precision import autocast


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], Any], images: int, steps: int, device: torch.device) -> float:
    """Images per second of ``steps`` calls of ``step``, each on ``images`` images."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return images * steps / (time.perf_counter() - start)


def inference_step(net: nn.Module, model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None
                   ) -> Callable[[], None]:
    """A forward pass of ``net`` (``model`` itself, or compiled) on ``x`` under autocast to ``dtype``, with
    ``model`` in eval mode and no autograd, as evaluation runs it."""

    @torch.inference_mode()
    def step() -> None:
        model.eval()
        with autocast(x.device, dtype):
            net(x)
        model.train()

    return step


def alternate(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each contender's measurements, one per round, the contenders taking turns in every round."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, measure in contenders.items():
            results[name].append(measure())
    return results


def layer_calls(model: nn.Module, size: int) -> list[tuple[nn.Module, torch.Size, torch.Size]]:
    """Each call of ``model``'s conv and linear layers with its input and output shapes, in order, in one
    forward pass of a ``size`` x ``size`` RGB image (eval mode, no autograd; seen by forward hooks)."""
    calls: list[tuple[nn.Module, torch.Size, torch.Size]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        calls.append((module, inputs[0].shape, output.shape))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return calls


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates per image of ``model``'s conv and linear layers on a ``size`` x ``size``
    RGB image."""
    total = 0
    for module, _, output in layer_calls(model, size):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw
        else:
            total += output.numel() * module.in_features
    return total
