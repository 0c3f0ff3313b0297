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

This module makes a net and its recipe of what the readers give and holds the ``convert`` and ``download``
commands; each format's reader is in :mod:`verydeep.io.formats`, the published files' names, URLs and
checksums in :mod:`verydeep.io.catalogue`, the weights folder and downloading in :mod:`verydeep.io.download`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from verydeep.data.preprocess import IMAGENET, Preprocess, load_preprocess
from verydeep.errors import UserError
from verydeep.io.catalogue import NAMES, known_weights, named_format, named_net
from verydeep.io.checkpoint import (
    check_checkpoint,
    export_safetensors,
    load_into,
    load_weights,
    model_from_recipe,
    read_safetensors_weights,
    safetensors_metadata,
)
from verydeep.io.download import download, resolve_source
from verydeep.io.formats.caffe import read_caffe
from verydeep.io.formats.keras import is_keras_archive, read_keras
from verydeep.io.formats.torchvision import architecture, read_safetensors, state_dict, torch_load
from verydeep.nn.model import VGG
from verydeep.nn.tasks import Classification
from verydeep.options import output_file

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

    def require_classifier(self, purpose: str) -> Published:
        """This net, or a one-line error when it was trained for another task: its outputs are no class scores."""
        task = task_name(self.recipe)
        if task == Classification.name:
            return self
        boxes = task.startswith("localisation-")
        kind, hint = ("a localisation net", "; verydeep localize predict runs it") if boxes else ("a net", "")
        raise UserError(f"{self.source}: {kind} (task {task}, {outputs_text(self.recipe)}), not a classifier, so it "
                        f"cannot {purpose}{hint}")


def task_name(recipe: dict[str, Any]) -> str:
    """What a recipe's net was trained for: classification, unless it names Appendix A's
    ``localisation-scr`` or ``localisation-pcr`` (whose outputs are box coordinates)."""
    return str(recipe.get("task") or Classification.name)


def outputs_text(recipe: dict[str, Any]) -> str:
    """What FC8's outputs are: a score per class, or box coordinates (one box, or one per class)."""
    outputs = recipe.get("outputs") or recipe["num_classes"]
    task = task_name(recipe)
    if task == Classification.name:
        return f"{outputs} class scores"
    if not task.startswith("localisation-"):
        return f"{outputs} outputs"
    boxes = "one box" if outputs == 4 else f"a box for each of {recipe['num_classes']} classes"
    return f"{outputs} outputs: the 4 coordinates of {boxes}"


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
    published = _read_published(path)
    if str(source) in NAMES and path.name == known_weights()[str(source)].file:
        check_named(str(source), published.recipe, path)
    return published


def check_named(name: str, recipe: dict[str, Any], path: Path) -> None:
    """The file a published name found is that name's net (:func:`named_net`), not another file put under its
    official name; else a :class:`UserError` naming both."""
    wanted, form = named_net(name), (recipe.get("source") or {}).get("format")
    held = {key: recipe.get(key) for key in wanted}
    if held != wanted or form != named_format(name):
        raise UserError(f"{path}: the file of {name} holds {describe_net(held)} ({form}), not {describe_net(wanted)} "
                        f"({named_format(name)}); delete it and run `verydeep download {name}`")


def describe_net(net: dict[str, Any]) -> str:
    """``VGG-D with batch norm, width 1, 1000 classes``: a net by its configuration keys."""
    parts = [f"VGG-{net['config']}" + (" with batch norm" if net["batch_norm"] else ""), f"width {net['width']:g}"]
    parts += [f"{net['num_classes']} classes"] if net.get("num_classes") is not None else []
    parts += [f"{net['crop']}-pixel crops"] if net.get("crop") is not None else []
    return ", ".join(parts + (["no FC layers"] if net.get("head") == "random" else []))


def _read_published(path: Path) -> Published:
    """:func:`load_published` of the file or folder ``path``."""
    kind = sniff(path)
    if kind != "folder" and path.stat().st_size == 0:  # else read as an empty Caffe net, "no layers with weights"
        raise UserError(f"{path}: an empty file, not weights")
    if kind == "safetensors":
        if "recipe" not in safetensors_metadata(path):  # a state dict saved by others: torchvision's layout
            with foreign(path, "torchvision safetensors"):
                return _publish(state_dict(read_safetensors(path), path), path, "torchvision")
        return _ours(path, *read_safetensors_weights(path))
    if kind == "folder":
        return _ours(path, *load_weights(path))
    if kind == "keras":
        with foreign(path, "Keras weights"):
            weights, head = read_keras(path)
            return _publish(weights, path, "keras", head)
    if kind == "caffe":
        with foreign(path, "Caffe model"):
            return _publish(read_caffe(path), path, "caffe")
    state = torch_load(path)
    if isinstance(state, dict) and "model" in state and "recipe" in state:  # our checkpoint
        state = check_checkpoint(state, path)
        return _ours(path, state["model"], state["recipe"])
    with foreign(path, "torchvision"):
        return _publish(state_dict(state, path), path, "torchvision")


@contextmanager
def foreign(path: Path, fmt: str) -> Iterator[None]:
    """Reading a file others wrote: the readers check what they know to check, and whatever a malformed file
    still trips (a shape that makes no sense, a size too large to allocate) is a one-line error naming it."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, MemoryError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"{path}: not a readable {fmt} file ({type(error).__name__}: {reason})") from error


#: The first bytes of torch's legacy (non-zip) file: its magic number pickled with protocol 2.
LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little")


def sniff(path: Path) -> str:
    """What ``path`` holds, from its first bytes: folder, keras (HDF5), torch (zip or pickle),
    safetensors (a little-endian header length, then JSON; or a file so named that is no HDF5, zip or
    torch pickle, so that a damaged one is told so) or, failing those, caffe (protobuf)."""
    if path.is_dir():
        return "folder"
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_TORCH_HEAD))
    if head.startswith(LEGACY_TORCH_HEAD):
        return "torch"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras"
    if head.startswith(b"PK\x03\x04") and is_keras_archive(path):
        return "keras"
    # before the pickle's first byte: a header length whose low byte is 0x80 starts with it too
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head.startswith(b"\x80") and path.suffix != ".safetensors"):
        return "torch"
    return "safetensors" if path.suffix == ".safetensors" else "caffe"


def _ours(path: Path, weights: dict[str, Tensor], recipe: dict[str, Any]) -> Published:
    model = model_from_recipe(recipe)
    load_into(model, weights, path)
    return Published(model.eval(), recipe, "verydeep", str(path))


def numbered(count: int) -> list[str]:
    """The classes of published weights that name none: their outputs' numbers, ``0`` to ``count - 1``."""
    return [str(i) for i in range(count)]


def unnamed_classes(recipe: dict[str, Any]) -> bool:
    """Whether a net's recipe only numbers its classes (:func:`numbered`) because the published weights it was read
    from (its ``source``) name none; a run of ours trained on folders named so names them."""
    listed = [str(c) for c in recipe.get("classes") or []]
    return isinstance(recipe.get("source"), dict) and listed == numbered(len(listed))


def _publish(weights: dict[str, Tensor], path: Path, fmt: str, head: bool = True) -> Published:
    """Build the net that ``weights`` (torchvision's layout) describe; ``head``: FC6-FC8 are in them."""
    pre, authors = CONVENTIONS[fmt]
    arch = architecture(weights, path, head)
    classes, names = imagenet_classes() if head and arch["num_classes"] == 1000 else (None, None)
    if head and classes is None:
        classes = names = numbered(arch["num_classes"])
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


# ---- conversion and the command line ------------------------------------------------------------


def convert(source: str | Path, out: str | Path, weights_dir: str | Path | None = None) -> Path:
    """Write ``source`` (anything :func:`load_published` reads) as our ``.safetensors``, its recipe,
    input convention included, in the metadata: ``load_published(out)`` gives the same outputs."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the converted weights are written as .safetensors; name the file so")
    published = load_published(source, weights_dir)
    return export_safetensors(published.model, published.recipe, out)


def input_convention(recipe: dict[str, Any], data: str | Path | None = None) -> Preprocess:
    """The net's input convention and statistics: its recipe's ``preprocess`` when it has one (the weights'
    convention, such as a Caffe net's BGR on 0..255, wins), else ``data``'s ``preprocess.json``, else
    ImageNet's. The recipe's was checked where it was read (:func:`verydeep.io.checkpoint.check_recipe`)."""
    if recipe.get("preprocess"):
        return Preprocess.from_dict(recipe["preprocess"])
    return load_preprocess(data) if data is not None else IMAGENET


def describe(published: Published) -> str:
    """One line: the net, its sizes, its task when not classification, and the input it takes."""
    recipe = published.recipe
    pre = input_convention(recipe)
    head = ", random classifier" if recipe.get("head") == "random" else ""
    origin = (recipe.get("source") or {}).get("format", published.format)  # a converted file names its origin
    task = "" if task_name(recipe) == Classification.name else f", {task_name(recipe)} ({outputs_text(recipe)})"
    return (f"{published.model.name}, width {recipe['width']:g}, crop {recipe['crop']}, {recipe['num_classes']} "
            f"classes{head}{task}; input {pre.channels} on 0..{pre.value_scale:g} ({origin} weights)")


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
