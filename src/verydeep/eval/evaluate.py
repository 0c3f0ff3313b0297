"""Evaluation (Sec. 3.2, 4): dense, multi-crop, multi-scale, combined and fused, as Tables 3 to 6.

Each net's softmax posteriors are computed once per (protocol, test scale Q) and every reported
row is derived from those arrays by averaging, as the paper does:

- dense (Sec. 3.2): the fully-convolutional net on the whole image rescaled to Q; the class score
  map is averaged spatially, softmax taken, and the horizontally flipped image's posterior
  averaged in;
- multi-crop: a regular 5x5 grid of crops (corners included) and their mirror images, 50 per
  scale, the plain net on each, posteriors averaged;
- multi-scale: posteriors averaged over Q (Table 4); combination: the dense and multi-crop
  posteriors averaged (Table 5); fusion: the posteriors of several nets averaged (Table 6);
- centre crop: the usual single crop (resize 256, crop 224, scaled by crop/224 for small nets),
  not flipped, to compare with published torchvision figures.

Errors are fractions, top-k as :mod:`verydeep.eval.metrics` counts them (ties go to the true class).
The result is an :class:`EvalResult`; :mod:`verydeep.paper.report` renders it as the paper's tables.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
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
    output_dir,
    parse_scales,
    positive_int,
)
from verydeep.data import (
    CenterCropTransform,
    RescaleTransform,
    SizeGroupedBatchSampler,
    balanced_subset,
    collate,
    find_split,
    gpu,
    grid_crops,
    open_split,
    to_input,
)
from verydeep.data.loaders import image_loader
from verydeep.errors import UserError
from verydeep.eval.classmap import ClassMap, class_map
from verydeep.eval.metrics import per_class_accuracy, topk_error
from verydeep.io.sources import load, model_name
from verydeep.nn import configs
from verydeep.nn.model import VGG, DenseVGG
from verydeep.paper import figures, report
from verydeep.paper.figures import PaperNet, scale_text
from verydeep.paper.report import PROTOCOL_LABELS, scales_label
from verydeep.runtime import (
    Processes,
    autocast,
    autocast_dtype,
    default_workers,
    keep_freed_memory,
    pick_device,
    progress_bar,
    sharding,
)

#: Protocols a user can ask for; ``dense+multicrop`` is the combination of Table 5.
PROTOCOLS = ("dense", "multicrop", "dense+multicrop", "center")
DEFAULT_PROTOCOLS = ("dense", "multicrop", "dense+multicrop")

#: Multi-crop forwards take as many crops as keep the first conv's output under this many elements:
#: 128 crops of 224 for a full-width net (1.6 GB in fp32), thousands of small crops of a narrow one.
ACTIVATION_BUDGET = 128 * 224 * 224 * 64


# ---- scales -------------------------------------------------------------------------------


def train_scale(recipe: dict[str, Any]) -> tuple[int, int]:
    """(Smin, Smax) of a recipe; equal for a fixed training scale."""
    scale = recipe.get("scale")
    if scale is None:
        raise UserError("the checkpoint's recipe has no training scale ('scale'); give --scales")
    smin, smax = (scale, scale) if isinstance(scale, int) else (int(scale[0]), int(scale[-1]))
    return smin, smax


def derive_scales(recipe: dict[str, Any]) -> list[int]:
    """Test scales Q as in Sec. 3.2/4.2: {S-32, S, S+32} for fixed S, {Smin, mid, Smax} for jittered S.

    The 32-pixel offset is scaled by crop/224 (5 pixels for a 32-pixel crop), the jittered
    midpoint rounds down, and scales below the crop are raised to it (duplicates dropped).
    """
    crop = int(recipe["crop"])
    smin, smax = train_scale(recipe)
    if smin == smax:
        offset = round(32 * crop / 224)
        candidates = [smin - offset, smin, smin + offset]
    else:
        candidates = [smin, (smin + smax) // 2, smax]
    return sorted({max(crop, q) for q in candidates})


#: The paper's multi-scale test scales for a 224 crop when the training scale is not known (Sec. 4.2).
PAPER_SCALES = (256, 384, 512)


def center_resize(crop: int) -> int:
    """The centre-crop protocol's resize: 256 for a 224 crop, the same ratio otherwise (37 for 32)."""
    return round(crop * 256 / 224)


# ---- posteriors ---------------------------------------------------------------------------


def dense_posteriors(dense: DenseVGG, x: Tensor, flip: bool = True) -> Tensor:
    """Sec. 3.2 dense evaluation of a batch of normalised images (N, 3, H, W) -> posteriors (N, classes).

    The class score map is averaged spatially, then softmax; with ``flip`` the mirrored image's
    posterior is averaged in. Scores are taken to fp32 before averaging.
    """
    n = x.shape[0]
    inputs = torch.cat([x, x.flip(-1)]) if flip else x
    posteriors = dense(inputs).float().mean(dim=(2, 3)).softmax(dim=1)
    return posteriors.view(2, n, -1).mean(dim=0) if flip else posteriors


def multicrop_posteriors(
    model: VGG, x: Tensor, crop: int, grid: int = 5, flip: bool = True, chunk: int | None = None
) -> Tensor:
    """Sec. 3.2 multi-crop evaluation: posteriors (N, classes) averaged over the grid crops and flips.

    Crops go through the net at most ``chunk`` at a time (whole images per forward; by default
    as many as :data:`ACTIVATION_BUDGET` allows) to bound memory.
    """

    per_image = grid * grid * (2 if flip else 1)
    if chunk is None:
        chunk = ACTIVATION_BUDGET // (crop * crop * model.features[0].out_channels)
    step = max(1, chunk // per_image)
    out = []
    for start in range(0, x.shape[0], step):
        crops = grid_crops(x[start : start + step], crop, grid, flip)
        n = crops.shape[0]
        crops = crops.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        out.append(model(crops).float().softmax(dim=1).view(n, per_image, -1).mean(dim=1))
    return torch.cat(out)


def average(posteriors: Iterable[Tensor]) -> Tensor:
    """The mean of several (N, classes) posterior arrays (multi-scale, combination, fusion)."""
    return torch.stack(list(posteriors)).mean(dim=0)


# ---- nets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetInfo:
    """An evaluated net as the result records it: checkpoint, model, crop and scales."""

    name: str
    checkpoint: str
    model: str  # the configuration, with -BN for batch norm: "D", "A-BN"
    config: str
    batch_norm: bool
    width: float | None
    crop: int
    train_scale: list[int] | None  # [Smin, Smax]; None when the recipe has none
    scales: list[int]  # test scales Q


@dataclass
class Net:
    """A net ready to evaluate: model, recipe, test scales and input convention (``checkpoint`` names its source)."""

    name: str
    checkpoint: str
    model: VGG
    recipe: dict[str, Any]
    scales: list[int]
    preprocess: Any
    dense: DenseVGG = field(init=False)

    def __post_init__(self) -> None:
        self.dense = self.model.dense()

    @property
    def crop(self) -> int:
        return self.model.input_size

    @property
    def config(self) -> str:
        return configs.canonical(self.recipe["config"])

    @property
    def scale(self) -> tuple[int, int] | None:
        return train_scale(self.recipe) if self.recipe.get("scale") is not None else None

    @property
    def imagenet_sized(self) -> bool:
        """1000 classes and 224-pixel crops, like the paper's ILSVRC nets."""
        return self.model.num_classes == 1000 and self.crop == 224

    def describe(self) -> NetInfo:
        return NetInfo(
            name=self.name, checkpoint=self.checkpoint, model=model_name(self.recipe), config=self.config,
            batch_norm=bool(self.recipe.get("batch_norm", False)), width=self.recipe.get("width"), crop=self.crop,
            train_scale=list(self.scale) if self.scale else None, scales=self.scales,
        )


def net_scales(recipe: dict[str, Any], crop: int, scales: Sequence[int] | None, source: str | Path) -> list[int]:
    """Test scales Q of a net: ``scales`` when given, else derived from its training scale
    (:func:`derive_scales`), else the paper's Q = {256, 384, 512} (Sec. 4.2) scaled by crop/224.
    A scale below the crop is an error naming the net."""
    if scales:
        chosen = sorted(set(scales))
    elif recipe.get("scale") is not None:
        chosen = derive_scales(recipe)
    else:
        chosen = sorted({round(q * crop / 224) for q in PAPER_SCALES})
    small = [q for q in chosen if q < crop]
    if small:
        raise UserError(f"--scales {small} smaller than the crop {crop} of {source}")
    return chosen


def load_nets(sources: Sequence[str | Path], scales: Sequence[int] | None, data_dir: Path | None,
              device: torch.device, weights_dir: str | Path | None = None, dtype: torch.dtype | None = None,
              ) -> list[Net]:
    """Load each net (:func:`verydeep.load`, refused without a classifier) with its own crop, test scales
    (given ``scales`` override the recipe's) and input convention; its weights in ``dtype``, the autocast
    dtype it will run under (:func:`verydeep.runtime.prepare`), when given."""
    if not sources:
        raise UserError("give at least one --weights")
    nets: list[Net] = []
    for source in sources:
        loaded = load(source, weights_dir, data=data_dir, device=device, dtype=dtype, purpose="classify")
        model, recipe, name = loaded.model, loaded.recipe, loaded.name
        if recipe.get("scale") is not None:
            name += f" S={scale_text(*train_scale(recipe))}"
        nets.append(Net(name, str(source), model, recipe, net_scales(recipe, model.input_size, scales, source),
                        loaded.preprocess))
    names = [n.name for n in nets]
    for i, net in enumerate(nets):  # make duplicate names unique
        if names.count(net.name) > 1:
            net.name = f"{net.name} #{names[: i + 1].count(net.name)}"
    return nets


# ---- computing the posteriors -------------------------------------------------------------

#: Posteriors (N, classes) by (net index, kind, Q); kind is ``dense``, ``multicrop`` or ``center``.
PosteriorArrays = dict[tuple[int, str, int], Tensor]


@dataclass(frozen=True)
class Pass:
    """One sweep over the data: whole images rescaled to ``q`` (``crop`` 0), or centre crops of ``crop``."""

    q: int
    crop: int = 0

    def transform(self) -> Any:

        return CenterCropTransform(self.q, self.crop) if self.crop else RescaleTransform(self.q)

    def label(self) -> str:
        return f"centre {self.q}/{self.crop}" if self.crop else f"Q={self.q}"


#: For one pass: which nets (by index) compute which kinds of posterior.
PassUsers = list[tuple[int, list[str]]]


def plan_passes(nets: Sequence[Net], protocols: Sequence[str]) -> dict[Pass, PassUsers]:
    """Which nets compute which kinds of posterior on each sweep: images are decoded once per Q."""
    kinds = [k for k in ("dense", "multicrop") if k in protocols or "dense+multicrop" in protocols]
    passes: dict[Pass, PassUsers] = {}
    for i, net in enumerate(nets):
        if kinds:
            for q in net.scales:
                passes.setdefault(Pass(q), []).append((i, kinds))
        if "center" in protocols:
            passes.setdefault(Pass(center_resize(net.crop), net.crop), []).append((i, ["center"]))
    return dict(sorted(passes.items(), key=lambda item: (item[0].crop, item[0].q)))


@dataclass(frozen=True)
class SweepSettings:
    """How the passes run: device, autocast dtype, mirrored images, batch size, loader workers, progress bar,
    and where JPEGs are decoded (``cpu`` in the workers, ``gpu`` on the device)."""

    device: torch.device
    dtype: torch.dtype | None
    flip: bool
    batch_size: int
    workers: int
    progress: bool
    decode: str = "cpu"


@dataclass(frozen=True)
class PassTiming:
    """The time one pass took (``pass_`` is ``pass`` in JSON)."""

    pass_: str
    nets: list[str]
    kinds: list[str]
    seconds: float
    seconds_per_image: float


def net_posteriors(net: Net, kind: str, x: Tensor, flip: bool) -> Tensor:
    """One net's posteriors (N, classes) of a batch of inputs by one kind of evaluation."""
    if kind == "dense":
        return dense_posteriors(net.dense, x, flip)
    if kind == "multicrop":
        return multicrop_posteriors(net.model, x, net.crop, flip=flip)
    return net.model(x).float().softmax(dim=1)


def pass_batches(dataset: Any, sweep: Pass, size: int) -> list[list[int]]:
    """One process's batches of a pass: whole images grouped by their size at Q, or centre crops in order."""

    n = len(dataset)
    if sweep.crop:
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    return SizeGroupedBatchSampler(dataset, sweep.q, size).batches


def run_pass(nets: Sequence[Net], dataset: Any, sweep: Pass, users: PassUsers, posteriors: PosteriorArrays,
             settings: SweepSettings, batches: Sequence[list[int]], bar: Any) -> set[str]:
    """Fill the rows of ``batches`` in ``posteriors`` for one pass over ``dataset``; returns the paths of
    unreadable images."""


    on_gpu = settings.decode == "gpu"
    dataset.transform = gpu.EncodedTransform(sweep.transform()) if on_gpu else sweep.transform()
    collate_fn = gpu.collate_encoded if on_gpu else collate
    loader = image_loader(dataset, batches, settings.workers, collate_fn, settings.device)
    paths = [str(path) for path, _ in dataset.samples]
    skipped: set[str] = set()
    for indices, loaded in zip(batches, loader, strict=True):
        batch = gpu.decode_batch(loaded, settings.device) if on_gpu else loaded
        skipped.update(batch.skipped)
        bad = set(batch.skipped)
        good = torch.tensor([i for i in indices if paths[i] not in bad], dtype=torch.long)
        bar.update(len(indices))
        if not len(good):
            continue
        images = batch.images.to(settings.device, non_blocking=True)
        for i, kinds in users:
            x = to_input(images, nets[i].preprocess).contiguous(memory_format=torch.channels_last)
            with autocast(settings.device, settings.dtype):
                for kind in kinds:
                    posteriors[i, kind, sweep.q][good] = net_posteriors(nets[i], kind, x, settings.flip).cpu()
    return skipped


@torch.inference_mode()
def compute_posteriors(nets: Sequence[Net], dataset: Any, passes: dict[Pass, PassUsers],
                       settings: SweepSettings) -> tuple[PosteriorArrays, set[str], list[PassTiming]]:
    """Posteriors per (net index, kind, Q), NaN rows for unreadable images; their paths; each pass's time.
    Under ``torchrun`` each process computes its share of every pass's batches and the rows are gathered
    (:mod:`verydeep.runtime.sharding`): every process ends with one process's arrays."""
    n = len(dataset)
    posteriors = {
        (i, kind, p.q): torch.full((n, nets[i].model.num_classes), float("nan"))
        for p, users in passes.items()
        for i, kinds in users
        for kind in kinds
    }
    plans = {sweep: sharding.shard(pass_batches(dataset, sweep, settings.batch_size)) for sweep in passes}
    skipped: set[str] = set()
    seconds = []
    own_images = sum(len(batch) for batches in plans.values() for batch in batches)
    with progress_bar(own_images, settings.progress and Processes.from_env().main, unit="img") as bar:
        for sweep, users in passes.items():
            bar.set_description(f"eval {sweep.label()}", refresh=False)
            start = time.perf_counter()
            skipped |= run_pass(nets, dataset, sweep, users, posteriors, settings, plans[sweep], bar)
            rows = [i for batch in plans[sweep] for i in batch]
            for i, kinds in users:
                for kind in kinds:
                    sharding.gather_rows(posteriors[i, kind, sweep.q], rows)
            if settings.device.type == "cuda":
                torch.cuda.synchronize(settings.device)
            seconds.append(time.perf_counter() - start)
    timings = [PassTiming(sweep.label(), [nets[i].name for i, _ in users],
                          sorted({k for _, kinds in users for k in kinds}), round(took, 3), round(took / n, 6))
               for (sweep, users), took in zip(passes.items(), sharding.slowest(seconds), strict=True)]
    return posteriors, sharding.union(skipped), timings


# ---- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperFigures:
    """The paper's errors for a row (fractions, like ours) and the table that reports them."""

    table: str
    top1_error: float
    top5_error: float

    @classmethod
    def lookup(cls, table: int, nets: Sequence[PaperNet], protocol: str = "dense") -> PaperFigures | None:
        """Table 3, 4, 5 or 6's errors for these nets under ``protocol``; None where it has none."""
        errors = figures.classification_errors(table, nets, protocol)
        return None if errors is None else cls(f"Table {table}", errors.top1 / 100, errors.top5 / 100)


@dataclass(frozen=True)
class RowSpec:
    """What a row measures: its nets (fused when several), protocol and test scales Q."""

    name: str
    protocol: str
    scales: list[int]
    nets: list[str]
    multi_scale: bool
    fusion: bool


@dataclass(frozen=True)
class EvalRow(RowSpec):
    """A measured row: top-1 and top-5 error (fractions) on ``images`` images, and the paper's figures
    for it where the paper reports the same row (an ImageNet-sized run)."""

    top1_error: float
    top5_error: float
    images: int
    paper: PaperFigures | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRow:
        """A row from its JSON form (a result's ``rows``)."""
        figures = data.get("paper")
        return cls(**{**data, "paper": PaperFigures(**figures) if figures else None})


def derive_rows(nets: Sequence[Net], posteriors: PosteriorArrays,
                protocols: Sequence[str]) -> list[tuple[RowSpec, Tensor]]:
    """Every reported row with its posteriors, by averaging the computed posteriors.

    Per net: dense and multi-crop at each Q, their multi-scale averages, dense+multi-crop, centre
    crop; then, with several nets, the fusion of their full posteriors for each protocol.
    """
    rows: list[tuple[RowSpec, Tensor]] = []
    full: dict[tuple[int, str], Tensor] = {}

    def add(name: str, protocol: str, scales: Sequence[int], members: Sequence[Net], post: Tensor) -> None:
        rows.append((RowSpec(name, protocol, sorted(scales), [m.name for m in members], len(scales) > 1,
                             len(members) > 1), post))

    for i, net in enumerate(nets):
        prefix = f"{net.name}: " if len(nets) > 1 else ""
        for kind in ("dense", "multicrop"):
            if kind not in protocols and "dense+multicrop" not in protocols:
                continue
            per_scale = [posteriors[i, kind, q] for q in net.scales]
            full[i, kind] = average(per_scale)
            if kind not in protocols:
                continue
            for q, post in zip(net.scales, per_scale, strict=True):
                add(f"{prefix}{PROTOCOL_LABELS[kind]} Q={q}", kind, [q], [net], post)
            if len(net.scales) > 1:
                add(f"{prefix}{PROTOCOL_LABELS[kind]} Q={scales_label(net.scales)}", kind, net.scales, [net],
                    full[i, kind])
        if "dense+multicrop" in protocols:
            full[i, "dense+multicrop"] = average([full[i, "dense"], full[i, "multicrop"]])
            add(f"{prefix}{PROTOCOL_LABELS['dense+multicrop']} Q={scales_label(net.scales)}", "dense+multicrop",
                net.scales, [net], full[i, "dense+multicrop"])
        if "center" in protocols:
            resize = center_resize(net.crop)
            full[i, "center"] = posteriors[i, "center", resize]
            add(f"{prefix}{PROTOCOL_LABELS['center']} {resize}/{net.crop}", "center", [resize], [net],
                full[i, "center"])
    if len(nets) > 1:
        names = " + ".join(net.name for net in nets)
        scales = sorted({q for net in nets for q in net.scales})
        for protocol in protocols:
            used = scales if protocol != "center" else sorted({center_resize(net.crop) for net in nets})
            add(f"fusion of {names}: {PROTOCOL_LABELS[protocol]}", protocol, used, nets,
                average(full[i, protocol] for i in range(len(nets))))
    return rows


def paper_figures(row: RowSpec, nets: Sequence[Net]) -> PaperFigures | None:
    """The paper's published errors for a row of an ImageNet-sized run at the paper's test scales, if it reports one."""
    members = [n for n in nets if n.name in row.nets]
    trained = [n.scale for n in members if n.imagenet_sized and n.scale is not None]
    table = figures.classification_table(row.protocol, row.multi_scale, row.fusion)
    if table is None or len(trained) != len(members):
        return None

    def paper_scales(smin: int, smax: int) -> list[int]:
        if row.multi_scale or row.fusion:
            return figures.multi_test_scales(smin, smax)
        return [figures.single_test_scale(smin, smax)]

    if any(row.scales != paper_scales(*scale) for scale in trained):
        return None
    nets_of_paper = [PaperNet.trained_at(n.config, *scale) for n, scale in zip(members, trained, strict=True)]
    return PaperFigures.lookup(table, nets_of_paper, row.protocol)


def main_row(rows: Sequence[EvalRow], protocols: Sequence[str]) -> EvalRow:
    """The headline row: the fullest protocol asked for, fused over all nets when there are several."""
    best = next(p for p in ("dense+multicrop", "multicrop", "dense", "center") if p in protocols)
    candidates = [r for r in rows if r.protocol == best]
    return max(candidates, key=lambda r: (r.fusion, len(r.scales)))


def score_rows(nets: Sequence[Net], posteriors: PosteriorArrays, protocols: Sequence[str], targets: Tensor,
               valid: Tensor) -> tuple[list[EvalRow], dict[str, Tensor]]:
    """Every row's errors on the readable images, and each row's posteriors of those images by row name."""
    rows, row_posteriors = [], {}
    readable_targets = targets[valid]
    for spec, post in derive_rows(nets, posteriors, protocols):
        p = post[valid]
        rows.append(EvalRow(**vars(spec), top1_error=topk_error(p, readable_targets, 1),
                            top5_error=topk_error(p, readable_targets, 5), images=int(valid.sum()),
                            paper=paper_figures(spec, nets)))
        row_posteriors[spec.name] = p
    return rows, row_posteriors


# ---- the whole evaluation -----------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall time of the whole evaluation, per image, and of each pass."""

    seconds: float
    seconds_per_image: float
    passes: list[PassTiming]


@dataclass
class Posteriors:
    """Every posterior array computed (N, classes) by net, kind and Q (``net0_dense_Q256``), with the
    targets and image paths: every row can be recomputed from them. ``rows`` holds each row's own
    posteriors by row name, of the readable images only (``readable``, a mask over ``paths``): what
    fusing rows afterwards or a paired comparison of two rows needs. Not part of the JSON result."""

    arrays: dict[str, np.ndarray]
    targets: np.ndarray
    paths: list[str]
    readable: np.ndarray
    rows: dict[str, np.ndarray]


@dataclass
class EvalResult:
    """An evaluation: its rows (see :class:`EvalRow`), the ``main`` row's name and per-class accuracy,
    the classes, the nets, settings and timing; ``posteriors`` only when asked for."""

    data: str
    images: int
    skipped: list[str]
    classes: list[str]
    class_names: list[str]
    nets: list[NetInfo]
    protocols: list[str]
    flip: bool
    device: str
    precision: str
    imagenet_sized: bool
    scored: str  # over which classes the errors are counted (:meth:`verydeep.eval.classmap.ClassMap.describe`)
    rows: list[EvalRow]
    main: str
    per_class_accuracy: dict[str, float | None]
    timing: Timing
    posteriors: Posteriors | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able result: every field but ``posteriors``."""
        public = report.to_json_dict(replace(self, posteriors=None))
        del public["posteriors"]
        return public


def check_options(protocols: Sequence[str], scales: Sequence[int] | None, batch_size: int,
                  workers: int | None) -> list[str]:
    """The protocols asked for, each once; a bad option is a :class:`UserError` naming it."""
    protocols = list(dict.fromkeys(protocols))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise UserError(f"--protocol {','.join(unknown) or '(none)'}: choose from {', '.join(PROTOCOLS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}")
    if scales is not None and any(q <= 0 for q in scales):
        raise UserError(f"--scales must be positive; got {list(scales)}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be 0 or more; got {workers}")
    return protocols


def readable_images(nets: Sequence[Net], posteriors: PosteriorArrays, paths: Sequence[str], skipped: set[str],
                    split: Path) -> Tensor:
    """The mask of the images that were read. None read, or a net whose outputs on them are not finite
    (NaN or inf), is a :class:`UserError`; the latter names the net's checkpoint."""
    valid = torch.tensor([path not in skipped for path in paths], dtype=torch.bool)
    if not valid.any():
        raise UserError(f"{split}: no image could be read")
    for (i, kind, q), post in posteriors.items():
        bad = int((~post[valid].isfinite().all(dim=1)).sum())
        if bad:
            raise UserError(f"{nets[i].checkpoint}: the net's outputs are not finite (NaN or inf) on {bad} of "
                            f"{int(valid.sum())} images ({PROTOCOL_LABELS[kind]}, Q={q})")
    return valid


def open_labelled(split: Path, nets: Sequence[Net], limit: int | None, over_data_classes: bool) -> tuple[Any, ClassMap]:
    """The split's labelled images (a class-balanced subset of ``limit``) and where its classes sit among
    the nets' outputs."""

    dataset = open_split(split, lambda path: None)
    mapping = class_map(nets, dataset.classes, dataset.class_names, over_data_classes)
    dataset.samples = [dataset.samples[i] for i in balanced_subset(dataset.targets, limit)]
    return dataset, mapping


def evaluate(
    sources: Sequence[str | Path],
    data: str | Path,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    scales: Sequence[int] | None = None,
    flip: bool = True,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    keep_posteriors: bool = False,
    decode: str = "auto",
    weights_dir: str | Path | None = None,
    over_data_classes: bool = False,
) -> EvalResult:
    """Evaluate nets (``sources``, as :func:`verydeep.load` reads them) on a labelled split of ``data``
    with the protocols of Sec. 3.2, each net at its own crop, convention and test scales (``scales``,
    else :func:`net_scales`), several nets also fused; ``limit``: a class-balanced subset; ``decode``:
    where JPEGs are decoded; nets of more classes than the data's scored over their softmax, or the
    data's classes with ``over_data_classes`` (:mod:`verydeep.eval.classmap`)."""

    protocols = check_options(protocols, scales, batch_size, workers)
    started = time.perf_counter()
    split = find_split(data, "val")
    torch_device = pick_device(device)
    if torch_device.type == "cpu":
        keep_freed_memory()  # no fresh pages for every batch's activations
    dtype = sharding.agreed(autocast_dtype(torch_device, precision))  # measured: the first process's
    nets = load_nets(sources, scales, split, torch_device, weights_dir, dtype)
    dataset, mapping = open_labelled(split, nets, limit, over_data_classes)
    settings = SweepSettings(torch_device, dtype, flip, batch_size, default_workers() if workers is None else workers,
                             progress, gpu.resolve_decode(decode, torch_device))
    posteriors, skipped, timings = compute_posteriors(nets, dataset, plan_passes(nets, protocols), settings)
    posteriors = {key: mapping.posteriors(post) for key, post in posteriors.items()}
    paths = [str(path) for path, _ in dataset.samples]
    valid = readable_images(nets, posteriors, paths, skipped, split)
    targets = mapping.targets(torch.tensor(dataset.targets, dtype=torch.long))
    rows, row_posteriors = score_rows(nets, posteriors, protocols, targets, valid)
    main = main_row(rows, protocols)
    classes = list(dataset.classes)
    scored = per_class_accuracy(row_posteriors[main.name], targets[valid], mapping.scored_classes)
    accuracy = [scored[i] for i in mapping.targets(torch.arange(len(classes))).tolist()]
    seconds = time.perf_counter() - started
    return EvalResult(
        data=str(split), images=int(valid.sum()), skipped=sorted(skipped), classes=classes,
        class_names=list(dataset.class_names), nets=[net.describe() for net in nets], protocols=protocols,
        flip=flip, device=str(torch_device), precision="bf16" if dtype == torch.bfloat16 else "fp32",
        imagenet_sized=all(net.imagenet_sized for net in nets), scored=mapping.describe(), rows=rows, main=main.name,
        per_class_accuracy=dict(zip(classes, accuracy, strict=True)),
        timing=Timing(round(seconds, 3), round(seconds / len(dataset), 6), timings),
        posteriors=Posteriors({f"net{i}_{kind}_Q{q}": post.numpy() for (i, kind, q), post in posteriors.items()},
                              targets.numpy(), paths, valid.numpy(),
                              {name: p.numpy() for name, p in row_posteriors.items()})
        if keep_posteriors else None,
    )


def write_outputs(result: EvalResult, out_dir: str | Path) -> Path:
    """``results.json``, ``results.md`` (the four tables and every row) and ``posteriors.npz`` in ``out_dir``.

    The npz holds float16 posteriors per net, kind and Q (``net0_dense_Q256`` ...), ``targets``
    and ``paths``, from which every row can be recomputed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "results.md").write_text(report.eval_document(result))
    if result.posteriors is not None:
        kept = result.posteriors
        np.savez(out / "posteriors.npz", targets=kept.targets, paths=np.array(kept.paths),
                 **{k: v.astype(np.float16) for k, v in kept.arrays.items()})
    return out


# ---- command line -------------------------------------------------------------------------


def parse_protocols(text: str) -> list[str]:
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise argparse.ArgumentTypeError(f"unknown protocol {','.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(PROTOCOLS)} (comma-separated)")
    return protocols


def given_weights(args: argparse.Namespace) -> Any:
    """``args.weights``; a :class:`UserError` when neither --weights nor --checkpoint was given."""
    if not args.weights:
        raise UserError("give --weights SOURCE (or --checkpoint)")
    return args.weights


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate nets: dense, multi-crop, multi-scale, fusion (Sec. 3.2)")
    add_weights(p, repeat="fuse several nets (Table 6)")
    p.add_argument("--data", required=True, help="dataset root (holding val/ or test/) or a split folder")
    p.add_argument("--protocol", type=parse_protocols, default=list(DEFAULT_PROTOCOLS),
                   help=f"comma-separated, from {', '.join(PROTOCOLS)} (default: dense,multicrop,dense+multicrop)")
    p.add_argument("--scales", type=parse_scales, default=None,
                   help="test scales Q, e.g. 256,384,512 (default: from each net's training scale, else "
                        "256,384,512 scaled by crop/224)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not average in mirrored images")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    add_workers(p)
    add_device(p)
    add_precision(p)
    p.add_argument("--decode", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where JPEGs are decoded: auto (the GPU when evaluating on CUDA), cpu, gpu")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate only N images (class-balanced, deterministic)")
    p.add_argument("--out", type=output_dir, default=None,
                   help="write results.json, results.md and posteriors.npz in this folder")
    p.add_argument("--over-data-classes", action="store_true",
                   help="a net of more classes than the data's (ImageNet's 1000 on Imagenette): count errors over the "
                        "data's classes only, not the net's full softmax")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object, last")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    """``eval``; under ``torchrun`` the processes share the images and the first writes and prints."""
    with sharding.process_group(args.device) as procs:
        result = evaluate(
            given_weights(args), args.data, protocols=args.protocol, scales=args.scales, flip=args.flip,
            batch_size=args.batch_size, device=args.device, precision=args.precision, workers=args.workers,
            limit=args.limit, progress=args.progress, keep_posteriors=args.out is not None, decode=args.decode,
            weights_dir=args.weights_dir, over_data_classes=args.over_data_classes,
        )
    if not procs.main:
        return
    if args.out:
        write_outputs(result, args.out)
    print(report.eval_markdown(result))
    print(f"\n{result.images} images, {len(result.skipped)} skipped, {result.timing.seconds:.1f} s "
          f"on {result.device} ({result.precision}); errors {result.scored}")
    if args.json:
        print(json.dumps(result.to_dict()))
