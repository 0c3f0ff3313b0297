"""The published VGG weights verydeep knows by name: each file's official name, URL and checksum (PAPER.md Sec. 8).

torchvision's ``vgg11`` ... ``vgg19_bn``, the authors' Caffe release of D and E (``caffe-vgg16``, ``caffe-vgg19``)
and Keras' VGG16 and VGG19, with and without their FC layers (``keras-vgg16-notop`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

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


#: The configuration (Table 1) of each depth a published name carries.
CONFIG_OF_DEPTH = {11: "A", 13: "B", 16: "D", 19: "E"}


def named_net(name: str) -> dict[str, object]:
    """What the published file of ``name`` holds: its configuration, batch norm or not, full width, and, but for
    Keras' notop files (``head`` "random": no FC layers), its FC layers for 224-pixel crops and ImageNet's 1000
    classes."""
    depth = int(name.split("vgg")[1].split("_")[0].split("-")[0])
    net: dict[str, object] = {"config": CONFIG_OF_DEPTH[depth], "batch_norm": name.endswith("_bn"), "width": 1.0}
    if name.endswith("notop"):
        return net | {"head": "random"}
    return net | {"head": "published", "crop": 224, "num_classes": 1000}


def named_format(name: str) -> str:
    """The format of the published file of ``name``: ``caffe``, ``keras`` or ``torchvision``."""
    return name.split("-")[0] if name.startswith(("caffe-", "keras-")) else "torchvision"
