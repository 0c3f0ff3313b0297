"""Initialisation protocols of Sec. 3.1, all in one place.

- ``paper``: weights drawn from a zero-mean normal, biases zero. The paper writes "variance
  10^-2", but the authors' released Caffe solver definitions use ``gaussian std: 0.01`` (variance
  1e-4); a std of 0.1 (variance 1e-2 read literally) grows the activations of net A by about 1.7x
  per 3x3 conv layer and makes training diverge, so we use std 0.01 (``PAPER_STD``), as Caffe did.
  Net A trains from it; deeper nets do not, which is why the paper warm-starts them.
- ``xavier`` (``glorot``): Glorot and Bengio's uniform initialisation, biases zero; the paper notes
  after submission that it trains the deep nets without pre-training.
- ``kaiming``: torchvision's default for its VGGs (He normal, fan-out, on convs; N(0, 0.01) on
  FC layers), the usual modern choice at full width.
- ``he``: He et al.'s normal initialisation (fan-in, ReLU gain) on every conv *and* FC layer, a
  linear gain on the last one. The signal keeps its scale through all layers, so narrow nets
  without batch norm learn from the first step; under ``kaiming`` or ``xavier`` the logits of a
  width-1/2 net E start about 1e-3 to 1e-4 of their scale here and training stalls for epochs
  (N(0, 0.01) suits 4096-wide FC layers, not 1024-wide ones).
- ``warm_start``: the deep nets of Sec. 3.1 start from a trained net A: its first four conv
  layers and last three FC layers are copied, the others keep their random initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from verydeep.errors import UserError

PAPER_STD = 0.01
PROTOCOLS = ("paper", "xavier", "glorot", "kaiming", "he")

#: Why each protocol, for the run record: what a run started from random weights was initialised with.
REASONS = {
    "he": "He et al.'s normal init on every layer keeps the signal's scale through any depth and width: every "
          "configuration learns from random weights (training's default)",
    "paper": "the paper's N(0, 0.01) (Sec. 3.1): net A learns from it, the deeper nets only from A's weights",
    "xavier": "Glorot's uniform init, which the paper notes trains the deep nets without pre-training",
    "glorot": "Glorot's uniform init, which the paper notes trains the deep nets without pre-training",
    "kaiming": "torchvision's init for its VGGs (He fan-out on convs, N(0, 0.01) on FC layers)",
}


def initialise(model: nn.Module, protocol: str = "kaiming", std: float = PAPER_STD) -> nn.Module:
    """(Re-)initialise every conv, linear and batch-norm layer of ``model`` in place (batch norm's running
    statistics too)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown init {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if protocol == "he":
                gain = "linear" if module is layers[-1] else "relu"
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity=gain)
            elif protocol == "paper":
                nn.init.normal_(module.weight, 0.0, std)
            elif protocol in ("xavier", "glorot"):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # its weight 1, bias 0 and running statistics those of no batch seen
    return model


def warm_start_layers(source: nn.Module, convs: int = 4) -> list[str]:
    """Names of the layers copied from ``source``: its first ``convs`` convs and fc6, fc7, fc8.

    The authors' Caffe models name layers ``conv1_1``, ``conv2_1`` ... and Caffe copies weights
    between layers of the same name. The first four convs of A are ``conv1_1, conv2_1, conv3_1,
    conv3_2``; a deeper net has layers of those names and shapes (for D: 3-64, 64-128, 128-256,
    256-256), whereas its own first four convs (``conv1_1, conv1_2, conv2_1, conv2_2``) do not
    match A's shapes. So the copy is by name, which is the only reading under which it is possible.
    """
    return [*list(source.conv_layers())[:convs], "fc6", "fc7", "fc8"]


@torch.no_grad()
def warm_start(model: nn.Module, source: nn.Module, convs: int = 4, fc8: bool = True) -> list[str]:
    """Copy the paper's layers of a trained shallower ``source`` (net A) into ``model`` (Sec. 3.1), each whole: a
    convolution with the batch norm that follows it, whose scale and statistics its weights were trained under.
    ``fc8`` False leaves FC8 as initialised (its rows score other classes, or another task's outputs).

    Returns the copied layer names. Raises a :class:`UserError` naming the first layer whose shape differs (e.g.
    another width or number of classes), or that has batch norm in one net only, before anything is copied.
    """
    names = [name for name in warm_start_layers(source, convs) if fc8 or name != "fc8"]
    pairs = []  # (ours, theirs) of every tensor copied, all checked before any is
    for name in names:
        if name not in model.tap_names:
            raise UserError(f"warm start: {model.name} has no layer {name} to receive {source.name}'s")
        mine, theirs = whole_layer(model, name), whole_layer(source, name)
        if mine.keys() != theirs.keys():
            raise UserError(f"warm start: {name} has batch norm in only one of {source.name} and {model.name} "
                            "(give --batch-norm as the weights were trained)")
        for key, value in mine.items():
            if value.shape != theirs[key].shape:
                raise UserError(f"warm start: {key} of {source.name} has shape {tuple(theirs[key].shape)} but "
                                f"{model.name} needs {tuple(value.shape)} (same width, crop size and classes?)")
            pairs.append((value, theirs[key]))
    for ours, theirs in pairs:
        ours.copy_(theirs)
    return names


def whole_layer(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of layer ``name`` (``conv3_1``, ``fc6``) of ``model`` by tap name and tensor (``conv3_1.weight``),
    its batch norm's (``bn3_1.running_mean``, the ``bn3_1`` after ``conv3_1``) included."""
    parts = [name, *(["bn" + name.removeprefix("conv")] if name.startswith("conv") else [])]
    return {f"{part}.{key}": value for part in parts if part in model.tap_names
            for key, value in model.get_submodule(model.tap_names[part]).state_dict(keep_vars=True).items()}
