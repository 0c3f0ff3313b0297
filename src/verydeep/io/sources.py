"""The one loader: any source of weights -> a net ready to run, its input convention and class names.

A source is a run directory, a checkpoint, a ``.safetensors`` file (ours or a torchvision state
dict), a torchvision ``.pth``, the authors' Caffe ``.caffemodel``, a Keras file, or a known name such
as ``vgg16`` found in the weights folder (:mod:`verydeep.io.weights` reads each, with the readers of
:mod:`verydeep.io.formats`). Every command that takes weights goes through :func:`load`; so can Python users::

    import verydeep
    net = verydeep.load("vgg16")     # or "runs/D", "VGG_ILSVRC_16_layers.caffemodel", "vgg16.h5"
    probs = net.model(verydeep.data.to_input(images, net.preprocess)).softmax(1)  # uint8 (N, 3, 224, 224)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from verydeep.data.preprocess import Preprocess
from verydeep.errors import UserError
from verydeep.io.weights import input_convention, load_published, task_name
from verydeep.nn import configs
from verydeep.nn.model import VGG
from verydeep.nn.tasks import Classification
from verydeep.runtime.device import pick_device, prepare


def model_name(recipe: dict[str, Any]) -> str:
    """The configuration of Table 1, with ``-BN`` for batch norm: ``D``, ``A-BN``."""
    return configs.canonical(recipe["config"]) + ("-BN" if recipe.get("batch_norm") else "")


#: The ``purpose`` of :func:`load` that needs a classifier: a net trained for another task is refused.
CLASSIFY = "classify"

#: What each 4 outputs of a localisation net are (Appendix A): the box code, in crop sides.
BOX_CODE = ("centre x", "centre y", "width", "height")


@dataclass
class LoadedNet:
    """A net from :func:`load`: the model (eval mode), its recipe (the run record, or what the weights
    say), the file format, its input convention (:class:`Preprocess`), its task and the classes it knows."""

    model: VGG
    recipe: dict[str, Any]
    format: str  # torchvision, caffe, keras or verydeep
    source: str
    preprocess: Preprocess

    @property
    def has_fc_layers(self) -> bool:
        """False for a file without FC6 to FC8 (Keras' ``notop`` kind), whose classifier is random."""
        return self.recipe.get("head") != "random"

    @property
    def name(self) -> str:
        return model_name(self.recipe)

    @property
    def task(self) -> str:
        """``classification``, or Appendix A's ``localisation-scr`` / ``localisation-pcr``."""
        return task_name(self.recipe)

    @property
    def classes(self) -> list[str]:
        """The classes the net was trained on (synsets for ImageNet nets, folder names for ours); a
        classifier's outputs are theirs, one each."""
        return [str(c) for c in self.recipe.get("classes") or range(self.recipe["num_classes"])]

    @property
    def class_names(self) -> list[str]:
        """Readable names of the classes (the classes themselves where no names are known)."""
        return [str(c) for c in self.recipe.get("class_names") or self.classes]

    @property
    def output_names(self) -> list[str]:
        """What each output is: a classifier's class names; a localisation net's box coordinates (their
        code, standardised by the recipe's ``box_code_mean`` and ``box_code_std`` where it has them),
        per class for PCR (``"cat: width"``); a task of the user's own, ``output 0``, ``output 1``..."""
        if self.task == Classification.name:
            return self.class_names
        if self.task == "localisation-scr":  # one box, whatever the class
            return list(BOX_CODE)
        if self.task == "localisation-pcr":
            return [f"{name}: {part}" for name in self.class_names for part in BOX_CODE]
        return [f"output {i}" for i in range(self.recipe.get("outputs") or self.recipe["num_classes"])]


def load(source: str | Path, weights_dir: str | Path | None = None, *, data: str | Path | None = None,
         device: str | torch.device | None = "cpu", dtype: torch.dtype | None = None, purpose: str | None = None,
         ) -> LoadedNet:
    """The net in ``source`` on ``device``, its weights in ``dtype`` (the autocast dtype it will run under,
    :func:`verydeep.runtime.device.prepare`) when given. ``data``: the folder whose ``preprocess.json`` a net
    without a convention of its own takes. ``purpose`` (say, "classify"): what the caller needs the FC
    layers for; weights without them (Keras' ``notop`` files) are then refused in one line, and for
    :data:`CLASSIFY` so is a net trained for another task (a localisation net's outputs are boxes)."""
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"source: a file, a run folder or a known name (vgg16, ...); got {source!r}")
    device = "cpu" if device is None else device
    if not isinstance(device, str | torch.device):  # an index means a GPU to torch, and no GPU may be at hand
        raise TypeError(f"device: a name ('cpu', 'cuda', 'cuda:1', 'auto') or a torch.device; got {device!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):  # what autocast runs a net in
        raise TypeError(f"dtype: torch.bfloat16, torch.float16, torch.float32 or None; got {dtype!r}")
    if data is not None and not Path(data).expanduser().exists():  # its statistics would be ImageNet's, silently
        raise UserError(f"data: {data} does not exist (a folder, or its preprocess.json, whose statistics a net "
                        "without a convention takes)")
    place = pick_device(device) if isinstance(device, str) else device  # a bad name: one line naming it
    published = load_published(source, weights_dir)
    if purpose is not None:
        published.require_fc_layers(purpose)
    if purpose == CLASSIFY:
        published.require_classifier(purpose)
    model = prepare(published.model, place, dtype=dtype).eval()
    return LoadedNet(model, published.recipe, published.format, published.source,
                     input_convention(published.recipe, data))
