"""torchvision's VGG (Sec. 2's configurations A, B, D, E), the bench's yardstick: in plain fp32 (NCHW, no
autocast), and at its best (:mod:`.peer`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from verydeep.bench.measure import images_per_second, inference_step
from verydeep.bench.peer import peer_contenders
from verydeep.bench.settings import TORCHVISION, WARMUP_STEPS, Settings
from verydeep.nn.model import vgg
from verydeep.runtime.precision import autocast


def plain_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None) -> tuple[Callable[[], None], Callable[[], None]]:
    """A plain training step (forward, cross-entropy, backward, SGD with momentum) and an inference
    step of ``model`` on ``x``, under autocast to ``dtype`` (None: fp32)."""
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        with autocast(device, dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return train_step, inference_step(model, model, x, dtype)


def reference_model(config: str, width: float, size: int, num_classes: int) -> nn.Module:
    """torchvision's VGG of ``config``; at another width or input size its layers are ours (the
    same modules and shapes) inside torchvision's model."""
    reference = getattr(torchvision.models, TORCHVISION[config])(weights=None, num_classes=num_classes)
    if width != 1.0 or size != 224:
        ours = vgg(config, num_classes=num_classes, width=width, input_size=size)
        reference.features, reference.classifier = ours.features, ours.classifier
        reference.avgpool = nn.AdaptiveAvgPool2d(size // 32)
    return reference


def reference_batch(settings: Settings, num_classes: int, device: torch.device
                    ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """torchvision's VGG of the settings and a random batch for it, drawn from seed 0: the same for both references."""
    torch.manual_seed(0)
    model = reference_model(settings.config, settings.width, settings.size, num_classes).to(device)
    x = torch.randn(settings.batch, 3, settings.size, settings.size, device=device)
    y = torch.randint(0, num_classes, (settings.batch,), device=device)
    return model, x, y


def reference_contenders(settings: Settings, num_classes: int, device: torch.device) -> dict[str, Callable[[], float]]:
    """torchvision's VGG, plain fp32 and NCHW: training step and inference, images per second."""
    model, x, y = reference_batch(settings, num_classes, device)
    train_step, infer_step = plain_steps(model, x, y, device, None)
    model.train()
    for _ in range(WARMUP_STEPS):
        train_step()
        infer_step()
    return {"torchvision_train": lambda: images_per_second(train_step, settings.batch, settings.steps, device),
            "torchvision_infer": lambda: images_per_second(infer_step, settings.batch, settings.steps, device)}


def best_contenders(settings: Settings, num_classes: int, device: torch.device,
                    dtype: torch.dtype | None) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
    """torchvision's VGG at its best (:mod:`verydeep.peer`) in ``dtype``, eager and, unless the settings leave
    it out, compiled: training step and inference, images per second; and what the peer is."""
    model, x, y = reference_batch(settings, num_classes, device)
    return peer_contenders(model, x, y, dtype, settings.steps, WARMUP_STEPS, settings.compiled_peer)
