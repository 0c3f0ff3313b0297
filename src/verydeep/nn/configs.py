"""Table 1 of the paper as data: the six ConvNet configurations A, A-LRN, B, C, D, E.

Each configuration is the list of its layers in the paper's own notation: ``conv3-64`` is a 3x3
convolution with 64 output channels (stride 1, padding 1), ``conv1-256`` a 1x1 convolution
(padding 0), ``LRN`` the AlexNet local response normalisation and ``maxpool`` a 2x2 max-pooling
with stride 2 (Sec. 2.1). Every convolution is followed by a ReLU. The three fully-connected
layers FC-4096, FC-4096, FC-1000 follow the last maxpool in every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from verydeep.errors import UserError

TABLE_1: dict[str, tuple[str, ...]] = {
    "A": (
        "conv3-64", "maxpool",
        "conv3-128", "maxpool",
        "conv3-256", "conv3-256", "maxpool",
        "conv3-512", "conv3-512", "maxpool",
        "conv3-512", "conv3-512", "maxpool",
    ),
    "A-LRN": (
        "conv3-64", "LRN", "maxpool",
        "conv3-128", "maxpool",
        "conv3-256", "conv3-256", "maxpool",
        "conv3-512", "conv3-512", "maxpool",
        "conv3-512", "conv3-512", "maxpool",
    ),
    "B": (
        "conv3-64", "conv3-64", "maxpool",
        "conv3-128", "conv3-128", "maxpool",
        "conv3-256", "conv3-256", "maxpool",
        "conv3-512", "conv3-512", "maxpool",
        "conv3-512", "conv3-512", "maxpool",
    ),
    "C": (
        "conv3-64", "conv3-64", "maxpool",
        "conv3-128", "conv3-128", "maxpool",
        "conv3-256", "conv3-256", "conv1-256", "maxpool",
        "conv3-512", "conv3-512", "conv1-512", "maxpool",
        "conv3-512", "conv3-512", "conv1-512", "maxpool",
    ),
    "D": (
        "conv3-64", "conv3-64", "maxpool",
        "conv3-128", "conv3-128", "maxpool",
        "conv3-256", "conv3-256", "conv3-256", "maxpool",
        "conv3-512", "conv3-512", "conv3-512", "maxpool",
        "conv3-512", "conv3-512", "conv3-512", "maxpool",
    ),
    "E": (
        "conv3-64", "conv3-64", "maxpool",
        "conv3-128", "conv3-128", "maxpool",
        "conv3-256", "conv3-256", "conv3-256", "conv3-256", "maxpool",
        "conv3-512", "conv3-512", "conv3-512", "conv3-512", "maxpool",
        "conv3-512", "conv3-512", "conv3-512", "conv3-512", "maxpool",
    ),
}

#: Today's names of the configurations (torchvision's for A, B, D, E).
ALIASES: dict[str, str] = {
    "vgg11": "A",
    "vgg11-lrn": "A-LRN",
    "vgg13": "B",
    "vgg16-c": "C",
    "vgg16": "D",
    "vgg19": "E",
}

#: Width of the two hidden fully-connected layers (FC-4096).
FC_WIDTH = 4096

#: AlexNet's LRN parameters, used by A-LRN (Sec. 2.1): size 5, alpha 1e-4, beta 0.75, k 2. As in Caffe, which
#: the authors trained with, and cuda-convnet, PyTorch divides alpha by the size (k + alpha/5 * sum of squares);
#: AlexNet's paper writes the formula without the division.
LRN_PARAMS = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}

@dataclass(frozen=True)
class Layer:
    """One entry of Table 1 with its name in the authors' Caffe convention (``conv3_2``)."""

    kind: str  # "conv", "lrn" or "pool"
    name: str
    channels: int = 0
    kernel: int = 0


def canonical(config: str) -> str:
    """Resolve ``"vgg16"``, ``"d"`` or ``"D"`` to the Table 1 key ``"D"``."""
    key = config.strip() if isinstance(config, str) else ""
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    if key.upper() in TABLE_1:
        return key.upper()
    names = ", ".join([*TABLE_1, *ALIASES])
    raise UserError(f"unknown VGG configuration {config!r}; choose one of {names}")


def layers(config: str) -> list[Layer]:
    """The layers of ``config`` in order, named ``convB_I`` / ``poolB`` per block B (A-LRN's LRN ``norm1``)."""
    out: list[Layer] = []
    block, index = 1, 0
    for spec in TABLE_1[canonical(config)]:
        if spec == "maxpool":
            out.append(Layer("pool", f"pool{block}"))
            block, index = block + 1, 0
        elif spec == "LRN":
            out.append(Layer("lrn", f"norm{block}"))
        else:
            kernel, channels = spec.removeprefix("conv").split("-")
            index += 1
            out.append(Layer("conv", f"conv{block}_{index}", int(channels), int(kernel)))
    return out
