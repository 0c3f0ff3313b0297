"""The authors' layer names (conv1_1 ... fc8; Table 1, Sec. 2.3) in torchvision's keys: where the Caffe and
Keras readers meet, each giving its layers by those names in PyTorch's shapes (PAPER.md Sec. 8)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from verydeep.errors import UserError
from verydeep.nn import configs
from verydeep.nn.model import VGG


def named_to_state(named: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, lrn: bool = False
                   ) -> dict[str, Tensor]:
    """Weights by Caffe layer name (conv1_1 ... fc8; PyTorch's OIHW and (out, in) shapes) in our keys,
    through ``model.tap_names`` of the configuration their names and kernels make."""
    for name, (w, b) in named.items():
        check_shape(w.shape, f"layer {name}, weights", path)
        if w.ndim != (4 if name.startswith("conv") else 2) or b.size != w.shape[0]:
            raise UserError(f"{path}: layer {name} has weights {w.shape} and bias {b.shape}")
    config = config_of({n: w.shape[-1] for n, (w, _) in named.items() if n.startswith("conv")}, path, lrn)
    taps = VGG(config, num_classes=1, width=1 / 64, input_size=32).tap_names
    state = {}
    for name, (w, b) in named.items():
        state[f"{taps[name]}.weight"] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        state[f"{taps[name]}.bias"] = torch.from_numpy(np.ascontiguousarray(b.reshape(-1), dtype=np.float32))
    return state


def config_of(kernels: dict[str, int], path: Path, lrn: bool = False) -> str:
    """The configuration of Table 1 whose convolutions are ``kernels`` (kernel size by layer name), else a
    one-line error naming the first layer that no configuration has, or all of them."""
    config = next((c for c in configs.TABLE_1
                   if kernels == conv_kernels(c) and lrn == ("LRN" in configs.TABLE_1[c])), None)
    if config is not None:
        return config
    if not kernels:
        raise UserError(f"{path}: no convolution layers (conv1_1 ...), so no configuration of Table 1")
    known = {name for c in configs.TABLE_1 for name in conv_kernels(c)}
    odd = next((name for name in kernels if name not in known), None)
    if odd is not None:
        raise UserError(f"{path}: layer {odd} is in no configuration of Table 1, so the layers form no VGG")
    raise UserError(f"{path}: layers {', '.join(kernels)} are no configuration of Table 1")


def check_shape(shape: tuple[int, ...], what: str, path: Path) -> None:
    """A one-line error unless ``shape`` has at least one dimension and each is a positive integer: a zero
    dimension makes an empty layer (and divides by zero later), a negative one a nonsense size."""
    if not shape or any(int(d) < 1 for d in shape):
        raise UserError(f"{path}: {what}: shape {tuple(int(d) for d in shape)}, but each dimension must be "
                        "a positive integer")


def conv_kernels(config: str) -> dict[str, int]:
    """Each convolution's kernel size in ``config``, by layer name (``conv1_1`` ...)."""
    return {layer.name: layer.kernel for layer in configs.layers(config) if layer.kind == "conv"}


def vgg_layer(name: str) -> bool:
    """Whether ``name`` is one of VGG's weight layers (``conv1_1`` ... ``fc8``)."""
    return re.fullmatch(r"conv\d+_\d+|fc[678]", name) is not None
