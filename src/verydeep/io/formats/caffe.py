"""The authors' Caffe models (their release of D and E; PAPER.md Sec. 8), parsed with the subset of Caffe's
message definition carried here, without Caffe or protoc."""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from verydeep.errors import UserError
from verydeep.io.formats.layer_names import check_shape, named_to_state, vgg_layer

#: What a file that is none of the formats is told.
UNKNOWN_FILE = "not a weights file verydeep reads: not torch, safetensors, HDF5, nor a Caffe model"

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


#: The first keys a Caffe model can begin with: ``NetParameter``'s name (field 1), its V1 ``layers`` (field 2)
#: or its ``layer`` (field 100, two bytes), each length-delimited (wire type 2).
CAFFE_FIRST_KEYS = (b"\x0a", b"\x12", b"\xa2\x06")
#: A net's name as Caffe models carry it (``VGG_ILSVRC_16_layers``).
_NET_NAME = re.compile(rb"[\w.\-]{1,256}")


def _varint(data: bytes, at: int) -> tuple[int, int] | None:
    """The protobuf varint at ``data[at:]`` and the position after it; None when it runs off the bytes."""
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        value, at, shift = value | (byte & 0x7F) << shift, at + 1, shift + 7
        if byte < 0x80:
            return value, at
    return None


def looks_like_caffe(path: str | Path) -> bool:
    """Whether ``path`` begins as a serialised ``NetParameter`` does: a name of word characters, or a first layer
    that fits in the file; an HTML error page, a text file or a truncated download does not."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(300)
    key = next((key for key in CAFFE_FIRST_KEYS if head.startswith(key)), None)
    length = _varint(head, len(key)) if key is not None else None
    if length is None or length[0] == 0:
        return False
    count, at = length
    if key == b"\x0a":
        return _NET_NAME.fullmatch(head[at:at + count]) is not None
    return at + count <= size


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
        if layer.name in names:  # Caffe would keep both; which copy holds the weights meant is unknowable
            raise UserError(f"{path}: layer {layer.name!r} appears twice; a net's layer names are unique")
        names.add(layer.name)
        if not layer.blobs:
            continue
        if not vgg_layer(layer.name) or len(layer.blobs) != 2:
            raise UserError(f"{path}: layer {layer.name!r} with {len(layer.blobs)} blobs is no VGG layer "
                            "(conv1_1 ... fc8, each with weights and biases)")
        weight, bias = (_blob(blob, layer.name, path) for blob in layer.blobs)
        if layer.name.startswith("fc"):
            if weight.ndim not in (2, 4):
                raise UserError(f"{path}: layer {layer.name}: weights of shape {weight.shape}, not 2-D or 4-D")
            rows = weight.shape[-2] if weight.ndim == 4 and weight.shape[:2] == (1, 1) else weight.shape[0]
            weight = weight.reshape(rows, -1)
        named[layer.name] = (weight, bias)
    if not named:
        raise UserError(f"{path}: {UNKNOWN_FILE} (no layers with weights)")
    return named_to_state(named, path, lrn="norm1" in names)


def _blob(blob: Any, layer: str, path: Path) -> np.ndarray:
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else (blob.num, blob.channels, blob.height, blob.width)
    # checked before the sizes are compared: two negative dimensions multiply to a positive count
    check_shape(shape, f"layer {layer}, a blob", path)
    data = np.array(blob.data, dtype=np.float32)
    if data.size != math.prod(shape):
        raise UserError(f"{path}: layer {layer}: a blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)

