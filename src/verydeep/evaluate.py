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

Errors are fractions. Top-k ties: an image counts as correct at k when fewer than k classes have
a posterior *strictly* greater than the true class's (ties are resolved in the true class's favour,
so a row of equal scores is correct at top-1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from verydeep import configs
from verydeep.checkpoint import load_model
from verydeep.metrics import per_class_accuracy, topk_correct, topk_error  # noqa: F401
from verydeep.model import VGG, DenseVGG
from verydeep.runtime import autocast, autocast_dtype, keep_freed_memory, pick_device, prepare

#: Protocols a user can ask for; ``dense+multicrop`` is the combination of Table 5.
PROTOCOLS = ("dense", "multicrop", "dense+multicrop", "center")
DEFAULT_PROTOCOLS = ("dense", "multicrop", "dense+multicrop")
PROTOCOL_LABELS = {
    "dense": "dense",
    "multicrop": "multi-crop",
    "dense+multicrop": "multi-crop & dense",
    "center": "centre crop",
}

#: Multi-crop forwards take as many crops as keep the first conv's output under this many elements:
#: 128 crops of 224 for a full-width net (1.6 GB in fp32), thousands of small crops of a narrow one.
ACTIVATION_BUDGET = 128 * 224 * 224 * 64

#: The paper's ILSVRC-2012 validation errors in % (top-1, top-5), PAPER.md section 5. Keys:
#: (configuration, training scale) with the scale "256", "384" or "[256;512]"; Table 5 adds the
#: protocol; Table 6 keys on the fused nets and the protocol.
PAPER_RESULTS: dict[str, dict[tuple, tuple[float, float]]] = {
    "Table 3": {  # single test scale: Q = S for fixed S, Q = 384 for S in [256; 512]
        ("A", "256"): (29.6, 10.4),
        ("A-LRN", "256"): (29.7, 10.5),
        ("B", "256"): (28.7, 9.9),
        ("C", "256"): (28.1, 9.4),
        ("C", "384"): (28.1, 9.3),
        ("C", "[256;512]"): (27.3, 8.8),
        ("D", "256"): (27.0, 8.8),
        ("D", "384"): (26.8, 8.7),
        ("D", "[256;512]"): (25.6, 8.1),
        ("E", "256"): (27.3, 9.0),
        ("E", "384"): (26.9, 8.7),
        ("E", "[256;512]"): (25.5, 8.0),
    },
    "Table 4": {  # dense, multi-scale: Q = {S-32, S, S+32} or {256, 384, 512}
        ("B", "256"): (28.2, 9.6),
        ("C", "256"): (27.7, 9.2),
        ("C", "384"): (27.8, 9.2),
        ("C", "[256;512]"): (26.3, 8.2),
        ("D", "256"): (26.6, 8.6),
        ("D", "384"): (26.5, 8.6),
        ("D", "[256;512]"): (24.8, 7.5),
        ("E", "256"): (26.9, 8.7),
        ("E", "384"): (26.7, 8.6),
        ("E", "[256;512]"): (24.8, 7.5),
    },
    "Table 5": {  # S in [256; 512], Q = {256, 384, 512}
        ("D", "[256;512]", "dense"): (24.8, 7.5),
        ("D", "[256;512]", "multicrop"): (24.6, 7.5),
        ("D", "[256;512]", "dense+multicrop"): (24.4, 7.2),
        ("E", "[256;512]", "dense"): (24.8, 7.5),
        ("E", "[256;512]", "multicrop"): (24.6, 7.4),
        ("E", "[256;512]", "dense+multicrop"): (24.4, 7.1),
    },
    "Table 6": {  # fusion of D and E, both S in [256; 512], Q = {256, 384, 512}
        (("D", "[256;512]"), ("E", "[256;512]"), "dense"): (24.0, 7.1),
        (("D", "[256;512]"), ("E", "[256;512]"), "multicrop"): (23.9, 7.2),
        (("D", "[256;512]"), ("E", "[256;512]"), "dense+multicrop"): (23.7, 6.8),
    },
}


# ---- scales -------------------------------------------------------------------------------


def train_scale(recipe: dict[str, Any]) -> tuple[int, int]:
    """(Smin, Smax) of a recipe; equal for a fixed training scale."""
    scale = recipe.get("scale")
    if scale is None:
        raise ValueError("recipe has no training scale ('scale'); give --scales")
    smin, smax = (scale, scale) if isinstance(scale, int) else (int(scale[0]), int(scale[-1]))
    return smin, smax


def scale_text(smin: int, smax: int) -> str:
    """A training scale as the paper's tables print it: ``256`` or ``[256;512]``."""
    return str(smin) if smin == smax else f"[{smin};{smax}]"


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
    from verydeep.data import grid_crops

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


# ---- nets and data ------------------------------------------------------------------------


@dataclass
class Net:
    """A checkpoint ready to evaluate: model, recipe, its crop and test scales."""

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

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "model": self.config + ("-BN" if self.recipe.get("batch_norm") else ""),
            "config": self.config,
            "batch_norm": bool(self.recipe.get("batch_norm", False)),
            "width": self.recipe.get("width"),
            "crop": self.crop,
            "train_scale": list(self.scale) if self.scale else None,
            "scales": self.scales,
        }


def load_nets(checkpoints: Sequence[str | Path], scales: Sequence[int] | None, data_dir: Path,
              device: torch.device) -> list[Net]:
    """Load each checkpoint with its own crop and scales (given ``scales`` override the recipe's)."""
    from verydeep.data import Preprocess, load_preprocess

    if not checkpoints:
        raise ValueError("give at least one --checkpoint")
    nets: list[Net] = []
    for path in checkpoints:
        model, recipe = load_model(path)
        crop = model.input_size
        net_scales = sorted(set(scales)) if scales else derive_scales(recipe)
        small = [q for q in net_scales if q < crop]
        if small:
            raise ValueError(f"--scales {small} smaller than the crop {crop} of {path}")
        pre = Preprocess.from_dict(recipe["preprocess"]) if recipe.get("preprocess") else load_preprocess(data_dir)
        bn = "-BN" if recipe.get("batch_norm") else ""
        name = f"{configs.canonical(recipe['config'])}{bn}"
        if recipe.get("scale") is not None:
            name += f" S={scale_text(*train_scale(recipe))}"
        nets.append(Net(name, str(path), prepare(model, device).eval(), recipe, net_scales, pre))
    names = [n.name for n in nets]
    for i, net in enumerate(nets):  # make duplicate names unique
        if names.count(net.name) > 1:
            net.name = f"{net.name} #{names[: i + 1].count(net.name)}"
    return nets


def check_classes(nets: Sequence[Net], classes: list[str]) -> None:
    """Every net must predict the dataset's classes, in the same order."""
    for net in nets:
        recipe_classes = net.recipe.get("classes")
        if recipe_classes is not None and list(recipe_classes) != list(classes):
            raise ValueError(
                f"{net.checkpoint}: its classes ({len(recipe_classes)}: {', '.join(recipe_classes[:3])}...) "
                f"differ from the data's ({len(classes)}: {', '.join(classes[:3])}...)"
            )
        if net.model.num_classes != len(classes):
            raise ValueError(f"{net.checkpoint}: predicts {net.model.num_classes} classes; the data has {len(classes)}")
    if len(nets) > 1 and any(n.recipe.get("classes") is None for n in nets):
        raise ValueError("fusion needs every checkpoint's recipe to list its classes")


# ---- computing the posteriors -------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One sweep over the data: whole images rescaled to ``q`` (``crop`` 0), or centre crops of ``crop``."""

    q: int
    crop: int = 0

    def transform(self) -> Any:
        from verydeep.data import CenterCropTransform, RescaleTransform

        return CenterCropTransform(self.q, self.crop) if self.crop else RescaleTransform(self.q)

    def label(self) -> str:
        return f"centre {self.q}/{self.crop}" if self.crop else f"Q={self.q}"


def plan_passes(nets: Sequence[Net], protocols: Sequence[str]) -> dict[Pass, list[tuple[int, list[str]]]]:
    """Which nets compute which kinds of posterior on each sweep: images are decoded once per Q."""
    kinds = [k for k in ("dense", "multicrop") if k in protocols or "dense+multicrop" in protocols]
    passes: dict[Pass, list[tuple[int, list[str]]]] = {}
    for i, net in enumerate(nets):
        if kinds:
            for q in net.scales:
                passes.setdefault(Pass(q), []).append((i, kinds))
        if "center" in protocols:
            passes.setdefault(Pass(center_resize(net.crop), net.crop), []).append((i, ["center"]))
    return dict(sorted(passes.items(), key=lambda item: (item[0].crop, item[0].q)))


@torch.inference_mode()
def compute_posteriors(
    nets: Sequence[Net],
    dataset: Any,
    passes: dict[Pass, list[tuple[int, list[str]]]],
    device: torch.device,
    dtype: torch.dtype | None,
    flip: bool,
    batch_size: int,
    workers: int,
    progress: bool,
) -> tuple[dict[tuple[int, str, int], Tensor], set[str], list[dict[str, Any]]]:
    """Posteriors (N, classes) per (net index, kind, Q), NaN rows for unreadable images; skipped paths; timings."""
    from torch.utils.data import DataLoader

    from verydeep.data import SizeGroupedBatchSampler, collate, to_input

    n = len(dataset)
    posteriors = {
        (i, kind, p.q): torch.full((n, nets[i].model.num_classes), float("nan"))
        for p, users in passes.items()
        for i, kinds in users
        for kind in kinds
    }
    paths = [str(path) for path, _ in dataset.samples]
    skipped: set[str] = set()
    timings = []
    bar = tqdm(total=n * len(passes), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for sweep, users in passes.items():
        bar.set_description(f"eval {sweep.label()}")
        dataset.transform = sweep.transform()
        if sweep.crop:
            batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        else:
            batches = SizeGroupedBatchSampler(dataset, sweep.q, batch_size).batches
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                            pin_memory=device.type == "cuda")
        start = time.perf_counter()
        for indices, batch in zip(batches, loader, strict=True):
            skipped.update(batch.skipped)
            bad = set(batch.skipped)
            good = torch.tensor([i for i in indices if paths[i] not in bad], dtype=torch.long)
            bar.update(len(indices))
            if not len(good):
                continue
            images = batch.images.to(device, non_blocking=True)
            for i, kinds in users:
                net = nets[i]
                x = to_input(images, net.preprocess).contiguous(memory_format=torch.channels_last)
                with autocast(device, dtype):
                    for kind in kinds:
                        if kind == "dense":
                            out = dense_posteriors(net.dense, x, flip)
                        elif kind == "multicrop":
                            out = multicrop_posteriors(net.model, x, net.crop, flip=flip)
                        else:
                            out = net.model(x).float().softmax(dim=1)
                        posteriors[i, kind, sweep.q][good] = out.cpu()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        timings.append({"pass": sweep.label(), "nets": [nets[i].name for i, _ in users],
                        "kinds": sorted({k for _, kinds in users for k in kinds}),
                        "seconds": round(seconds, 3), "seconds_per_image": round(seconds / n, 6)})
    bar.close()
    return posteriors, skipped, timings


# ---- rows ---------------------------------------------------------------------------------


def scales_label(scales: Sequence[int]) -> str:
    return str(scales[0]) if len(scales) == 1 else "{" + ",".join(map(str, scales)) + "}"


def derive_rows(
    nets: Sequence[Net], posteriors: dict[tuple[int, str, int], Tensor], protocols: Sequence[str]
) -> list[tuple[dict[str, Any], Tensor]]:
    """Every reported row as (description, posteriors), by averaging the computed posteriors.

    Per net: dense and multi-crop at each Q, their multi-scale averages, dense+multi-crop, centre
    crop; then, with several nets, the fusion of their full posteriors for each protocol.
    """
    rows: list[tuple[dict[str, Any], Tensor]] = []
    full: dict[tuple[int, str], Tensor] = {}

    def add(name: str, protocol: str, scales: Sequence[int], members: Sequence[Net], post: Tensor) -> None:
        meta = {"name": name, "protocol": protocol, "scales": sorted(scales), "nets": [m.name for m in members],
                "multi_scale": len(scales) > 1, "fusion": len(members) > 1}
        rows.append((meta, post))

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


def paper_figures(row: dict[str, Any], nets: Sequence[Net]) -> dict[str, Any] | None:
    """The paper's published errors (fractions) for a row of an ImageNet-sized run, when it reports one."""
    members = [n for n in nets if n.name in row["nets"]]
    if any(n.model.num_classes != 1000 or n.crop != 224 or n.scale is None for n in members):
        return None
    keys = [(n.config, scale_text(*n.scale)) for n in members]

    def paper_scales(net: Net) -> list[int]:
        smin, smax = net.scale
        return [smin - 32, smin, smin + 32] if smin == smax else [256, 384, 512]

    if any(row["multi_scale"] and row["scales"] != paper_scales(n) for n in members):
        return None
    protocol = row["protocol"]
    table, key = None, None
    if row["fusion"]:
        table, key = "Table 6", (*sorted(keys), protocol)
    elif protocol == "dense" and not row["multi_scale"]:
        smin, smax = members[0].scale
        if row["scales"] == [smin if smin == smax else 384]:
            table, key = "Table 3", keys[0]
    elif protocol == "dense":
        table, key = "Table 4", keys[0]
    elif row["multi_scale"] and protocol in ("multicrop", "dense+multicrop"):
        table, key = "Table 5", (*keys[0], protocol)
    if table is None or key not in PAPER_RESULTS[table]:
        return None
    top1, top5 = PAPER_RESULTS[table][key]
    return {"table": table, "top1_error": top1 / 100, "top5_error": top5 / 100}


def main_row(rows: Sequence[dict[str, Any]], protocols: Sequence[str]) -> dict[str, Any]:
    """The headline row: the fullest protocol asked for, fused over all nets when there are several."""
    best = next(p for p in ("dense+multicrop", "multicrop", "dense", "center") if p in protocols)
    candidates = [r for r in rows if r["protocol"] == best]
    return max(candidates, key=lambda r: (r["fusion"], len(r["scales"])))


# ---- the whole evaluation -----------------------------------------------------------------


def default_workers() -> int:
    """DataLoader workers: half the cores (the other half runs the network), at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def evaluate(
    checkpoints: Sequence[str | Path],
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
) -> dict[str, Any]:
    """Evaluate checkpoints on a labelled split with the protocols of Sec. 3.2; a JSON-able result.

    ``data`` is a dataset root (its ``val/`` or ``test/``) or a split folder. Each checkpoint
    uses its own crop and test scales (``scales``, else derived from its recipe, see
    :func:`derive_scales`); several checkpoints are also fused. ``limit`` takes a class-balanced,
    deterministic subset. The result holds ``rows`` (name, protocol, scales, nets, top1_error,
    top5_error as fractions, images, and ``paper`` figures where the paper reports the row), the
    ``main`` row's per-class accuracy, the classes, the nets and timings; with
    ``keep_posteriors`` also ``posteriors`` (numpy arrays per net, kind and Q, not JSON-able).
    """
    from verydeep.data import balanced_subset, find_split, open_split

    protocols = list(dict.fromkeys(protocols))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"--protocol {','.join(unknown) or '(none)'}: choose from {', '.join(PROTOCOLS)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {batch_size}")
    if scales is not None and any(q <= 0 for q in scales):
        raise ValueError(f"--scales must be positive; got {list(scales)}")
    started = time.perf_counter()
    split = find_split(data, "val")
    torch_device = pick_device(device)
    if torch_device.type == "cpu":
        keep_freed_memory()  # no fresh pages for every batch's activations
    dtype = autocast_dtype(torch_device, precision)
    nets = load_nets(checkpoints, scales, split, torch_device)
    dataset = open_split(split, lambda path: None)
    check_classes(nets, dataset.classes)
    dataset.samples = [dataset.samples[i] for i in balanced_subset(dataset.targets, limit)]
    targets = torch.tensor(dataset.targets, dtype=torch.long)

    passes = plan_passes(nets, protocols)
    posteriors, skipped, timings = compute_posteriors(
        nets, dataset, passes, torch_device, dtype, flip, batch_size,
        default_workers() if workers is None else workers, progress,
    )
    valid = torch.ones(len(dataset), dtype=torch.bool)
    for post in posteriors.values():
        valid &= post.isfinite().all(dim=1)
    if not valid.any():
        raise ValueError(f"{split}: no image could be read")

    rows = []
    main_posteriors: dict[str, Tensor] = {}
    for meta, post in derive_rows(nets, posteriors, protocols):
        p, t = post[valid], targets[valid]
        meta.update(top1_error=topk_error(p, t, 1), top5_error=topk_error(p, t, 5), images=int(valid.sum()))
        paper = paper_figures(meta, nets)
        if paper:
            meta["paper"] = paper
        rows.append(meta)
        main_posteriors[meta["name"]] = p
    main = main_row(rows, protocols)
    classes = list(dataset.classes)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "data": str(split),
        "images": int(valid.sum()),
        "skipped": sorted(skipped),
        "classes": classes,
        "class_names": list(dataset.class_names),
        "nets": [net.describe() for net in nets],
        "protocols": protocols,
        "flip": flip,
        "device": str(torch_device),
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "imagenet_sized": all(n.model.num_classes == 1000 and n.crop == 224 for n in nets),
        "rows": rows,
        "main": main["name"],
        "per_class_accuracy": dict(zip(
            classes, per_class_accuracy(main_posteriors[main["name"]], targets[valid], len(classes)), strict=True
        )),
        "timing": {"seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(dataset), 6),
                   "passes": timings},
    }
    if keep_posteriors:
        result["posteriors"] = {
            f"net{i}_{kind}_Q{q}": post.numpy() for (i, kind, q), post in posteriors.items()
        }
        result["targets"] = targets.numpy()
        result["paths"] = [str(path) for path, _ in dataset.samples]
    return result


# ---- tables -------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """Every row as one markdown table (errors in %), with the paper's figures beside ours when it has them."""
    paper = any("paper" in r for r in result["rows"])
    head = "| row | nets | protocol | test scale Q | top-1 err % | top-5 err % | images |"
    rule = "|---|---|---|---|---:|---:|---:|"
    if paper:
        head += " paper top-1 | paper top-5 |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in result["rows"]:
        line = (f"| {r['name']} | {' + '.join(r['nets'])} | {PROTOCOL_LABELS[r['protocol']]} | "
                f"{scales_label(r['scales'])} | {_pct(r['top1_error'])} | {_pct(r['top5_error'])} | {r['images']} |")
        if paper:
            p = r.get("paper", {})
            line += f" {_pct(p.get('top1_error'))} | {_pct(p.get('top5_error'))} |"
        lines.append(line)
    return "\n".join(lines)


def _train_label(net: dict[str, Any]) -> str:
    return "" if net["train_scale"] is None else scale_text(*net["train_scale"])


def _model_label(net: dict[str, Any], nets: dict[str, dict[str, Any]]) -> str:
    """The configuration (``D``, ``A-BN``), or the net's full name when two nets share it."""
    twins = [n for n in nets.values() if (n["model"], n["train_scale"]) == (net["model"], net["train_scale"])]
    return net["name"] if len(twins) > 1 else net["model"]


def _error_cells(row: dict[str, Any], paper: bool) -> str:
    cells = f" {_pct(row['top1_error'])} | {_pct(row['top5_error'])} |"
    if paper:
        p = row.get("paper", {})
        cells += f" {_pct(p.get('top1_error'))} | {_pct(p.get('top5_error'))} |"
    return cells


def paper_tables(result: dict[str, Any]) -> str:
    """The rows in the layout of the paper's Tables 3 (single scale), 4 (multi-scale), 5 (methods), 6 (fusion)."""
    nets = {n["name"]: n for n in result["nets"]}
    rows = result["rows"]
    paper = any("paper" in r for r in rows)
    err_head = " top-1 val. error (%) | top-5 val. error (%) |" + (" paper top-1 | paper top-5 |" if paper else "")
    err_rule = "---:|---:|" + ("---:|---:|" if paper else "")
    sections = []

    def single_net_table(title: str, chosen: list[dict[str, Any]]) -> None:
        lines = [f"### {title}", "", "| ConvNet config. | train (S) | test (Q) |" + err_head,
                 "|---|---|---|" + err_rule]
        for r in chosen:
            net = nets[r["nets"][0]]
            lines.append(f"| {_model_label(net, nets)} | {_train_label(net)} | {scales_label(r['scales'])} |"
                         + _error_cells(r, paper))
        sections.append("\n".join(lines if chosen else [*lines[:2], "(no such rows in this run)"]))

    single = [r for r in rows if not r["fusion"]]
    single_net_table("Table 3: single test scale (dense)",
                     [r for r in single if r["protocol"] == "dense" and not r["multi_scale"]])
    single_net_table("Table 4: multiple test scales (dense)",
                     [r for r in single if r["protocol"] == "dense" and r["multi_scale"]])
    methods = [r for r in single if r["protocol"] == "center" or r["scales"] == nets[r["nets"][0]]["scales"]]
    lines = ["### Table 5: dense vs multi-crop vs both", "",
             "| ConvNet config. | evaluation method | test (Q) |" + err_head, "|---|---|---|" + err_rule]
    for r in methods:
        net = nets[r["nets"][0]]
        label = _model_label(net, nets) + (f" (S={_train_label(net)})" if _train_label(net) else "")
        lines.append(f"| {label} | {PROTOCOL_LABELS[r['protocol']]} | {scales_label(r['scales'])} |"
                     + _error_cells(r, paper))
    sections.append("\n".join(lines if methods else [*lines[:2], "(no such rows in this run)"]))
    fused = [r for r in rows if r["fusion"]]
    lines = ["### Table 6: multiple ConvNet fusion", "", "| combined ConvNet models | evaluation method |" + err_head,
             "|---|---|" + err_rule]
    for r in fused:
        lines.append(f"| {' + '.join(r['nets'])} | {PROTOCOL_LABELS[r['protocol']]} |" + _error_cells(r, paper))
    sections.append("\n".join(lines if fused else [*lines[:2], "(one net: no fusion rows)"]))
    return "\n\n".join(sections)


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> Path:
    """``results.json``, ``results.md`` (the four tables and every row) and ``posteriors.npz`` in ``out_dir``.

    The npz holds float16 posteriors per net, kind and Q (``net0_dense_Q256`` ...), ``targets``
    and ``paths``, from which every row can be recomputed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = result.get("posteriors", {})
    public = {k: v for k, v in result.items() if k not in ("posteriors", "targets", "paths")}
    (out / "results.json").write_text(json.dumps(public, indent=2) + "\n")
    (out / "results.md").write_text(f"# Evaluation of {public['data']}\n\n{paper_tables(public)}\n\n"
                                    f"### All rows\n\n{format_table(public)}\n")
    if arrays:
        np.savez(out / "posteriors.npz", targets=result["targets"], paths=np.array(result["paths"]),
                 **{k: v.astype(np.float16) for k, v in arrays.items()})
    return out


# ---- command line -------------------------------------------------------------------------


def parse_scales(text: str) -> list[int]:
    """``256,384,512`` -> [256, 384, 512]; a bad list is a one-line error."""
    try:
        scales = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 256,384,512; got {text!r}"
        ) from None
    if not scales or any(q <= 0 for q in scales):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 256,384,512; got {text!r}")
    return scales


def parse_protocols(text: str) -> list[str]:
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise argparse.ArgumentTypeError(f"unknown protocol {','.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(PROTOCOLS)} (comma-separated)")
    return protocols


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate checkpoints: dense, multi-crop, multi-scale, fusion (Sec. 3.2)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="checkpoint, .safetensors or run directory; repeat to fuse several nets")
    p.add_argument("--data", required=True, help="dataset root (holding val/ or test/) or a split folder")
    p.add_argument("--protocol", type=parse_protocols, default=list(DEFAULT_PROTOCOLS),
                   help=f"comma-separated, from {', '.join(PROTOCOLS)} (default: dense,multicrop,dense+multicrop)")
    p.add_argument("--scales", type=parse_scales, default=None,
                   help="test scales Q, e.g. 256,384,512 (default: from each checkpoint's training scale)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not average in mirrored images")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--workers", type=int, default=None, help="data loading processes (default: half the cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--limit", type=int, default=None, help="evaluate only N images (class-balanced, deterministic)")
    p.add_argument("--out", default=None, help="write results.json, results.md and posteriors.npz here")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object, last")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_cli)
    p.error = one_line_error(p)  # type: ignore[method-assign]


def one_line_error(parser: argparse.ArgumentParser) -> Any:
    """A parser ``error`` that prints one line (no usage block) and exits with status 2."""

    def error(message: str) -> None:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    return error


def run_cli(args: argparse.Namespace) -> None:
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be 0 or more; got {args.workers}")
    result = evaluate(
        args.checkpoint, args.data, protocols=args.protocol, scales=args.scales, flip=args.flip,
        batch_size=args.batch_size, device=args.device, precision=args.precision, workers=args.workers,
        limit=args.limit, progress=args.progress, keep_posteriors=args.out is not None,
    )
    if args.out:
        write_outputs(result, args.out)
    public = {k: v for k, v in result.items() if k not in ("posteriors", "targets", "paths")}
    print(paper_tables(public))
    print()
    print(format_table(public))
    print(f"\n{public['images']} images, {len(public['skipped'])} skipped, {public['timing']['seconds']:.1f} s "
          f"on {public['device']} ({public['precision']})")
    if args.json:
        print(json.dumps(public))
