"""Published VGG weights in: torchvision's state dicts, the authors' Caffe models, Keras' HDF5 files.

The authors released their two best nets, D and E (the paper's abstract; PAPER.md Sec. 8); torchvision's
``vgg11`` ... ``vgg19_bn`` and Keras' VGG16 and VGG19 are the weights people use today.
:func:`load_published` reads any of them, or our own checkpoints, run directories and ``.safetensors``,
into a :class:`VGG` and a recipe like training's, so evaluation, prediction and feature extraction
treat them as our own nets. Each source's input convention travels in the recipe's ``preprocess``:

- torchvision: RGB on 0..1, normalised by ImageNet's mean and std (:data:`IMAGENET`);
- Caffe, and Keras (its ``caffe`` mode): BGR on 0..255 minus the mean pixel (B, G, R) =
  (103.939, 116.779, 123.68), std 1 (:data:`CAFFE`).

What a file holds is read from its content (magic numbers, keys, layer names), never from its name,
and the architecture (configuration of Table 1, batch norm, width, crop, classes) from the weights'
shapes. Nothing but tensors is unpickled (``torch.load(weights_only=True)``); Caffe files are parsed
with the subset of Caffe's message definition carried here, without Caffe or protoc.

Keras files are read in both layouts: the legacy HDF5 of Keras 2 (and ``keras.applications``' downloads),
whose layers are named ``blockB_convI``, ``fc1`` ...; and Keras 3's ``save_weights`` (``.weights.h5``)
and ``.keras`` archives, whose layers are keyed by class and order (``conv2d``, ``conv2d_1`` ...).

Keras' ``_notop`` files hold no FC layers: the classifier stays randomly initialised and the recipe
says ``"head": "random"``. Such a net serves for features (``model.extract``, ``model.features``) and
as ``train --weights``; predict and eval should refuse it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from verydeep.cli import output_file
from verydeep.data.preprocess import IMAGENET, Preprocess
from verydeep.errors import MissingFileError, UserError
from verydeep.io.checkpoint import (
    atomic_write,
    export_safetensors,
    load_into,
    load_weights,
    model_from_recipe,
    safetensors_metadata,
)
from verydeep.nn import configs
from verydeep.nn.model import VGG, make_trunk, scaled
from verydeep.nn.tasks import Classification

#: The authors' convention (their model notes; Sec. 2.1's mean RGB subtraction): BGR on 0..255 minus
#: the mean pixel, here in RGB order on the 0..1 scale as :class:`Preprocess` keeps it.
CAFFE = Preprocess(mean=(123.68 / 255, 116.779 / 255, 103.939 / 255), std=(1.0, 1.0, 1.0), eigval=IMAGENET.eigval,
                   eigvec=IMAGENET.eigvec, channels="BGR", value_scale=255.0)

#: S jittered in [256; 512] (Sec. 3.1): how the released D and E were trained, per the authors' notes.
AUTHORS_SCALE = [256, 512]

#: Each published format's input convention, and whether its nets are the authors' (Keras converted them).
CONVENTIONS: dict[str, tuple[Preprocess, bool]] = {
    "torchvision": (IMAGENET, False),
    "caffe": (CAFFE, True),
    "keras": (CAFFE, True),
}

#: The 1000 ILSVRC-2012 synsets in class-index order (sorted), the order of every published net's FC8.
SYNSETS_FILE = Path(__file__).with_name("imagenet_synsets.txt")

TORCHVISION_NAMES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
CAFFE_URL = "http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/"
KERAS_URL = "https://github.com/fchollet/deep-learning-models/releases/download/v0.1/"
#: MD5 sums of Keras' files, as ``keras.applications`` checks them.
KERAS_MD5 = {
    "keras-vgg16": "64373286793e3c8b2b4e3219cbf3544b",
    "keras-vgg16-notop": "6d6bbae143d832006294945121d1f1fc",
    "keras-vgg19": "cbe5617147190e668d6c5d5026f83318",
    "keras-vgg19-notop": "253f8cb515780f3b799900260a226db6",
}
#: Every name :func:`load_published` and :func:`download` know.
NAMES = (*TORCHVISION_NAMES, "caffe-vgg16", "caffe-vgg19", *KERAS_MD5)


@dataclass(frozen=True)
class KnownWeights:
    """A published file: the name verydeep knows it by, its official file name, URL and checksum."""

    name: str
    file: str
    url: str
    md5: str | None = None
    hash_prefix: str | None = None  # of the SHA-256, as torchvision's file names carry it


@dataclass
class Published:
    """A net read by :func:`load_published`: the model (eval mode, CPU) and its recipe."""

    model: VGG
    recipe: dict[str, Any]
    format: str  # torchvision, caffe, keras or verydeep
    source: str

    @property
    def has_fc_layers(self) -> bool:
        """False for a file without FC6 to FC8 (Keras' ``notop`` kind), whose classifier is random."""
        return self.recipe.get("head") != "random"

    def require_fc_layers(self, purpose: str) -> Published:
        """This net, or a one-line error when it holds no FC layers and so cannot serve ``purpose``."""
        if not self.has_fc_layers:
            raise UserError(f"{self.source}: holds no classifier (FC6 to FC8), so it cannot {purpose}; give "
                            "weights with one")
        return self


@cache
def known_weights() -> dict[str, KnownWeights]:
    """The published files by name (torchvision's URLs come from torchvision, which knows them offline)."""
    import torchvision.models

    known = {}
    for name in TORCHVISION_NAMES:
        url = getattr(torchvision.models, f"{name.upper()}_Weights").IMAGENET1K_V1.url
        file = url.rsplit("/", 1)[1]
        known[name] = KnownWeights(name, file, url, hash_prefix=torch.hub.HASH_REGEX.search(file).group(1))
    for depth in (16, 19):
        file = f"VGG_ILSVRC_{depth}_layers.caffemodel"
        known[f"caffe-vgg{depth}"] = KnownWeights(f"caffe-vgg{depth}", file, CAFFE_URL + file)
    for name, md5 in KERAS_MD5.items():  # keras-vgg16, keras-vgg16-notop, ...
        _, net, *notop = name.split("-")
        file = f"{net}_weights_tf_dim_ordering_tf_kernels{'_notop' if notop else ''}.h5"
        known[name] = KnownWeights(name, file, KERAS_URL + file, md5=md5)
    return known


def weights_folder(weights_dir: str | Path | None = None) -> Path:
    """Where named weights live: ``weights_dir``, else ``$VERYDEEP_WEIGHTS_DIR``, else ``~/.cache/verydeep``."""
    folder = weights_dir or os.environ.get("VERYDEEP_WEIGHTS_DIR") or Path.home() / ".cache" / "verydeep"
    return Path(folder).expanduser()


def _known(name: str) -> KnownWeights:
    if name not in NAMES:
        raise UserError(f"{name}: no such file or folder, nor a published weights name ({', '.join(NAMES)})")
    return known_weights()[name]


def resolve_source(source: str | Path, weights_dir: str | Path | None = None) -> Path:
    """An existing file or folder, or a known name's official file in the weights folder."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    known = _known(str(source))
    folder = weights_folder(weights_dir)
    if not (folder / known.file).is_file():
        raise MissingFileError(f"{source}: {folder / known.file} is missing; run `verydeep download {source}`, "
                               f"or get {known.url} and put it in {folder}")
    return folder / known.file


def download(name: str, weights_dir: str | Path | None = None) -> Path:
    """Download a published file into the weights folder under its official name (written under a temporary
    name, renamed once its checksum is checked). A file already there is kept when its checksum is the
    published one, and refused, untouched, when it is not."""
    known = _known(name)
    target = weights_folder(weights_dir) / known.file
    if target.is_dir():
        raise UserError(f"{target}: a folder where `verydeep download {name}` would write {known.file}")
    if target.is_file():
        wrong = checksum_mismatch(known, target)
        if wrong:
            raise UserError(f"{target}: already there, but {wrong}: damaged or another file; delete it and run "
                            f"`verydeep download {name}` again")
        return target
    return atomic_write(target, lambda tmp: _fetch(known, tmp))


def checksum_mismatch(known: KnownWeights, path: str | Path) -> str | None:
    """How ``path``'s checksum differs from the published one (the SHA-256 prefix of torchvision's file names,
    Keras' MD5), or None when it agrees or none is published (the authors' Caffe files)."""
    for algorithm, label, expected, prefix in (("sha256", "SHA-256", known.hash_prefix, True),
                                               ("md5", "MD5", known.md5, False)):
        if expected:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, algorithm).hexdigest()
            if not (digest.startswith(expected) if prefix else digest == expected):
                return f"its {label} {'begins' if prefix else 'is'} {digest[: len(expected)]}, not {expected}"
    return None


def _fetch(known: KnownWeights, tmp: str) -> None:
    try:
        torch.hub.download_url_to_file(known.url, tmp, hash_prefix=known.hash_prefix, progress=True)
    except (OSError, RuntimeError) as error:  # no network, HTTP errors, a wrong SHA-256
        raise UserError(f"{known.url}: download failed ({error})") from error
    wrong = checksum_mismatch(known, tmp)
    if wrong:
        raise UserError(f"{known.url}: the download's checksum is wrong: {wrong}")


# ---- reading ------------------------------------------------------------------------------------


def load_published(source: str | Path, weights_dir: str | Path | None = None) -> Published:
    """The net in ``source`` (a file, a run directory or a known name: :data:`NAMES`) with its recipe.

    A published net's recipe has training's keys (config, width, batch_norm, num_classes, outputs, crop,
    dropout, scale (None where unknown), preprocess (its input convention), classes, class_names, task),
    ``head`` ("published", or "random" for Keras' notop files) and ``source`` (``{"format", "path"}``).
    Our checkpoints, run directories and ``.safetensors`` keep the recipe they were saved with.
    Anything else, damaged or hostile is a one-line :class:`UserError` naming the file.
    """
    path = resolve_source(source, weights_dir)
    kind = sniff(path)
    if kind == "safetensors":
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: a safetensors file; verydeep reads them under a .safetensors name")
        if "recipe" not in safetensors_metadata(path):  # a state dict saved by others: torchvision's layout
            return _publish(_state_dict(_read_safetensors(path), path), path, "torchvision")
        return _ours(path, *load_weights(path))
    if kind == "folder":
        return _ours(path, *load_weights(path))
    if kind == "keras":
        weights, head = read_keras(path)
        return _publish(weights, path, "keras", head)
    if kind == "caffe":
        return _publish(read_caffe(path), path, "caffe")
    state = _torch_load(path)
    if isinstance(state, dict) and "model" in state and "recipe" in state:  # our checkpoint
        return _ours(path, state["model"], state["recipe"])
    return _publish(_state_dict(state, path), path, "torchvision")


def sniff(path: Path) -> str:
    """What ``path`` holds, from its first bytes: folder, keras (HDF5), torch (zip or pickle),
    safetensors (a little-endian header length, then JSON) or, failing those, caffe (protobuf)."""
    if path.is_dir():
        return "folder"
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras"
    if head.startswith(b"PK\x03\x04") and _is_keras_archive(path):
        return "keras"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    return "caffe"


def _is_keras_archive(path: Path) -> bool:
    """A zip holding Keras 3's ``model.weights.h5`` and ``config.json`` (a ``.keras`` file), not torch's."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {KERAS_ARCHIVE_WEIGHTS, "config.json"} <= set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _ours(path: Path, weights: dict[str, Tensor], recipe: dict[str, Any]) -> Published:
    model = model_from_recipe(recipe)
    load_into(model, weights, path)
    return Published(model.eval(), recipe, "verydeep", str(path))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # a pickle that would build other objects or call code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = f" (it would call {found.group(1)})" if found else ""
        raise UserError(f"{path}: refused: it holds more than tensors; loading it could run code{reason}") from error
    except Exception as error:  # damaged archives
        reason = " ".join(str(error).split()).split(". ")[0][:200]
        raise UserError(f"{path}: not a readable torch file ({type(error).__name__}: {reason})") from error


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; a damaged one is a one-line error naming it."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({type(error).__name__})") from error


def _state_dict(state: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError(f"{path}: not a state dict of tensors, nor a verydeep checkpoint")
    return state


def _publish(weights: dict[str, Tensor], path: Path, fmt: str, head: bool = True) -> Published:
    """Build the net that ``weights`` (torchvision's layout) describe; ``head``: FC6-FC8 are in them."""
    pre, authors = CONVENTIONS[fmt]
    arch = _architecture(weights, path, head)
    classes, names = imagenet_classes() if head and arch["num_classes"] == 1000 else (None, None)
    if head and classes is None:
        classes = names = [str(i) for i in range(arch["num_classes"])]
    recipe = {**arch, "outputs": arch["num_classes"], "task": Classification.name, "dropout": 0.5,
              "scale": AUTHORS_SCALE if authors and arch["crop"] == 224 else None, "preprocess": pre.to_dict(),
              "classes": classes, "class_names": names, "head": "published" if head else "random",
              "source": {"format": fmt, "path": str(path)}}
    model = model_from_recipe(recipe)
    if not head:
        weights = {**model.state_dict(), **weights}  # the classifier keeps its random initialisation
    load_into(model, weights, path)
    return Published(model.eval(), recipe, fmt, str(path))


def imagenet_classes() -> tuple[list[str], list[str]]:
    """The 1000 ILSVRC-2012 synsets in class-index order and their names (torchvision's, shipped offline)."""
    from torchvision.models import VGG16_Weights

    return SYNSETS_FILE.read_text().split(), list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def _architecture(weights: dict[str, Tensor], path: Path, head: bool) -> dict[str, Any]:
    """Configuration, batch norm, width, crop and classes from the shapes of a torchvision-layout state dict:
    the conv positions give the configuration, conv1_1's channels the width, FC6's inputs the crop."""
    config, batch_norm = _config_from_keys(weights, path)
    convs = sorted((k for k, v in weights.items() if _conv_key(k, v)), key=_index)
    first, last = weights[convs[0]].shape[0], weights[convs[-1]].shape[0]
    width = first / 64 if scaled(512, first / 64) == last else last / 512
    arch = {"config": config, "batch_norm": batch_norm, "width": width, "crop": 224, "num_classes": 1000}
    if not head:
        return arch
    fc6, fc8 = weights.get("classifier.0.weight"), weights.get("classifier.6.weight")
    if fc6 is None or fc8 is None or fc6.dim() != 2 or fc8.dim() != 2:
        raise UserError(f"{path}: no classifier (2-D classifier.0.weight and classifier.6.weight)")
    grid = math.isqrt(fc6.shape[1] // last)
    if grid < 1 or grid * grid * last != fc6.shape[1]:
        raise UserError(f"{path}: FC6 takes {fc6.shape[1]} inputs, not a square map of {last} channels")
    return arch | {"crop": 32 * grid, "num_classes": fc8.shape[0]}


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


def _named_to_state(named: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, lrn: bool = False
                    ) -> dict[str, Tensor]:
    """Weights by Caffe layer name (conv1_1 ... fc8; PyTorch's OIHW and (out, in) shapes) in our keys,
    through ``model.tap_names`` of the configuration their names and kernels make."""
    bad = [n for n, (w, b) in named.items() if w.ndim != (4 if n.startswith("conv") else 2) or b.size != w.shape[0]]
    if bad:
        name = bad[0]
        raise UserError(f"{path}: layer {name} has weights {named[name][0].shape} and bias {named[name][1].shape}")
    kernels = {n: w.shape[-1] for n, (w, _) in named.items() if n.startswith("conv")}
    config = next((c for c in configs.TABLE_1 if kernels == _kernels(c) and lrn == ("LRN" in configs.TABLE_1[c])),
                  None)
    if config is None:
        raise UserError(f"{path}: layers {', '.join(kernels) or '(none)'} are no configuration of Table 1")
    taps = VGG(config, num_classes=1, width=1 / 64, input_size=32).tap_names
    state = {}
    for name, (w, b) in named.items():
        state[f"{taps[name]}.weight"] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        state[f"{taps[name]}.bias"] = torch.from_numpy(np.ascontiguousarray(b.reshape(-1), dtype=np.float32))
    return state


def _kernels(config: str) -> dict[str, int]:
    return {layer.name: layer.kernel for layer in configs.layers(config) if layer.kind == "conv"}


def _vgg_layer(name: str) -> bool:
    return re.fullmatch(r"conv\d+_\d+|fc[678]", name) is not None


#: What a file that is none of the formats is told.
UNKNOWN_FILE = "not a weights file verydeep reads: not torch, safetensors, HDF5, nor a Caffe model"

# ---- Caffe --------------------------------------------------------------------------------------

#: The subset of BVLC Caffe's src/caffe/proto/caffe.proto (proto2, package caffe) that holds weights,
#: with Caffe's field numbers: (field, number, type, "optional" / "repeated" / "packed").
CAFFE_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "BlobShape": [("dim", 1, "int64", "packed")],
    # num, channels, height, width: the 4-D shape of old files; shape: newer files'
    "BlobProto": [("num", 1, "int64", "optional"), ("channels", 2, "int64", "optional"),
                  ("height", 3, "int64", "optional"), ("width", 4, "int64", "optional"),
                  ("data", 5, "float", "packed"), ("shape", 7, ".caffe.BlobShape", "optional")],
    "LayerParameter": [("name", 1, "string", "optional"), ("type", 2, "string", "optional"),
                       ("blobs", 7, ".caffe.BlobProto", "repeated")],
    # Caffe's type here is the enum LayerType (CONVOLUTION = 4, INNER_PRODUCT = 14): the same varint as int32
    "V1LayerParameter": [("name", 4, "string", "optional"), ("type", 5, "int32", "optional"),
                         ("blobs", 6, ".caffe.BlobProto", "repeated")],
    # layers: the V1 layers of files like the authors'; layer: the current layers
    "NetParameter": [("name", 1, "string", "optional"), ("layers", 2, ".caffe.V1LayerParameter", "repeated"),
                     ("layer", 100, ".caffe.LayerParameter", "repeated")],
}


@cache
def caffe_net_class() -> type:
    """The message class of Caffe's ``NetParameter`` (:data:`CAFFE_MESSAGES`), built without protoc."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="verydeep_caffe_subset.proto", package="caffe", syntax="proto2")
    for message, fields in CAFFE_MESSAGES.items():
        spec = proto.message_type.add(name=message)
        for name, number, kind, label in fields:
            f = spec.field.add(name=name, number=number,
                               label=field.LABEL_OPTIONAL if label == "optional" else field.LABEL_REPEATED)
            if kind.startswith("."):
                f.type, f.type_name = field.TYPE_MESSAGE, kind
            else:
                f.type = getattr(field, f"TYPE_{kind.upper()}")
            if label == "packed":
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


def read_caffe(path: Path) -> dict[str, Tensor]:
    """A Caffe model's weights in our keys. Caffe's conv weights are (out, in, kh, kw) like ours and its
    InnerProduct flattens a (C, H, W) map in that order, as ``torch.flatten`` does an NCHW map, so FC6's
    columns need no reordering; FC weights of old files are 4-D (1, 1, out, in)."""
    try:
        from google.protobuf.message import DecodeError
    except ImportError as error:
        raise UserError(f"{path}: reading Caffe models needs protobuf (pip install 'verydeep[weights]')") from error
    try:
        net = caffe_net_class().FromString(path.read_bytes())
    except DecodeError as error:
        raise UserError(f"{path}: {UNKNOWN_FILE} ({error})") from error
    named, names = {}, set()
    for layer in [*net.layers, *net.layer]:
        names.add(layer.name)
        if not layer.blobs:
            continue
        if not _vgg_layer(layer.name) or len(layer.blobs) != 2:
            raise UserError(f"{path}: layer {layer.name!r} with {len(layer.blobs)} blobs is no VGG layer "
                            "(conv1_1 ... fc8, each with weights and biases)")
        weight, bias = (_blob(blob, layer.name, path) for blob in layer.blobs)
        if layer.name.startswith("fc"):
            rows = weight.shape[-2] if weight.ndim == 4 and weight.shape[:2] == (1, 1) else weight.shape[0]
            weight = weight.reshape(rows, -1)
        named[layer.name] = (weight, bias)
    if not named:
        raise UserError(f"{path}: {UNKNOWN_FILE} (no layers with weights)")
    return _named_to_state(named, path, lrn="norm1" in names)


def _blob(blob: Any, layer: str, path: Path) -> np.ndarray:
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else (blob.num, blob.channels, blob.height, blob.width)
    data = np.array(blob.data, dtype=np.float32)
    if data.size != math.prod(shape):
        raise UserError(f"{path}: layer {layer}: a blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


# ---- Keras --------------------------------------------------------------------------------------

#: Keras' names of VGG's FC layers; its convolutions are blockB_convI (our convB_I).
KERAS_FC = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}

#: The weights inside a Keras 3 ``.keras`` archive (a zip beside ``config.json``).
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"


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
        with h5py.File(_keras_weights(path), "r") as f:
            if "layers" in f and "layer_names" not in f.attrs:  # Keras 3
                return _named_to_state(_keras_to_torch(_keras3_named(f["layers"], path), path), path), True
            root = f["model_weights"] if "model_weights" in f else f
            layers = {name: [np.asarray(root[name][w], dtype=np.float32) for w in _names(root[name], "weight_names")]
                      for name in _names(root, "layer_names")}
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable Keras weights file ({type(error).__name__}: {error})") from error
    named = {}
    for name, arrays in layers.items():
        ours = KERAS_FC.get(name) or re.sub(r"^block(\d+)_conv(\d+)$", r"conv\1_\2", name)
        if not arrays:
            continue
        if not _vgg_layer(ours) or len(arrays) != 2:
            raise UserError(f"{path}: layer {name!r} with {len(arrays)} weights is no VGG layer "
                            "(blockB_convI, fc1, fc2, predictions, each with kernel and bias)")
        named[ours] = tuple(arrays)
    heads = [n for n in ("fc6", "fc7", "fc8") if n in named]
    if heads and len(heads) < 3:
        raise UserError(f"{path}: has {', '.join(heads)} but not all of FC1, FC2 and the predictions")
    return _named_to_state(_keras_to_torch(named, path), path), bool(heads)


def _keras_weights(path: Path) -> Path | io.BytesIO:
    """The HDF5 weights of a Keras file: the file itself, or a ``.keras`` archive's ``model.weights.h5``."""
    if not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        return io.BytesIO(archive.read(KERAS_ARCHIVE_WEIGHTS))


def _keras3_named(layers: Any, path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """Keras 3's layout (``layers/<key>/vars/<i>``, kernel then bias): a layer's key is its class's
    name with a counter in the model's layer order (``conv2d``, ``conv2d_1`` ...; ``dense`` ...), so
    the convolutions, in that order, are the configuration of Table 1 whose kernels they have."""
    def ordered(kind: str) -> list[tuple[np.ndarray, ...]]:
        keys = [k for k in layers if re.fullmatch(rf"{kind}(_\d+)?", k) and "vars" in layers[k]]
        keys.sort(key=lambda k: int(k.rsplit("_", 1)[1]) if "_" in k.removeprefix(kind) else 0)
        return [tuple(np.asarray(layers[k]["vars"][str(i)], dtype=np.float32) for i in range(len(layers[k]["vars"])))
                for k in keys]

    convs, dense = ordered("conv2d"), ordered("dense")
    kernels = [w.shape[0] for w, *_ in convs]
    config = next((c for c in configs.TABLE_1 if "LRN" not in configs.TABLE_1[c]
                   and list(_kernels(c).values()) == kernels), None)
    if config is None or len(dense) not in (0, 3) or any(len(arrays) != 2 for arrays in convs + dense):
        raise UserError(f"{path}: {len(convs)} Keras Conv2D and {len(dense)} Dense layers are no VGG of Table 1")
    named = dict(zip(_kernels(config), convs, strict=True))
    return named | dict(zip(("fc6", "fc7", "fc8"), dense, strict=False))


def _names(group: Any, attribute: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs[attribute]]


def _keras_to_torch(named: dict[str, tuple[np.ndarray, ...]], path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Keras kernels in PyTorch's shapes: HWIO to OIHW, (in, out) to (out, in), FC1's (H, W, C) rows to (C, H, W)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (kernel, bias) in named.items():
        if kernel.ndim != (4 if name.startswith("conv") else 2):
            raise UserError(f"{path}: layer {name}: a kernel of shape {kernel.shape}")
        out[name] = (kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T, bias)
    if "fc6" in out:
        channels = out[max((n for n in out if n.startswith("conv")), key=_conv_order)][0].shape[0]
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


# ---- conversion and the command line ------------------------------------------------------------


def convert(source: str | Path, out: str | Path, weights_dir: str | Path | None = None) -> Path:
    """Write ``source`` (anything :func:`load_published` reads) as our ``.safetensors``, its recipe,
    input convention included, in the metadata: ``load_published(out)`` gives the same outputs."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the converted weights are written as .safetensors; name the file so")
    published = load_published(source, weights_dir)
    return export_safetensors(published.model, published.recipe, out)


def describe(published: Published) -> str:
    """One line: the net, its sizes and the input it takes."""
    recipe = published.recipe
    pre = Preprocess.from_dict(recipe["preprocess"])
    head = ", random classifier" if recipe.get("head") == "random" else ""
    origin = (recipe.get("source") or {}).get("format", published.format)  # a converted file names its origin
    return (f"{published.model.name}, width {recipe['width']:g}, crop {recipe['crop']}, {recipe['num_classes']} "
            f"classes{head}; input {pre.channels} on 0..{pre.value_scale:g} ({origin} weights)")


def run_convert(args: argparse.Namespace) -> int:
    out = convert(args.source, args.out, args.weights_dir)
    print(f"{out}: {describe(load_published(out))}")  # read back: what was written is what loads
    return 0


def run_download(args: argparse.Namespace) -> int:
    print(download(args.name, args.weights_dir))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    folder = "the weights folder (default $VERYDEEP_WEIGHTS_DIR, else ~/.cache/verydeep)"
    p = subparsers.add_parser("convert", help="published VGG weights (torchvision, Caffe, Keras) as our .safetensors",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="SOURCE", help=f"a weights file, run directory or name: {', '.join(NAMES)}")
    p.add_argument("out", type=output_file, metavar="OUT.safetensors")
    p.add_argument("--weights-dir", metavar="DIR", help=folder)
    p.set_defaults(func=run_convert)
    d = subparsers.add_parser("download", help="download published VGG weights into the weights folder")
    d.add_argument("name", choices=NAMES, metavar="NAME", help=", ".join(NAMES))
    d.add_argument("--weights-dir", metavar="DIR", help=folder)
    d.set_defaults(func=run_download)
