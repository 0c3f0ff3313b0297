"""The device a command runs on, the machine a measurement belongs to, and a net made ready for both."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from verydeep.errors import UserError


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


def refuse_inference_mode(work: str) -> None:
    """``work`` that needs gradients (training, a saliency map) inside the caller's ``torch.inference_mode()``,
    which nothing inside can lift, is a :class:`UserError` (``torch.no_grad()`` is lifted where needed)."""
    if torch.is_inference_mode_enabled():
        raise UserError(f"{work} needs gradients, which torch.inference_mode() around the call rules out; call it "
                        "outside (torch.no_grad() is fine)")
