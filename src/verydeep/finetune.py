"""Starting a run from published or trained weights: fine-tuning as users of torchvision expect.

``train --weights SOURCE`` takes the architecture and the input convention of the weights (any
source :func:`verydeep.weights.load_published` reads), copies every layer whose shape fits the
new net, and leaves the others (FC8 when the number of classes differs) to the random init.
``--freeze`` stops the gradients of the layers up to a named one (``features``: every
convolutional layer); ``--lr-copied`` gives the copied layers a learning rate of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from verydeep.errors import UserError
from verydeep.model import VGG


def copy_matching(model: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy into ``model`` every tensor of ``weights`` with the same name and shape; returns the
    names of the parameters copied and of those left as initialised."""
    state = model.state_dict()
    fits = {name: value for name, value in weights.items() if name in state and state[name].shape == value.shape}
    model.load_state_dict(fits, strict=False)
    parameters = [name for name, _ in model.named_parameters()]
    return [name for name in parameters if name in fits], [name for name in parameters if name not in fits]


def frozen_modules(model: VGG, upto: str) -> list[str]:
    """The module prefixes (``features.0`` ...) of the layers up to and including ``upto``: a layer
    name of ``model.tap_names`` (``conv4_3``, ``fc6``), or ``features`` for every convolutional layer."""
    taps = list(model.tap_names.items())
    if upto == "features":
        last = max(i for i, (_, module) in enumerate(taps) if module.startswith("features."))
    elif upto in model.tap_names:
        last = [name for name, _ in taps].index(upto)
    else:
        names = ", ".join(name for name, _ in taps if name.startswith(("conv", "fc")))
        raise UserError(f"--freeze {upto}: not a layer of {model.name} (features, or one of {names})")
    return [module for _, module in taps[: last + 1]]


def freeze(model: VGG, upto: str | None) -> list[str]:
    """Stop the gradients of the layers up to ``upto`` (None: none); returns the frozen parameters' names."""
    if upto is None:
        return []
    prefixes = tuple(f"{module}." for module in frozen_modules(model, upto))
    frozen = []
    for name, parameter in model.named_parameters():
        if name.startswith(prefixes):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(model: nn.Module, copied: list[str], lr: float, lr_copied: float | None) -> list[dict[str, Any]]:
    """SGD parameter groups: the copied layers at ``lr_copied`` (when given), the others at ``lr``;
    frozen parameters are left out. Each group keeps its ``lr_ratio`` to the run's learning rate,
    which the schedule divides."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if lr_copied is None:
        return [{"params": [p for _, p in trainable], "lr": lr, "lr_ratio": 1.0}]
    copied_set = set(copied)
    groups = [
        {"params": [p for name, p in trainable if name in copied_set], "lr": lr_copied, "lr_ratio": lr_copied / lr},
        {"params": [p for name, p in trainable if name not in copied_set], "lr": lr, "lr_ratio": 1.0},
    ]
    return [group for group in groups if group["params"]]
