"""Very deep features for other datasets (Appendix B): FC7 descriptors of the dense net, for linear SVMs.

The last FC layer is dropped and the penultimate layer's activations (FC7 after its ReLU, the tap
``relu7``: 4096-d at full width) describe the image. The net is applied densely (Sec. 3.2) to the whole
image rescaled so its smallest side is Q; the FC7 map is global-average pooled, and averaged with the
mirrored image's descriptor. Over several Q the descriptors are stacked (concatenated) or averaged,
then L2-normalised; several nets stack their normalised descriptors (Table 11's "D and E"), the
whole normalised again so that each net weighs the same. Q is in pixels, whatever the net's crop
(the paper's 256, 384, 512 by default, its Caltech setting); a Q below a net's crop is an error.

Images are batched by their size after the rescale, bf16 where fast. Each image's descriptor per net
and Q is kept before aggregation; every ``checkpoint_every`` batches (and on Ctrl-C) what is done is
written atomically to ``OUT.partial``, from which a run with the same nets, images and scales
continues. The result (:class:`Features`) is an ``.npz`` numpy reads: ``features``, ``labels``,
``paths``, ``splits``, ``classes``, ``class_names``, ``skipped`` and ``settings`` (JSON).

Activations at any other layer (``conv1_1`` .. ``pool5``, ``fc6``, ``fc7``) come from
``model.extract(x, names)`` or, as maps of the fully-convolutional form, ``model.dense().extract``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verydeep.cli import (
    add_device,
    add_precision,
    add_weights,
    add_workers,
    image_side,
    output_file,
    parse_scales,
    positive_int,
)
from verydeep.data import (
    CenterCropTransform,
    ImageFolder,
    LabelledImages,
    Preprocess,
    RescaleTransform,
    SizeGroupedBatchSampler,
    collate,
    find_split,
    to_input,
)
from verydeep.data.datasets import require_folder
from verydeep.data.loaders import image_loader
from verydeep.data.voc import is_voc, open_voc
from verydeep.errors import MissingFileError, UserError
from verydeep.io.checkpoint import atomic_write
from verydeep.io.sources import load
from verydeep.nn.model import DenseVGG
from verydeep.runtime import (
    Processes,
    autocast,
    autocast_dtype,
    available_memory_bytes,
    default_workers,
    pick_device,
    prepare,
    progress_bar,
    sharding,
)

#: The layer whose activations are the descriptor: FC7 after its ReLU.
TAP = "relu7"
AGGREGATES = ("stack", "average")
#: The paper's Caltech scales Q (its VOC descriptors averaged 256 to 768 in steps of 128).
DEFAULT_SCALES = (256, 384, 512)


# ---- descriptors ----------------------------------------------------------------------------


def pooled_descriptor(dense: DenseVGG, x: Tensor, flip: bool = True) -> Tensor:
    """Appendix B: the ``relu7`` map of the dense net on normalised images (N, 3, H, W), global-average
    pooled, averaged with the mirrored images' when ``flip``: (N, FC7 width), float32."""
    n = x.shape[0]
    inputs = torch.cat([x, x.flip(-1)]) if flip else x
    pooled = dense.extract(inputs, [TAP])[TAP].float().mean(dim=(2, 3))
    return pooled.view(2, n, -1).mean(dim=0) if flip else pooled


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def aggregate(per_scale: Sequence[np.ndarray], how: str) -> np.ndarray:
    """One net's descriptors (N, D) at each Q, stacked to (N, D x scales) or averaged to (N, D), then L2-normalised."""
    if how not in AGGREGATES:
        raise UserError(f"--aggregate must be one of {', '.join(AGGREGATES)}; got {how!r}")
    joined = np.concatenate(per_scale, axis=1) if how == "stack" else np.mean(per_scale, axis=0)
    return l2_normalise(joined)


def combine(per_net: Sequence[np.ndarray]) -> np.ndarray:
    """Several nets' normalised descriptors stacked and L2-normalised again (each net weighs the same)."""
    return l2_normalise(np.concatenate(per_net, axis=1))


# ---- images ---------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Images to describe: their paths, labels ((N,) class indices, or (N, classes) in {1, 0, -1} for
    multi-label VOC data), the part each belongs to (``train``, ``test``, or ``""`` where the protocol
    draws random splits) and the classes."""

    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    classes: list[str]
    class_names: list[str]


class IndexedImages(LabelledImages):
    """``paths`` as a dataset whose items are labelled by their index (a batch's labels say which images
    it holds); unreadable files are skipped and named."""

    def __init__(self, paths: Sequence[str | Path], transform: Any = None) -> None:
        super().__init__(transform, strict=False)
        self.samples = [(Path(p), i) for i, p in enumerate(paths)]
        self.classes, self.class_names = [], []


def open_image_set(data: str | Path) -> ImageSet:
    """The images of ``data``: a VOC root (:mod:`verydeep.data.voc`), a root with ``train/`` and ``test/``
    (or ``val/``) class folders (one given split), or a folder of class folders (split at random later)."""

    root = require_folder(Path(data))
    if is_voc(root):
        voc = open_voc(root)
        return ImageSet([str(p) for p in voc.paths], voc.labels, voc.splits, voc.classes, voc.classes)
    if not (root / "train").is_dir():
        folder = ImageFolder(root, None)
        return ImageSet([str(p) for p, _ in folder.samples], np.array(folder.targets), [""] * len(folder),
                        folder.classes, folder.class_names)
    train, test = ImageFolder(find_split(root, "train"), None), ImageFolder(find_split(root, "test"), None)
    if train.classes != test.classes:
        raise UserError(f"{root}: the classes of {train.root.name}/ and {test.root.name}/ differ")
    parts = [("train", train), ("test", test)]
    return ImageSet([str(p) for _, part in parts for p, _ in part.samples],
                    np.array([t for _, part in parts for t in part.targets]),
                    [name for name, part in parts for _ in part.samples], train.classes, train.class_names)


def loaded_batches(dataset: LabelledImages, batches: Sequence[list[int]], workers: int,
                   ) -> Iterator[tuple[np.ndarray, Tensor, list[str]]]:
    """The batches of ``dataset``: the indices of the images read, the uint8 images, the paths skipped."""


    loader = image_loader(dataset, batches, workers, collate)
    for batch in loader:
        yield batch.labels.numpy(), batch.images, batch.skipped


# ---- nets -----------------------------------------------------------------------------------


@dataclass
class FeatureNet:
    """A net whose FC7 describes images: its source, name, dense form, input convention and crop."""

    source: str
    name: str
    dense: DenseVGG
    preprocess: Preprocess
    crop: int
    dims: int  # FC7's width
    digest: str  # of its weights: a partial extraction continues only with the same weights

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.name, "crop": self.crop, "digest": self.digest}


def weights_digest(model: torch.nn.Module) -> str:
    """A BLAKE2 digest of every tensor of ``model``'s state dict."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_feature_nets(sources: Sequence[str | Path], data: str | Path, device: torch.device,
                      weights_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> list[FeatureNet]:
    """Each source through :func:`verydeep.load`, refused when it holds no FC layers (Keras' ``notop``
    files: FC7 would be random); the input convention is the weights' own; the weights in ``dtype``, the
    autocast dtype the net runs under, when given."""
    if not sources:
        raise UserError("give --weights SOURCE (or --raw-pixels SIDE)")
    nets = []
    for source in sources:
        loaded = load(source, weights_dir, data=data, purpose="give FC7 features")
        digest = weights_digest(loaded.model)  # of the weights as stored, whatever dtype they run in
        model = prepare(loaded.model, device, dtype=dtype).eval()
        nets.append(FeatureNet(str(source), loaded.name, model.dense(), loaded.preprocess, model.input_size,
                               model.fc_layers()["fc7"].out_features, digest))
    return nets


# ---- results --------------------------------------------------------------------------------


@dataclass
class Features:
    """Descriptors (N, D) float32, one row per readable image, with what the protocols need: labels,
    paths, splits, classes and class names; the images skipped; how they were made (``settings``)."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    splits: list[str]
    classes: list[str]
    class_names: list[str]
    settings: dict[str, Any]
    skipped: list[str] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` atomically (numpy reads it without pickles)."""
        arrays = {"features": self.features.astype(np.float32), "labels": self.labels,
                  "paths": np.array(self.paths, dtype=str), "splits": np.array(self.splits, dtype=str),
                  "classes": np.array(self.classes, dtype=str), "class_names": np.array(self.class_names, dtype=str),
                  "skipped": np.array(self.skipped, dtype=str), "settings": np.array(json.dumps(self.settings))}
        return atomic_write(path, lambda tmp: _savez(tmp, arrays))

    @classmethod
    def load(cls, path: str | Path) -> Features:
        """Read what :meth:`save` wrote; a missing, damaged or foreign file, or one whose numbers are not
        finite or out of range, is a one-line error naming it."""
        arrays = _load_npz(path, ("features", "labels", "paths", "splits", "classes", "class_names", "skipped",
                                  "settings"))
        x = arrays["features"]
        if x.ndim != 2 or x.dtype.kind not in "fiu" or 0 in x.shape:
            raise UserError(f"{path}: features must be a 2-D array of numbers, images x dimensions, neither zero; "
                            f"got {x.dtype} of shape {x.shape}")
        if not np.isfinite(x).all():
            row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise UserError(f"{path}: features hold values that are not finite (NaN or inf), first in row {row}")
        classes = _strings(path, arrays, "classes")
        if not classes:
            raise UserError(f"{path}: classes is empty")
        paths, splits = _strings(path, arrays, "paths", len(x)), _strings(path, arrays, "splits", len(x))
        odd = sorted(set(splits) - {"train", "test", ""})
        if odd:
            raise UserError(f"{path}: splits must be train, test or empty; got {odd[0]!r}")
        return cls(x, _labels(path, arrays["labels"], len(x), len(classes)), paths, splits, classes,
                   _strings(path, arrays, "class_names", len(classes)), _settings(path, arrays["settings"]),
                   _strings(path, arrays, "skipped"))


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
        np.savez(f, **arrays)


def _strings(path: str | Path, arrays: dict[str, np.ndarray], key: str, length: int | None = None) -> list[str]:
    """``arrays[key]`` as a list of strings, checked to be a 1-D array of text of ``length`` (when given)."""
    value = arrays[key]
    if value.ndim != 1 or (len(value) and value.dtype.kind != "U") or length not in (None, len(value)):
        size = "" if length is None else f" {length}"
        raise UserError(f"{path}: {key} must be a list of{size} strings; got {value.dtype} of shape {value.shape}")
    return [str(v) for v in value]


def _labels(path: str | Path, labels: np.ndarray, images: int, classes: int) -> np.ndarray:
    """Checked labels: (images,) class indices in [0, classes), or (images, classes) in {1, 0, -1} (VOC)."""
    if labels.dtype.kind not in "iu" or labels.shape not in ((images,), (images, classes)):
        raise UserError(f"{path}: labels must be integers of shape ({images},) or ({images}, {classes}) for its "
                        f"{images} images and {classes} classes; got {labels.dtype} of shape {labels.shape}")
    low, high = (0, classes - 1) if labels.ndim == 1 else (-1, 1)
    if labels.size and (labels.min() < low or labels.max() > high):
        raise UserError(f"{path}: labels must lie in [{low}, {high}]; got values from {labels.min()} to "
                        f"{labels.max()}")
    return labels


def _settings(path: str | Path, value: np.ndarray) -> dict[str, Any]:
    """The JSON object stored as ``settings``."""
    try:
        settings = json.loads(str(value.item())) if value.ndim == 0 and value.dtype.kind == "U" else None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: settings must be a JSON object (how the features were made)")
    return settings


def _load_npz(path: str | Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a features file")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such features file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise UserError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from error
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise UserError(f"{path}: not a verydeep features file (no {', '.join(missing)})")
    return arrays


# ---- extraction -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How descriptors are computed: scales Q, aggregation, device, autocast dtype, batch size, loader
    workers, progress bar, and how many batches between saves of a partial extraction."""

    scales: tuple[int, ...] = DEFAULT_SCALES
    aggregate: str = "stack"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    batch_size: int = 16
    workers: int = 0
    progress: bool = True
    checkpoint_every: int = 50

    @classmethod
    def create(cls, scales: Sequence[int] = DEFAULT_SCALES, aggregate: str = "stack", device: str = "auto",
               precision: str = "auto", batch_size: int = 16, workers: int | None = None, progress: bool = True,
               checkpoint_every: int = 50) -> Settings:
        """Settings with the device picked (``auto``: CUDA when there is one), bf16 where it is fast
        (``precision`` auto), and the loader workers defaulting to the cores less one."""

        if aggregate not in AGGREGATES:
            raise UserError(f"--aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
        if not scales or min(scales) < 1 or batch_size < 1 or checkpoint_every < 1:
            raise UserError("--scales, --batch-size and --checkpoint-every must be positive")
        torch_device = pick_device(device)
        dtype = sharding.agreed(autocast_dtype(torch_device, precision))  # measured: the first process's
        return cls(tuple(sorted(set(scales))), aggregate, torch_device, dtype,
                   batch_size, default_workers() if workers is None else workers, progress, checkpoint_every)


@dataclass
class Partial:
    """Descriptors per (net, Q) before aggregation, which images each Q's pass has done, the images
    skipped, and the ``key`` (nets, images, scales) that a run must match to continue from them."""

    key: str
    arrays: dict[str, np.ndarray]  # "net0_Q256": (N, D) float32
    done: np.ndarray  # (scales, N) bool
    skipped: set[str]

    @classmethod
    def start(cls, key: str, nets: Sequence[FeatureNet], scales: Sequence[int], n: int) -> Partial:
        arrays = {f"net{i}_Q{q}": np.zeros((n, net.dims), np.float32)
                  for i, net in enumerate(nets) for q in scales}
        return cls(key, arrays, np.zeros((len(scales), n), dtype=bool), set())

    def save(self, path: Path) -> None:
        arrays = {**self.arrays, "done": self.done, "skipped": np.array(sorted(self.skipped), dtype=str),
                  "key": np.array(self.key)}
        atomic_write(path, lambda tmp: _savez(tmp, arrays))

    def merge(self, p: int, q: int, rows: Sequence[int]) -> None:
        """Under ``torchrun``: the rows each process did in the ``p``-th pass (at Q = ``q``) since the last
        merge, ``rows`` this process's, and the images skipped, into every process's state."""
        for name, array in self.arrays.items():
            if name.endswith(f"_Q{q}"):
                sharding.gather_rows(array, rows)
        sharding.gather_rows(self.done[p], rows)
        self.skipped = sharding.union(self.skipped)

    @classmethod
    def resume(cls, path: Path, fresh: Partial) -> Partial:
        """The saved extraction at ``path`` when its key is ``fresh``'s, else ``fresh``; a partial
        extraction of other nets, images or scales is an error (nothing is silently thrown away)."""
        if not path.is_file():
            return fresh
        arrays = _load_npz(path, ("done", "skipped", "key"))
        if str(arrays["key"]) != fresh.key or set(fresh.arrays) - set(arrays):
            raise UserError(f"{path}: a partial extraction with other nets, images or scales; give the same "
                            "settings to continue it, or delete it")
        for name, like in [("done", fresh.done), *fresh.arrays.items()]:
            value = arrays[name]
            if value.shape != like.shape or value.dtype != like.dtype:
                raise UserError(f"{path}: damaged partial extraction ({name} is {value.dtype} of shape "
                                f"{value.shape}, not {like.dtype} of shape {like.shape}); delete it")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise UserError(f"{path}: damaged partial extraction ({name} holds values that are not finite); "
                                "delete it")
        return cls(fresh.key, {k: arrays[k] for k in fresh.arrays}, arrays["done"],
                   set(_strings(path, arrays, "skipped")))


def extraction_key(nets: Sequence[FeatureNet], images: ImageSet, scales: Sequence[int]) -> str:
    """What the per-image descriptors depend on, as JSON: the nets' weights and the images' paths, the scales."""
    paths = hashlib.blake2b("\n".join(images.paths).encode(), digest_size=16).hexdigest()
    return json.dumps({"nets": [n.digest for n in nets], "paths": paths, "scales": list(scales), "tap": TAP})


def run_passes(nets: Sequence[FeatureNet], images: ImageSet, state: Partial, settings: Settings,
               partial_path: Path | None, dataset: IndexedImages | None = None) -> None:
    """Fill ``state`` with every net's descriptors of every image not yet done, one pass per Q; save it
    every ``checkpoint_every`` batches and when interrupted. Under ``torchrun`` the processes share each
    pass's batches in lockstep, merge their work at every save and at the end of each pass, and the
    first alone writes."""

    if dataset is None:  # else the caller's items, one per row (person boxes: verydeep.eval.box_features)
        dataset = IndexedImages(images.paths)  # its image sizes are read once, for every pass
    procs, batches = Processes.from_env(), 0
    main, left = procs.main, None if procs.distributed else int((~state.done).sum())  # of this process's share
    with progress_bar(left, settings.progress and main, unit="img") as bar:
        try:
            for p, q in enumerate(settings.scales):
                bar.set_description(f"features Q={q}", refresh=False)
                fresh: list[int] = []  # the rows this process did since the last merge
                for rows in run_pass(nets, dataset, p, state, settings):
                    bar.update(len(rows))
                    fresh += rows
                    batches += 1
                    if batches % settings.checkpoint_every == 0:
                        state.merge(p, q, fresh)
                        fresh = []
                        if partial_path is not None and main:
                            state.save(partial_path)
                state.merge(p, q, fresh)
        except KeyboardInterrupt:
            if partial_path is not None and main:  # its own rows and those merged: each done one is right
                state.save(partial_path)
            raise


def run_pass(nets: Sequence[FeatureNet], dataset: IndexedImages, p: int, state: Partial, settings: Settings
             ) -> Iterator[list[int]]:
    """The pass at the ``p``-th Q over the images it has not done, whole images batched by their size after
    the rescale (this process's share of the batches, :func:`verydeep.runtime.sharding.shard`); yields the rows
    each batch completed, and nothing for the rounds in which another process is still at work."""

    q = settings.scales[p]
    dataset.transform = RescaleTransform(q)
    position = {str(path): i for path, i in dataset.samples}
    batches = [[i for i in batch if not state.done[p, i]]
               for batch in SizeGroupedBatchSampler(dataset, q, settings.batch_size).batches]
    batches = [b for b in batches if b]
    mine = sharding.shard(batches)
    for indices, batch, skipped in loaded_batches(dataset, mine, settings.workers):
        describe_batch(nets, batch, indices, q, state, settings)
        state.skipped.update(skipped)
        rows = [*indices.tolist(), *(position[path] for path in skipped)]
        state.done[p, rows] = True
        yield rows
    for _ in range(sharding.rounds(len(batches)) - len(mine)):
        yield []


@torch.inference_mode()
def describe_batch(nets: Sequence[FeatureNet], images: Tensor, indices: np.ndarray, q: int, state: Partial,
                   settings: Settings) -> None:
    """Every net's descriptors of one batch of uint8 images at Q = ``q``, into ``state``."""

    if not len(indices):
        return
    images = images.to(settings.device)
    for i, net in enumerate(nets):
        x = to_input(images, net.preprocess).contiguous(memory_format=torch.channels_last)
        with autocast(settings.device, settings.dtype):
            state.arrays[f"net{i}_Q{q}"][indices] = pooled_descriptor(net.dense, x).cpu().numpy()


def extract_features(sources: Sequence[str | Path], data: str | Path, out: str | Path | None = None,
                     settings: Settings | None = None, weights_dir: str | Path | None = None) -> Features:
    """Appendix B's descriptors of every image of ``data`` (:func:`open_image_set`) by the nets of ``sources``
    (anything :func:`verydeep.load` reads; several stack their descriptors).

    With ``out`` the result is written there, and the work is saved every ``settings.checkpoint_every``
    batches to ``OUT.partial``, which a later call with the same nets, images and scales continues.
    """
    settings = settings or Settings.create()
    images = open_image_set(data)
    nets = load_feature_nets(sources, data, settings.device, weights_dir, settings.dtype)
    small = [(net.source, net.crop) for net in nets if settings.scales[0] < net.crop]
    if small:
        raise UserError(f"--scales {settings.scales[0]} is smaller than the crop {small[0][1]} of {small[0][0]}")
    partial_path = Path(f"{out}.partial") if out is not None else None
    state = Partial.start(extraction_key(nets, images, settings.scales), nets, settings.scales, len(images.paths))
    if partial_path is not None:
        state = Partial.resume(partial_path, state)
    run_passes(nets, images, state, settings, partial_path)
    keep = np.array([path not in state.skipped for path in images.paths])
    per_net = [aggregate([state.arrays[f"net{i}_Q{q}"][keep] for q in settings.scales], settings.aggregate)
               for i in range(len(nets))]
    for net, descriptors in zip(nets, per_net, strict=True):
        if not np.isfinite(descriptors).all():
            raise UserError(f"{net.source}: the net's features are not finite (NaN or inf)")
    description = {"kind": "vgg", "tap": TAP, "flip": True, "nets": [net.describe() for net in nets],
                   "scales": list(settings.scales), "aggregate": settings.aggregate, "data": str(data)}
    result = kept_images(images, keep, combine(per_net), description, state.skipped)
    if out is not None and Processes.from_env().main:
        result.save(out)
        partial_path.unlink(missing_ok=True)
    return result


def kept_images(images: ImageSet, keep: np.ndarray, features: np.ndarray, settings: dict[str, Any],
                skipped: set[str]) -> Features:
    """The :class:`Features` of the images ``keep`` marks (those read), their descriptors ``features``."""
    if not keep.any():
        raise UserError("no image could be read")
    chosen = np.flatnonzero(keep)
    return Features(features, images.labels[keep], [images.paths[i] for i in chosen],
                    [images.splits[i] for i in chosen], images.classes, images.class_names, settings, sorted(skipped))


#: The copies of the raw-pixel descriptors held at once: all, those of the images read, normalised.
RAW_PIXEL_COPIES = 3


def raw_pixel_features(data: str | Path, side: int, settings: Settings | None = None) -> Features:
    """A baseline without a ConvNet: each image's smallest side rescaled to ``side``, its central ``side`` x
    ``side`` square's pixels (RGB on 0..1) less their mean, L2-normalised."""

    settings = settings or Settings.create()
    images = open_image_set(data)
    n, size = len(images.paths), settings.batch_size
    need, available = RAW_PIXEL_COPIES * n * 3 * side * side * 4, available_memory_bytes()
    if available is not None and need > available:
        raise UserError(f"--raw-pixels {side}: the descriptors of {n} images take {need / 1e9:.3g} GB (float32, "
                        f"{RAW_PIXEL_COPIES} copies), more than the {available / 1e9:.3g} GB available; give a smaller "
                        "side")
    dataset = IndexedImages(images.paths, CenterCropTransform(side, side))
    pixels = np.zeros((n, 3 * side * side), np.float32)
    skipped: set[str] = set()
    batches = sharding.shard([list(range(start, min(start + size, n))) for start in range(0, n, size)])
    with progress_bar(sum(map(len, batches)), settings.progress and Processes.from_env().main, unit="img",
                      desc=f"pixels {side}x{side}") as bar:
        for indices, batch, lost in loaded_batches(dataset, batches, settings.workers):
            values = batch.reshape(len(indices), -1).float().numpy() / 255
            pixels[indices] = values - values.mean(axis=1, keepdims=True)
            skipped.update(lost)
            bar.update(len(indices) + len(lost))
    sharding.gather_rows(pixels, [i for batch in batches for i in batch])
    skipped = sharding.union(skipped)
    keep = np.array([path not in skipped for path in images.paths])
    return kept_images(images, keep, l2_normalise(pixels[keep]), {"kind": "raw-pixels", "side": side,
                                                                  "data": str(data)}, skipped)


# ---- command line ---------------------------------------------------------------------------


def add_extraction_flags(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    """The flags that say which images are described and how: ``features``' and ``transfer``'s."""
    from verydeep.eval.box_features import REGIONS

    add_weights(p, repeat="stack several nets' descriptors")
    p.add_argument("--raw-pixels", type=image_side, default=None, metavar="SIDE",
                   help="instead of a net, the pixels of each image's central SIDE x SIDE square (a baseline)")
    p.add_argument("--data", required=data_required, metavar="DIR",
                   help="a VOC root (JPEGImages/, Annotations/, ImageSets/Main/), a root with train/ and test/ "
                        "(or val/) class folders, or a folder of class folders; with --regions a VOC action root "
                        "(ImageSets/Action/)")
    p.add_argument("--regions", choices=REGIONS, default=None,
                   help="VOC action classification (Table 12): one row per person, the whole image's descriptor "
                        "(image) or that stacked with the person box's (image+box)")
    p.add_argument("--scales", type=parse_scales, default=list(DEFAULT_SCALES),
                   help="test scales Q in pixels, whatever the net's crop (default 256,384,512)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="stack",
                   help="over the scales: stack (concatenate) or average the descriptors (default stack)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default 16)")
    add_workers(p)
    add_device(p)
    add_precision(p)
    p.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="N",
                   help="batches between saves of the work done to OUT.partial (default 50)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def features_from_args(args: argparse.Namespace, out: Path | None) -> Features:
    """The descriptors the extraction flags ask for (written to ``out`` when given)."""
    if bool(args.weights) == bool(args.raw_pixels):
        raise UserError("give --weights SOURCE (repeatable) or --raw-pixels SIDE, one of the two")
    settings = Settings.create(args.scales, args.aggregate, args.device, args.precision, args.batch_size,
                               args.workers, args.progress, args.checkpoint_every)
    if args.regions is not None:
        from verydeep.eval.box_features import extract_action_features

        if args.raw_pixels:
            raise UserError("--regions describes persons with a net's features: give --weights, not --raw-pixels")
        return extract_action_features(args.weights, args.data, args.regions, out, settings, args.weights_dir)
    if args.weights:
        return extract_features(args.weights, args.data, out, settings, args.weights_dir)
    result = raw_pixel_features(args.data, args.raw_pixels, settings)
    if out is not None and Processes.from_env().main:
        result.save(out)
    return result


def origin(settings: dict[str, Any]) -> str:
    """How descriptors were made, from their settings: ``A-BN FC7, Q=256,384,512 stack`` or ``raw pixels 32x32``."""
    kind = str(settings.get("kind", "features"))
    try:
        if kind == "raw-pixels":
            return f"raw pixels {int(settings['side'])}x{int(settings['side'])}"
        if kind == "vgg":
            nets = " + ".join(str(net["model"]) for net in settings["nets"])
            return f"{nets} FC7, Q={','.join(map(str, settings['scales']))} {settings['aggregate']}"
    except (KeyError, TypeError, ValueError):  # settings of another writer: they only describe
        return f"{kind} (settings incomplete)"
    return kind


def describe(features: Features) -> str:
    """One line: how many images (or persons) and features, made how."""
    rows = "persons" if "regions" in features.settings else "images"
    return (f"{len(features.paths)} {rows} x {features.features.shape[1]} features ({origin(features.settings)}), "
            f"{len(features.skipped)} skipped")


def run_cli(args: argparse.Namespace) -> int:
    """``features``; under ``torchrun`` the processes share the images and the first writes and prints."""
    with sharding.process_group(args.device) as procs:
        features = features_from_args(args, args.out)
    if procs.main:
        print(f"{args.out}: {describe(features)}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("features", help="FC7 descriptors of the dense net for linear SVMs (Appendix B)",
                              description=__doc__.split("\n\n")[0])
    add_extraction_flags(p)
    p.add_argument("--out", type=output_file, required=True, metavar="FEATURES.npz",
                   help="the .npz to write (features, labels, paths, splits, classes, settings)")
    p.set_defaults(func=run_cli)
