"""Keras' HDF5 weights (its VGG16 and VGG19, converted from the authors' release; PAPER.md Sec. 8), in both
layouts: the legacy HDF5 of Keras 2 (layers ``blockB_convI``, ``fc1`` ...) and Keras 3's ``save_weights``
(``.weights.h5``) and ``.keras`` archives (layers keyed by class and order)."""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from verydeep.errors import UserError
from verydeep.io.formats import MARGIN, PACKING, refuse_unpacking_beyond_weights
from verydeep.io.formats.layer_names import check_shape, config_of, conv_kernels, named_to_state, vgg_layer
from verydeep.nn import configs

#: Keras' names of VGG's FC layers; its convolutions are blockB_convI (our convB_I).
KERAS_FC = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}

#: The weights inside a Keras 3 ``.keras`` archive (a zip beside ``config.json``).
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"



def is_keras_archive(path: Path) -> bool:
    """A zip holding Keras 3's ``model.weights.h5`` and ``config.json`` (a ``.keras`` file), not torch's."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {KERAS_ARCHIVE_WEIGHTS, "config.json"} <= set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_keras(path: Path) -> tuple[dict[str, Tensor], bool]:
    """A Keras HDF5 weights file's weights in our keys, and whether it has the FC layers.

    The layout of Keras' ``save_weights``: the root's attribute ``layer_names``; per layer a group
    with the attribute ``weight_names`` (kernel, then bias) naming its datasets. Kernels are
    (h, w, in, out) and (in, out); FC1's rows follow Keras' flattening of an (H, W, C) map.
    """
    try:
        import h5py
    except ImportError as error:
        raise UserError(f"{path}: reading Keras files needs h5py (pip install 'verydeep[weights]')") from error
    try:
        source = _keras_weights(path)
        size = source.getbuffer().nbytes if isinstance(source, io.BytesIO) else path.stat().st_size
        with h5py.File(source, "r") as f:
            if "layers" in f and "layer_names" not in f.attrs:  # Keras 3
                named = _keras3_named(f["layers"], path, size)
                return named_to_state(_keras_to_torch(named, path), path), "fc6" in named
            if "model_config" in f.attrs:  # a whole model's HDF5 (Keras 2's, Keras 3's legacy .h5): its layers said
                refuse_layers_of_no_vgg(path, json.loads(f.attrs["model_config"]))
            root = f["model_weights"] if "model_weights" in f else f
            layers = {name: [_array(root[name][w], f"{name}/{w}", path, size)
                             for w in _names(root[name], "weight_names")] for name in _names(root, "layer_names")}
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable Keras weights file ({type(error).__name__}: {error})") from error
    named = {}
    for name, arrays in layers.items():
        ours = KERAS_FC.get(name) or re.sub(r"^block(\d+)_conv(\d+)$", r"conv\1_\2", name)
        if not arrays:
            continue
        if not vgg_layer(ours) or len(arrays) != 2:
            raise UserError(f"{path}: layer {name!r} with {len(arrays)} weights is no VGG layer "
                            "(blockB_convI, fc1, fc2, predictions, each with kernel and bias)")
        named[ours] = tuple(arrays)
    heads = [n for n in ("fc6", "fc7", "fc8") if n in named]
    if heads and len(heads) < 3:
        raise UserError(f"{path}: has {', '.join(heads)} but not all of FC1, FC2 and the predictions")
    return named_to_state(_keras_to_torch(named, path), path), bool(heads)


def _keras_weights(path: Path) -> Path | io.BytesIO:
    """The HDF5 weights of a Keras file: the file itself, or a ``.keras`` archive's ``model.weights.h5``."""
    if not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        entry = archive.getinfo(KERAS_ARCHIVE_WEIGHTS)
        refuse_unpacking_beyond_weights(path, archive)
        refuse_layers_of_no_vgg(path, json.loads(archive.read("config.json")))
        return io.BytesIO(archive.read(entry))


#: The kinds of Keras layers a VGG of Table 1 is built of (Dropout: nothing at inference).
VGG_LAYER_KINDS = frozenset({"InputLayer", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dropout"})
#: The pooling ``keras.applications``' VGGs end in without their FC layers (``pooling="avg"`` or ``"max"``).
GLOBAL_POOLING = frozenset({"GlobalAveragePooling2D", "GlobalMaxPooling2D"})
#: Keras' kinds of models, which may hold a model as a layer (refused as such where its weights are read).
MODEL_KINDS = frozenset({"Functional", "Sequential", "Model"})


def refuse_layers_of_no_vgg(path: Path, config: Any) -> None:
    """A ``.keras`` model (its ``config.json``) with a layer a VGG has not is a :class:`UserError` naming the layer,
    though it hold no weights (``Rescaling``: another input convention), as is a convolution other than a padded,
    undilated one of stride 1 with ReLU, a pooling other than 2 x 2 of stride 2, a hidden FC layer without ReLU,
    other than Table 1's five poolings, or FC layers behind an input that is no square of 32k pixels: the net
    loaded would compute something else, or take other images."""
    layers = _layers_of(config)
    last_dense = max((i for i, (kind, _) in enumerate(layers) if kind == "Dense"), default=None)
    for i, (kind, settings) in enumerate(layers):
        if kind in GLOBAL_POOLING and last_dense is None:  # keras.applications' notop pooling: the convolutions kept
            continue
        if kind not in MODEL_KINDS and not _a_vgg_layer(kind, settings, i == last_dense):  # a model: its weights say
            shown = "".join(f", {key} {settings[key]}" for key in ("activation", "padding", "strides", "dilation_rate",
                                                                   "groups", "pool_size") if key in settings)
            raise UserError(f"{path}: Keras layer {settings.get('name')!r} ({kind}{shown}) is no layer of a VGG of "
                            "Table 1, which would compute something else; save a VGG's weights")
    kinds = [kind for kind, _ in layers]
    if kinds and not set(kinds) & MODEL_KINDS and kinds.count("MaxPooling2D") != POOLINGS:
        raise UserError(f"{path}: the Keras model has {kinds.count('MaxPooling2D')} max-pooling layers where a VGG of "
                        f"Table 1 has {POOLINGS}, so it would compute something else; save a VGG's weights")
    if last_dense is not None:
        _refuse_input_the_top_cannot_take(path, layers)


def _layers_of(config: Any) -> list[tuple[Any, dict[str, Any]]]:
    """The (kind, settings) of a Keras model's layers, from its config (``{"layers": [...]}``, or the bare list an
    old Sequential model's is), each activation layer of ReLU (``Activation("relu")``, a plain ``ReLU()``) or of
    the output's softmax folded into the convolution or FC layer before it, whose own activation it is."""
    inner = config.get("config") if isinstance(config, dict) else None
    listed = inner if isinstance(inner, list) else inner.get("layers", []) if isinstance(inner, dict) else []
    layers: list[tuple[Any, dict[str, Any]]] = []
    for layer in listed:
        kind, settings = (layer.get("class_name"), layer.get("config") or {}) if isinstance(layer, dict) else (None, {})
        activation = settings.get("activation") if kind == "Activation" else "relu" if kind == "ReLU" and not any(
            settings.get(key) for key in ("max_value", "negative_slope", "threshold")) else None
        before = layers[-1] if layers else (None, {})
        if activation is not None and before[0] in ("Conv2D", "Dense") and before[1].get("activation") in (
                None, "linear"):
            layers[-1] = (before[0], {**before[1], "activation": activation})
            continue
        layers.append((kind, settings))
    return layers


#: The max-pooling layers of every configuration of Table 1.
POOLINGS = 5
#: Per kind of layer, each setting that changes what it computes, with the values of VGG's (Keras' spellings, as
#: ``config.json`` writes them: a pair, or one number for both sides); a setting not written has Keras' default.
VGG_SETTINGS: dict[str, dict[str, tuple[Any, tuple[Any, ...]]]] = {
    "Conv2D": {"padding": ("valid", ("same",)), "strides": ((1, 1), ((1, 1),)),
               "dilation_rate": ((1, 1), ((1, 1),)), "groups": (1, (1,)), "activation": (None, ("relu",))},
    "MaxPooling2D": {"pool_size": ((2, 2), ((2, 2),)), "strides": (None, (None, (2, 2))),
                     "padding": ("valid", ("valid",))},
}


def _a_vgg_layer(kind: Any, settings: dict[str, Any], last_dense: bool) -> bool:
    """Whether a Keras layer of class ``kind`` and ``settings`` computes what the VGG layer in its place does."""
    if kind not in VGG_LAYER_KINDS:
        return False
    if kind == "Dense":  # the last: the class scores, or their softmax (the same ranking, as Keras predicts)
        return settings.get("activation") in (("softmax", "linear", None) if last_dense else ("relu",))
    for key, (default, allowed) in VGG_SETTINGS.get(kind, {}).items():
        value = settings.get(key, default)
        value = (value, value) if isinstance(value, int) and not isinstance(value, bool) and key != "groups" else value
        if (tuple(value) if isinstance(value, list) else value) not in allowed:
            return False
    return True


def _refuse_input_the_top_cannot_take(path: Path, layers: list[tuple[Any, dict[str, Any]]]) -> None:
    """FC layers (a top) behind an input of a known side other than a square of a multiple of 32 pixels: a
    :class:`UserError`, since the net loaded, a VGG of a crop of 32 times FC1's grid, would take other images."""
    shapes = [settings.get("batch_shape", settings.get("batch_input_shape")) for _, settings in layers]
    first_conv = next((settings for kind, settings in layers if kind == "Conv2D"), {})
    for shape in shapes:
        if not isinstance(shape, list) or len(shape) != 4:
            continue
        sides = shape[2:] if first_conv.get("data_format") == "channels_first" else shape[1:3]
        if all(isinstance(side, int) for side in sides) and (sides[0] != sides[1] or sides[0] % 32):
            raise UserError(f"{path}: the Keras model takes {sides[0]} x {sides[1]} images into its FC layers, where a "
                            "VGG's take a square of a multiple of 32 pixels (its crop); save a VGG's weights")


def _array(node: Any, where: str, path: Path, file_size: int) -> np.ndarray:
    """The float32 values of the dataset ``node``, checked before anything is read: floating point (an int,
    bool or complex tensor is no weight; the cast would hide it), each dimension positive, and no more bytes
    declared than the file can hold (:data:`PACKING`), so a forged header allocates nothing."""
    import h5py

    if not isinstance(node, h5py.Dataset):
        raise UserError(f"{path}: {where} is no dataset of weights")
    if node.external or node.is_virtual:  # its values in other files (any on the machine, a pipe): not this one's
        raise UserError(f"{path}: {where} holds its values in other files; refused unread")
    if node.dtype.kind != "f":
        raise UserError(f"{path}: {where} holds {node.dtype} values, not floating point weights")
    check_shape(node.shape, where, path)
    # unfiltered data lies in the file as it is; a filter (compression) may shrink it by PACKING at most
    packed = node.id.get_create_plist().get_nfilters() > 0
    stored = min(node.id.get_storage_size(), file_size)
    declared = node.size * node.dtype.itemsize  # a float16 file's float32 copy takes twice that: no bomb
    if declared > (PACKING if packed else 1) * stored + MARGIN:
        raise UserError(f"{path}: {where} declares {node.shape} values ({declared} bytes) but the file stores "
                        f"{stored} bytes of it: refused unread")
    return np.asarray(node, dtype=np.float32)


def _keras3_named(layers: Any, path: Path, size: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Keras 3's layout (``layers/<key>/vars/<i>``, kernel then bias): a layer's key is its class's
    name with a counter in the model's layer order (``conv2d``, ``conv2d_1`` ...; ``dense`` ...), so
    the convolutions, in that order, are the configuration of Table 1 whose kernels they have."""
    def ordered(kind: str) -> list[tuple[str, tuple[np.ndarray, ...]]]:
        keys = [k for k in layers if re.fullmatch(rf"{kind}(_\d+)?", k) and "vars" in layers[k]]
        keys.sort(key=lambda k: int(k.rsplit("_", 1)[1]) if "_" in k.removeprefix(kind) else 0)
        return [(k, tuple(_array(layers[k]["vars"][str(i)], f"layers/{k}/vars/{i}", path, size)
                          for i in range(len(layers[k]["vars"])))) for k in keys]

    nested = next((k for k in layers if "layers" in layers[k]), None)
    if nested is not None:  # a model inside the model (a VGG base under a new head): its layers counted apart
        raise UserError(f"{path}: the Keras model holds another model (layers/{nested}); save that VGG model's "
                        "own weights and give them")
    weighted = (k for k in layers if "vars" in layers[k] and len(layers[k]["vars"]))
    other = next((k for k in weighted if not re.fullmatch(r"(conv2d|dense)(_\d+)?", k)), None)
    if other is not None:  # batch norm, a normalisation layer: weights a VGG of Table 1 has no place for
        raise UserError(f"{path}: Keras layer {other} with {len(layers[other]['vars'])} weights is no VGG layer "
                        "(Conv2D and Dense only)")
    convs, dense = ordered("conv2d"), ordered("dense")
    odd = next((k for k, arrays in convs if len(arrays) != 2 or arrays[0].ndim != 4), None)
    if odd is not None:
        raise UserError(f"{path}: Keras layer {odd} is no convolution (a 4-D kernel and a bias)")
    kernels = [arrays[0].shape[0] for _, arrays in convs]
    config = next((c for c in configs.TABLE_1 if "LRN" not in configs.TABLE_1[c]
                   and list(conv_kernels(c).values()) == kernels), None)
    if config is None or len(dense) not in (0, 3) or any(len(arrays) != 2 for _, arrays in dense):
        raise UserError(f"{path}: {len(convs)} Keras Conv2D and {len(dense)} Dense layers are no VGG of Table 1")
    named = dict(zip(conv_kernels(config), (arrays for _, arrays in convs), strict=True))
    return named | dict(zip(("fc6", "fc7", "fc8"), (arrays for _, arrays in dense), strict=False))


def _names(group: Any, attribute: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs[attribute]]


def _keras_to_torch(named: dict[str, tuple[np.ndarray, ...]], path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Keras kernels in PyTorch's shapes: HWIO to OIHW, (in, out) to (out, in), FC1's (H, W, C) rows to (C, H, W)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (kernel, bias) in named.items():
        if kernel.ndim != (4 if name.startswith("conv") else 2):
            raise UserError(f"{path}: layer {name}: a kernel of shape {kernel.shape}")
        out[name] = (kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T, bias)
    # the convolutions first: FC1's inputs mean something only after a VGG's last convolution
    convs = {n: w.shape[-1] for n, (w, _) in out.items() if n.startswith("conv")}
    config_of(convs, path)
    if "fc6" in out:
        channels = out[max(convs, key=_conv_order)][0].shape[0]
        weight, bias = out["fc6"]
        grid = math.isqrt(weight.shape[1] // channels)
        if grid * grid * channels != weight.shape[1]:
            raise UserError(f"{path}: FC1 takes {weight.shape[1]} inputs, not a square map of {channels} channels")
        weight = weight.reshape(-1, grid, grid, channels).transpose(0, 3, 1, 2).reshape(weight.shape[0], -1)
        out["fc6"] = (weight, bias)
    return out


def _conv_order(name: str) -> tuple[int, int]:
    block, index = name.removeprefix("conv").split("_")
    return int(block), int(index)

