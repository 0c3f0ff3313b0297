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
    """Copy into ``model`` every layer whose tensors ``weights`` all hold, by name and shape: a layer is
    copied whole or not at all (never FC6's bias without its weight). Returns the names of the
    parameters copied and of those left as initialised."""
    state = model.state_dict()
    layers: dict[str, list[str]] = {}
    for name in state:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    fits = {name: weights[name] for names in layers.values()
            if all(n in weights and weights[n].shape == state[n].shape for n in names) for name in names}
    model.load_state_dict(fits, strict=False)
    parameters = [name for name, _ in model.named_parameters()]
    return [name for name in parameters if name in fits], [name for name in parameters if name not in fits]


def frozen_modules(model: VGG, upto: str) -> list[str]:
    """The module prefixes (``features.0`` ...) of the layers up to and including ``upto``: a layer
    name of ``model.tap_names`` (``conv4_3``, ``fc6``), or ``features`` for every convolutional layer."""
    taps = list(model.tap_names.items())
    names = [name for name, _ in taps]
    if upto == "features":
        last = max(i for i, (_, module) in enumerate(taps) if module.startswith("features."))
    elif upto in model.tap_names:
        last = names.index(upto)
        if upto.startswith("conv") and f"bn{upto[4:]}" in names:  # a conv's batch norm belongs to its layer
            last = names.index(f"bn{upto[4:]}")
    else:
        known = ", ".join(name for name in names if name.startswith(("conv", "fc")))
        raise UserError(f"--freeze {upto}: not a layer of {model.name} (features, or one of {known})")
    return [module for _, module in taps[: last + 1]]


def freeze(model: VGG, upto: str | None) -> list[str]:
    """Stop the gradients of the layers up to ``upto`` (None: none) and hold their batch norms in eval
    mode (their running statistics unchanged by training); returns the frozen parameters' names.
    Freezing every layer leaves nothing to train: a :class:`UserError`."""
    if upto is None:
        return []
    modules = frozen_modules(model, upto)
    prefixes = tuple(f"{module}." for module in modules)
    frozen = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    if len(frozen) == len(list(model.parameters())):
        raise UserError(f"--freeze {upto} freezes every layer of {model.name}: nothing would be trained; freeze "
                        "fewer (features, or a layer before fc8)")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen and parameter.requires_grad)
    model.frozen_norms = [m for m in modules if isinstance(model.get_submodule(m), nn.modules.batchnorm._BatchNorm)]
    model.train(model.training)
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
