"""torchvision's state dicts (PAPER.md Sec. 8): reading them safely from torch and safetensors files, and the
architecture of Table 1 (Sec. 2.3) their keys and shapes describe."""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from verydeep.errors import UserError
from verydeep.io.checkpoint import check_tensors
from verydeep.io.formats import refuse_unpacking_beyond_weights
from verydeep.nn import configs
from verydeep.nn.configs import FC_WIDTH
from verydeep.nn.model import make_trunk, scaled


def torch_load(path: Path) -> Any:
    """A torch file's tensors, unpickling nothing else; any other file is a one-line error naming it."""
    try:
        # torch warns of a TorchScript archive, in two lines, before refusing it; an open file, not a path, as
        # torch reads a path by its name's suffix (a .safetensors name as safetensors, whatever it holds)
        with warnings.catch_warnings(), open(path, "rb") as file:
            warnings.simplefilter("ignore", UserWarning)
            if zipfile.is_zipfile(file):  # a zip torch file's records are read whole: their sizes checked first
                with zipfile.ZipFile(file) as archive:
                    refuse_unpacking_beyond_weights(path, archive)
            file.seek(0)  # where the zip test left it
            return torch.load(file, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except pickle.UnpicklingError as error:  # a pickle that would build other objects or call code
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(error))
        reason = f" (it would call {found.group(1)})" if found else ""
        raise UserError(f"{path}: refused: it holds more than tensors; loading it could run code{reason}") from error
    except Exception as error:  # damaged archives
        if "TorchScript" in str(error):
            raise UserError(f"{path}: a TorchScript program (as `verydeep export` writes), not weights: give the "
                            "weights it was exported from") from error
        reason = " ".join(str(error).split()).split(". ")[0][:200]
        raise UserError(f"{path}: not a readable torch file ({type(error).__name__}: {reason})") from error


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; a damaged one is a one-line error naming it."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({type(error).__name__})") from error


def state_dict(state: Any, path: Path) -> dict[str, Tensor]:
    """``state`` when it is a state dict of tensors, else a one-line error naming ``path``."""
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError(f"{path}: not a state dict of tensors, nor a verydeep checkpoint")
    check_tensors(state, path)
    return state


def architecture(weights: dict[str, Tensor], path: Path, head: bool) -> dict[str, Any]:
    """Configuration, batch norm, width, crop and classes from the shapes of a torchvision-layout state dict:
    the conv positions give the configuration, the layers' channels the width, FC6's inputs the crop."""
    config, batch_norm = _config_from_keys(weights, path)
    convs = sorted((k for k, v in weights.items() if _conv_key(k, v)), key=_index)
    first, last = weights[convs[0]].shape[0], weights[convs[-1]].shape[0]
    if first < 1 or last < 1:  # the readers refuse empty layers; a net of no channels would divide by zero below
        raise UserError(f"{path}: a convolution of {min(first, last)} output channels")
    nominal = [layer.channels for layer in configs.layers(config) if layer.kind == "conv"]
    sizes = [(channels, weights[key].shape[0]) for channels, key in zip(nominal, convs, strict=True)]
    arch = {"config": config, "batch_norm": batch_norm, "crop": 224, "num_classes": 1000}
    if not head:
        return arch | {"width": _width(sizes, path)}
    fc6, fc8 = weights.get("classifier.0.weight"), weights.get("classifier.6.weight")
    if fc6 is None or fc8 is None or fc6.dim() != 2 or fc8.dim() != 2:
        raise UserError(f"{path}: no classifier (2-D classifier.0.weight and classifier.6.weight)")
    arch["width"] = _width([*sizes, (FC_WIDTH, fc6.shape[0])], path)
    grid = math.isqrt(fc6.shape[1] // last)
    if grid < 1 or grid * grid * last != fc6.shape[1]:
        raise UserError(f"{path}: FC6 takes {fc6.shape[1]} inputs, not a square map of {last} channels")
    return arch | {"crop": 32 * grid, "num_classes": fc8.shape[0]}


def _width(sizes: list[tuple[int, int]], path: Path) -> float:
    """The width multiplier that gives each layer of ``sizes`` (channels at width 1, channels found) its
    channels: a short decimal where one does (0.1, 0.125), else the found channels over the nominal ones of
    the first or last layer (1/64), else the middle of the widths that fit."""
    low, high = 0.0, math.inf
    for nominal, found in sizes:  # scaled() rounds nominal * width to the nearest whole number, at least 1
        low, high = max(low, (found - 0.5) / nominal if found > 1 else 0.0), min(high, (found + 0.5) / nominal)
    middle = (low + high) / 2
    candidates = [round(middle, digits) for digits in (1, 2, 3)]
    candidates += [found / nominal for nominal, found in (sizes[0], sizes[-1])] + [middle]
    fits = [width for width in candidates if width > 0 and all(scaled(n, width) == f for n, f in sizes)]
    if not fits:
        raise UserError(f"{path}: its layers' channels ({', '.join(str(f) for _, f in sizes)}) fit no single "
                        "width multiplier of Table 1's configuration")
    return fits[0]


def _index(key: str) -> int:
    return int(key.split(".")[1])


def _conv_key(key: str, value: Tensor) -> bool:
    return re.fullmatch(r"features\.\d+\.weight", key) is not None and value.dim() == 4


def _config_from_keys(weights: dict[str, Tensor], path: Path) -> tuple[str, bool]:
    """The configuration of Table 1 whose convolutions sit at the state dict's positions with its kernels."""
    found = {_index(k): v.shape[-1] for k, v in weights.items() if _conv_key(k, v)}
    batch_norm = any(re.fullmatch(r"features\.\d+\.running_mean", k) for k in weights)
    for config in configs.TABLE_1:
        trunk, _ = make_trunk(config, batch_norm, width=1 / 64)
        expected = {i: m.kernel_size[0] for i, m in enumerate(trunk) if isinstance(m, nn.Conv2d)}
        if found == expected:
            return config, batch_norm
    where = f"convolutions at features {sorted(found)}" if found else "no convolution weights features.N.weight"
    raise UserError(f"{path}: its tensors are no VGG of Table 1 in torchvision's layout (features.N.*, "
                    f"classifier.0/3/6.*): {where}")
