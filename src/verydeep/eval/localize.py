"""Localisation (Appendix A): nets that regress an object's box, and the ILSVRC localisation error.

The net is a classification net whose last FC layer predicts a box (centre x, centre y, width,
height, in units of the crop side: :func:`verydeep.data.boxes.encode`): one box for all classes
(single-class regression, SCR, 4 outputs) or one per class (per-class regression, PCR, 4 per
class). :class:`Localisation` is its :class:`~verydeep.nn.tasks.Task`: a Euclidean loss on the
ground-truth class's box, trained by :mod:`verydeep.train` from a classification net (the last
layer random), and validated by the localisation error of protocol 1.

- Protocol 1 (Table 8): the box of the central crop, for the ground-truth class; an image is
  wrong when its box has IoU <= 0.5 with every ground-truth box.
- Protocol 2 (Table 9): the net applied densely to the whole image at one or more scales, a box
  per location (and class) for each of a classification net's top classes, scored by that net's
  posterior of the class at the box's location, merged greedily as in OverFeat (scores summed),
  the best-scored box kept; an image is wrong unless one of its top-5 (class, box) predictions has
  the right class and IoU > 0.5 with one of that class's boxes. Several nets: the union of their
  boxes is merged. Images of the same size go through the nets in batches.

Both protocols also score two boxes that ignore the image: the whole image, and the mean training
box (the centre prior); in protocol 2 each is paired with the classifier's top-5 classes.
``localize train`` records the boxes it read in the run's ``recipe.json`` (``boxes``), which
``localize eval`` reads when neither ``--boxes`` nor ``DATA/boxes.txt`` is there.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from verydeep import runtime
from verydeep.cli import add_device, add_workers, output_dir, positive_int, test_scale
from verydeep.data import Batch, CenterCropTransform, Preprocess, RescaleTransform, balanced_subset, collate, to_input
from verydeep.data.boxes import decode, encode, from_crop, iou, match_boxes, read_boxes, with_boxes
from verydeep.data.datasets import DECODE_ERRORS, LabelledImages, Transform, unreadable
from verydeep.data.decode import ImageFile
from verydeep.data.loaders import image_loader
from verydeep.data.transforms import CropPlan, render
from verydeep.errors import MissingFileError, UserError
from verydeep.eval.classmap import columns_of
from verydeep.eval.evaluate import train_scale
from verydeep.io.sources import load
from verydeep.nn.tasks import Task
from verydeep.paper.figures import TABLE_8, TABLE_9, TABLE_9_FUSION, BoxRegression, LocalisationScales, ValTest
from verydeep.paper.report import Column, Row, Table, scales_label
from verydeep.runtime import sharding
from verydeep.train import train
from verydeep.train.recipe import add_flags, make_config, settings_from_flags, stored_settings

#: Heads of Appendix A: single-class and per-class regression.
HEADS = ("scr", "pcr")

#: What FC8 regresses: the box code standardised by the training boxes' mean and deviation, or the
#: raw code (the paper's literal Euclidean loss; at small scale the net then barely leaves the mean box).
TARGETS = ("standardised", "raw")

#: A box is right when its IoU with a ground-truth box is above this (the ILSVRC criterion).
IOU_RIGHT = 0.5


# ---- scoring ---------------------------------------------------------------------------------


def wrong(predicted: Tensor, truth: Tensor) -> Tensor:
    """Per image, whether box ``predicted`` (N, 4) has IoU <= 0.5 with every box of ``truth`` (N, M, 4),
    rows of NaN being padding."""
    valid = ~truth.isnan().any(-1)
    boxes = truth.float().nan_to_num(0)
    overlaps = torch.stack([iou(p[None], t)[0] for p, t in zip(predicted.float(), boxes, strict=True)])
    return ~((overlaps > IOU_RIGHT) & valid).any(dim=1)


def ilsvrc_wrong(predictions: Sequence[tuple[int, Tensor]], truth: Sequence[tuple[int, Tensor]]) -> bool:
    """The ILSVRC localisation criterion: wrong unless one of the top-5 ``(class, box)`` predictions
    has the class of a ground-truth ``(class, box)`` and IoU > 0.5 with its box."""
    return not any(label == true_label and float(iou(box[None], true_box[None])) > IOU_RIGHT
                   for label, box in predictions[:5] for true_label, true_box in truth)


def merge_greedily(boxes: Tensor, scores: Tensor, threshold: float = IOU_RIGHT) -> tuple[Tensor, Tensor]:
    """OverFeat's greedy merge (Sermanet et al., 2014), as Appendix A uses it: while the two closest
    boxes (the highest IoU) overlap by at least ``threshold``, replace them by the average of their
    coordinates, scored by the sum of their scores. Returns the boxes and scores, best first."""
    boxes, scores = boxes.float().clone(), scores.float().clone()
    while len(boxes) > 1:
        overlaps = iou(boxes, boxes).fill_diagonal_(-1.0)
        best = int(overlaps.argmax())
        i, j = divmod(best, len(boxes))
        if overlaps[i, j] < threshold:
            break
        keep = [k for k in range(len(boxes)) if k not in (i, j)]
        boxes = torch.cat([boxes[keep], ((boxes[i] + boxes[j]) / 2)[None]])
        scores = torch.cat([scores[keep], (scores[i] + scores[j])[None]])
    order = scores.argsort(descending=True)
    return boxes[order], scores[order]


# ---- the task --------------------------------------------------------------------------------


class Localisation(Task):
    """Appendix A's box regression: FC8 predicts (centre x, centre y, width, height) in crop sides,
    for one box (SCR) or one per class (PCR); Euclidean loss on the ground-truth class's box (the
    first of its boxes); validation: the localisation error (%) of the central crop (protocol 1).

    Targets are (N, M, 5): the image's class, then a box's corners in crop sides (NaN rows pad)."""

    metrics = ("loc_error",)
    higher_is_better = False

    def __init__(self, head: str = "pcr", boxes: str | Path | None = None, targets: str = "standardised",
                 code_mean: Sequence[float] | None = None, code_std: Sequence[float] | None = None) -> None:
        if head not in HEADS:
            raise UserError(f"--head {head}: one of {', '.join(HEADS)}")
        if targets not in TARGETS:
            raise UserError(f"--targets {targets}: one of {', '.join(TARGETS)}")
        self.head, self.boxes, self.target_kind = head, boxes, targets
        self.name = f"localisation-{head}"
        self.source: Path | None = None  # the boxes read, once open_splits has read them
        # FC8 predicts (code - mean) / std; the identity for raw codes (and for runs that predate this)
        self.code_mean = torch.tensor(code_mean or [0.0] * 4)
        self.code_std = torch.tensor(code_std or [1.0] * 4)
        self.fitted = code_mean is not None  # a trained net's standardisation is kept, never refitted

    def outputs(self, num_classes: int) -> int:
        return 4 if self.head == "scr" else 4 * num_classes

    def record(self) -> dict[str, Any]:
        """The boxes read (an absolute path), for ``localize eval`` to default to, and the box code's
        standardisation, which every reader of the net's outputs needs."""
        found = {"box_targets": self.target_kind, "box_code_mean": self.code_mean.tolist(),
                 "box_code_std": self.code_std.tolist()}
        return {**found, "boxes": str(self.source)} if self.source is not None else found

    def open_splits(self, data: str, train: Transform, val: Transform) -> tuple[LabelledImages, LabelledImages]:
        source = Path(self.boxes or Path(data) / "boxes.txt")
        table = read_boxes(source)
        self.source = source.absolute()
        train_set, val_set = super().open_splits(data, train, val)
        paths = [path for images in (train_set, val_set) for path, _ in images.samples]
        matched = match_boxes(table, dict.fromkeys(paths), Path(data))  # both splits: no name shared unseen
        train_set = with_boxes(train_set, matched, train)
        if self.target_kind == "standardised" and not self.fitted:  # from exactly the boxes trained on
            codes = encode(relative_boxes(train_set), 1.0)
            self.code_mean, self.code_std = codes.mean(dim=0), codes.std(dim=0).clamp(min=1e-3)
        return train_set, with_boxes(val_set, matched, val)

    def targets(self, batch: Batch, device: torch.device) -> Tensor:
        if batch.boxes is None:
            raise UserError("localisation needs images with boxes (a dataset opened by the task)")
        side = batch.images.shape[-1]
        labels = batch.labels[:, None, None].float().expand(-1, batch.boxes.shape[1], 1)
        return torch.cat([labels, batch.boxes / side], dim=2).to(device, non_blocking=True)

    def selected(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """The (N, 4) outputs for classes ``labels``: the one box of SCR, the class's box of PCR."""
        if self.head == "scr":
            return outputs[:, :4]
        return outputs.view(len(outputs), -1, 4)[torch.arange(len(outputs)), labels.long()]

    def codes(self, outputs: Tensor) -> Tensor:
        """Box codes (centre x, centre y, width, height in crop sides) of outputs (..., 4)."""
        return outputs * self.code_std.to(outputs.device) + self.code_mean.to(outputs.device)

    def predicted(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """The (N, 4) box codes for classes ``labels``."""
        return self.codes(self.selected(outputs, labels))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Euclidean loss between the outputs and the true box's code, standardised when so trained."""
        mean, std = self.code_mean.to(outputs.device), self.code_std.to(outputs.device)
        wanted = (encode(targets[:, 0, 1:], 1.0) - mean) / std
        return F.mse_loss(self.selected(outputs, targets[:, 0, 0]), wanted, reduction="sum")

    def metric_sums(self, outputs: Tensor, targets: Tensor) -> list[float]:
        boxes = decode(self.predicted(outputs, targets[:, 0, 0]), 1.0)
        return [100.0 * float(wrong(boxes, targets[:, :, 1:]).sum())]


def fixed_scale(recipe: dict[str, Any]) -> int:
    """The training scale S of a run (Smin when jittered): protocol 1's resize, protocol 2's default Q."""
    return train_scale(recipe)[0]


def task_of(recipe: dict[str, Any], boxes: str | Path | None = None) -> Localisation:
    """The localisation task a run was trained with (its recipe's ``task``)."""
    name = str(recipe.get("task", ""))
    if not name.startswith("localisation-"):
        raise UserError(f"not a localisation net (its task is {name or 'classification'}): train one with "
                        "verydeep localize train")
    return Localisation(name.removeprefix("localisation-"), boxes, recipe.get("box_targets", "raw"),
                        recipe.get("box_code_mean"), recipe.get("box_code_std"))


def boxes_source(boxes: str | Path | None, data: str | Path, recipes: Sequence[dict[str, Any]]) -> str | Path | None:
    """The boxes to evaluate on: ``--boxes`` when given, else ``DATA/boxes.txt`` when it exists, else
    the file the first of these runs recorded (``boxes`` in its recipe) if it still exists (None:
    ``DATA/boxes.txt``)."""
    if boxes is not None or (Path(data) / "boxes.txt").exists():
        return boxes
    recorded = (Path(recipe["boxes"]) for recipe in recipes if recipe.get("boxes"))
    return next((path for path in recorded if path.exists()), None)


# ---- protocol 1: the central crop, the ground-truth class (Table 8) -------------------------------


@dataclass
class CenterResult:
    """Protocol 1's localisation error (%) of a net, and of two boxes that ignore the image: the
    whole image, and the mean training box (relative to the image)."""

    checkpoint: str
    head: str
    images: int
    localisation_error: float
    whole_image_error: float
    centre_prior_error: float


def relative_boxes(images: LabelledImages) -> Tensor:
    """The first box of each :func:`~verydeep.data.boxes.with_boxes` image (N, 4), in units of its
    width and height (from the headers alone)."""
    boxes = images.transform.boxes
    sizes = images.image_sizes()
    relative = [torch.tensor(boxes[str(path)][0].corners) / torch.tensor([*size, *size])
                for (path, _), size in zip(images.samples, sizes, strict=True) if size is not None]
    if not relative:
        raise UserError("no readable training image with a box")
    return torch.stack(relative).float()


def mean_relative_box(images: LabelledImages) -> Tensor:
    """The mean first box of the images (the centre prior), in units of each image's width and height."""
    return relative_boxes(images).mean(dim=0)


def in_frames(relative: Tensor, frames: Tensor) -> Tensor:
    """A box relative to the image (units of its width and height) in each of ``frames`` (N, 4)."""
    origin, extent = frames[:, :2].repeat(1, 2), (frames[:, 2:] - frames[:, :2]).repeat(1, 2)
    return origin + relative[None] * extent


def loader(images: LabelledImages, limit: int | None, batch_size: int, workers: int) -> DataLoader:
    """The first ``limit`` images per class, round-robin (:func:`~verydeep.data.balanced_subset`), in batches;
    under ``torchrun`` this process's share of the batches (:func:`verydeep.runtime.sharding.shard`)."""
    indices = balanced_subset(images.targets, limit)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return image_loader(images, sharding.shard(batches), workers, collate)


@torch.no_grad()
def evaluate_center(checkpoint: str | Path, data: str | Path, boxes: str | Path | None = None,
                    limit: int | None = None, batch_size: int = 64, device: str = "auto",
                    workers: int = 0) -> CenterResult:
    """Protocol 1 on the validation split of ``data``: the trained scale S, its central crop."""
    dev = runtime.pick_device(device)
    net = load(checkpoint, device=dev)
    model, recipe = net.model, net.recipe
    task = task_of(recipe, boxes_source(boxes, data, [recipe]))
    transform = CenterCropTransform(fixed_scale(recipe), int(recipe["crop"]))
    train_set, val_set = task.open_splits(str(data), transform, transform)
    prior, pre = mean_relative_box(train_set), Preprocess.from_dict(recipe["preprocess"])
    wrong_counts, images = torch.zeros(3), 0
    for batch in loader(val_set, limit, batch_size, workers):
        if not len(batch.images):
            continue
        side = batch.images.shape[-1]
        outputs = model(to_input(batch.images.to(dev), pre)).float().cpu()
        guesses = [decode(task.predicted(outputs, batch.labels), side), batch.frames, in_frames(prior, batch.frames)]
        wrong_counts += torch.stack([wrong(guess, batch.boxes).sum() for guess in guesses])
        images += len(batch.images)
    *summed, total = sharding.total(torch.tensor([*wrong_counts.tolist(), images], dtype=torch.float64)).tolist()
    wrong_counts, images = torch.tensor(summed), int(total)
    if not images:
        raise UserError(f"{data}: no readable validation image with a box")
    errors = (100.0 * wrong_counts / images).tolist()
    return CenterResult(str(checkpoint), task.head, images, *errors)


def net_name(checkpoint: str | Path) -> str:
    """A net as tables name it: its run folder, or ``RUN/best.pt`` for one of its checkpoints."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def center_json(results: Sequence[CenterResult]) -> dict[str, Any]:
    """Protocol 1's JSON object: the first net's figures, and with several nets ``nets``, each net's."""
    first = dict(results[0].__dict__)
    return {**first, "nets": [result.__dict__ for result in results]} if len(results) > 1 else first


def table_8(results: Sequence[CenterResult], fine_tuned: Sequence[str]) -> Any:
    """Table 8's layout (protocol 1, error %) with the paper's figures beside each row."""

    several, rows = len(results) > 1, []
    for result, layers in zip(results, fine_tuned, strict=True):
        label = "FC1-FC2" if layers == "fc" else "all"
        paper = TABLE_8.get(BoxRegression(label, result.head.upper()))
        errors = (result.localisation_error, result.whole_image_error, result.centre_prior_error)
        cells = (*([net_name(result.checkpoint)] if several else []), label, result.head.upper(),
                 *(f"{error:.1f}" for error in errors))
        rows.append(Row(cells, (f"{paper:.1f}",) if paper is not None else None))
    columns = [*([Column("net")] if several else []), Column("fine-tuned"), Column("regression"),
               Column("error %", True), Column("whole image %", True), Column("centre prior %", True)]
    return Table("Table 8: localisation error, central crop, ground-truth class", columns, rows,
                 [Column("paper %", True)], paper_missing="-")


# ---- protocol 2: dense boxes, merged greedily, ranked by a classifier (Table 9) --------------------

#: Pixels between neighbouring locations of a dense net's output (five 2x2 poolings).
STRIDE = 32

#: Validation images read (and grouped by size into batches) at a time by :func:`evaluate_dense`.
WINDOW_BATCHES = 4


@dataclass
class Guess:
    """One (class, box) prediction of protocol 2: the class index, its box in pixels of the full
    image, the classifier's posterior of the class."""

    label: int
    box: Tensor
    score: float


def dense_boxes(dense: torch.nn.Module, x: Tensor, side: int, task: Localisation) -> Tensor:
    """Every location's boxes (N, K, h, w, 4) of a dense localisation net of ``task`` on inputs ``x``
    (N, 3, H, W), in pixels of ``x``: K = 1 (SCR) or one per class (PCR), (h, w) its output grid; a
    location sees the ``side`` square at its offset."""
    out = dense(x).float()
    groups, (h, w) = out.shape[1] // 4, out.shape[-2:]
    codes = task.codes(out.unflatten(1, (groups, 4)).permute(0, 1, 3, 4, 2))
    ys, xs = torch.meshgrid(torch.arange(h) * STRIDE, torch.arange(w) * STRIDE, indexing="ij")
    offsets = torch.stack([xs, ys, xs, ys], dim=-1).float().to(codes.device)
    return (decode(codes, side) + offsets).cpu()


def location_scores(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """The classifier's score (N, classes, h * w) of each location of a localisation net's (h, w) grid
    (Appendix A), from its per-location posteriors ``maps`` (N, classes, h', w'): the posterior at that
    location when the grids are the same, else (another crop or architecture, no location to match)
    the posterior averaged over the classifier's locations, the same for every location."""
    if tuple(maps.shape[-2:]) == tuple(grid):
        return maps.flatten(2).cpu()
    return maps.mean(dim=(2, 3))[..., None].expand(-1, -1, grid[0] * grid[1]).cpu()


@dataclass
class DenseOutput:
    """Protocol 2's raw outputs for one image: its ``top`` classes T by the classifier's posterior (mean
    over the scales) and those posteriors, and per localisation net its boxes (K, L, 4) in pixels of
    the full image, every location at every scale (K = 1, SCR, or one per top class, PCR), and their
    scores (T, L): the classifier's posterior of each top class at the box's location
    (:func:`location_scores`; an SCR box has one per class)."""

    labels: Tensor
    scores: Tensor
    boxes: list[Tensor]
    size: tuple[int, int]
    box_scores: list[Tensor]


def pooled(boxes: Sequence[Tensor], scores: Sequence[Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """The union of several nets' boxes (Appendix A) for the ``rank``-th class of a :class:`DenseOutput`,
    and their scores for that class: an SCR net's one set, a PCR net's set of that class."""
    union = torch.cat([found[rank if len(found) > 1 else 0] for found in boxes])
    return union, torch.cat([found[rank] for found in scores])


def inside(boxes: Tensor, scores: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``boxes`` (n, 4) clipped to an image of ``size`` (w, h), those left with no area dropped (with
    their ``scores``); the whole image when none is left."""
    w, h = size
    clipped = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                           boxes[:, 3].clamp(0, h)], dim=1)
    kept = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not kept.any():
        return torch.tensor([[0.0, 0.0, w, h]]), scores.new_zeros(1)
    return clipped[kept], scores[kept]


def ranked(output: DenseOutput, nets: Sequence[int] | None = None) -> list[Guess]:
    """The (class, box) guesses of an image, best class first (Appendix A): each top class's boxes pooled
    over the localisation nets ``nets`` (default all), clipped to the image (:func:`inside`), each scored
    by the classifier's posterior of the class at its location, merged greedily (scores summed), the
    best-scored merged box kept."""
    chosen = range(len(output.boxes)) if nets is None else nets
    boxes, scores = [output.boxes[i] for i in chosen], [output.box_scores[i] for i in chosen]
    guesses = []
    for rank, (label, score) in enumerate(zip(output.labels.tolist(), output.scores.tolist(), strict=True)):
        found = inside(*pooled(boxes, scores, rank), output.size)
        guesses.append(Guess(label, merge_greedily(*found)[0][0], score))
    return guesses


@dataclass
class DenseNets:
    """Localisation nets and the classification net that ranks their classes, in dense form."""

    locate: list[torch.nn.Module]
    classify: torch.nn.Module
    recipes: list[dict[str, Any]]  # the localisation nets'
    classifier_recipe: dict[str, Any]
    device: torch.device
    columns: list[int] | None = None  # the classifier's outputs of the nets' classes (None: the same classes)
    tasks: list[Localisation] = field(init=False)  # each net's, read from its recipe once (it checks the recipe)

    def __post_init__(self) -> None:
        self.tasks = [task_of(recipe) for recipe in self.recipes]

    @classmethod
    def load(cls, checkpoints: str | Path | Sequence[str | Path], classifier: str | Path,
             device: str = "auto") -> DenseNets:
        """The localisation nets of ``checkpoints`` and the classifier: any source of weights (a run, or
        published weights such as ``vgg16``), whose classes are matched to the nets' by synset or name."""
        dev = runtime.pick_device(device)
        paths = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
        loaded = [(net.model, net.recipe) for net in (load(checkpoint, device=dev) for checkpoint in paths)]
        for checkpoint, (_, recipe) in zip(paths, loaded, strict=True):
            task_of(recipe)  # a one-line error for a net that is not a localisation net, before the classes
            if list(recipe.get("classes") or []) != list(loaded[0][1].get("classes") or []):
                raise UserError(f"{checkpoint}: its classes are not those of {paths[0]}")
        published = load(classifier, device=dev)
        cls_recipe = published.recipe
        if str(cls_recipe.get("task", "")).startswith("localisation") or not published.has_fc_layers:
            raise UserError(f"--classifier {classifier}: not a classification net (a localisation net, or weights "
                            "without FC layers); give the net that ranks the classes")
        columns = classifier_columns(cls_recipe, loaded[0][1], classifier)
        return cls([model.dense() for model, _ in loaded], published.model.dense(),
                   [r for _, r in loaded], cls_recipe, dev, columns)

    def check_scales(self, scales: Sequence[int]) -> None:
        """Every test scale Q at least every net's crop (a dense net needs one window); else a :class:`UserError`."""
        crops = [int(r["crop"]) for r in (*self.recipes, self.classifier_recipe)]
        if min(scales) < max(crops):
            raise UserError(f"--scales {min(scales)} is smaller than the nets' crop {max(crops)}: a dense net needs "
                            "a whole window")

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Uint8 images (N, 3, H, W) -> each localisation net's boxes (N, K, L, 4) in their pixels and their
        scores (N, classes, L) (:func:`location_scores`: the classifier's posterior at each location of
        its dense class-score map, or its spatial mean where the grids differ), and the classifier's
        posteriors (N, classes) (:func:`~verydeep.eval.evaluate.dense_posteriors`, no flip), on the CPU."""
        images = images.to(self.device)
        x = to_input(images, Preprocess.from_dict(self.classifier_recipe["preprocess"]))
        class_scores = self.classify(x).float()  # (N, classifier's classes, h, w)
        maps, boxes, scores = class_scores.softmax(dim=1), [], []
        if self.columns is not None:  # the nets' classes among the classifier's, over its full softmax
            maps = maps[:, self.columns]
        for net, recipe, task in zip(self.locate, self.recipes, self.tasks, strict=True):
            found = dense_boxes(net, to_input(images, Preprocess.from_dict(recipe["preprocess"])),
                                int(recipe["crop"]), task)
            boxes.append(found.flatten(2, 3))
            scores.append(location_scores(maps, (found.shape[2], found.shape[3])))
        posteriors = class_scores.mean(dim=(2, 3)).softmax(dim=1)
        return boxes, scores, (posteriors if self.columns is None else posteriors[:, self.columns]).cpu()

    def batch(self, files: Sequence[ImageFile], plans: Sequence[Sequence[CropPlan]], top: int) -> list[DenseOutput]:
        """:class:`DenseOutput` of images whose crop plans give the same sizes at every scale, in one batch."""
        found: list[list[Tensor]] = [[] for _ in self.locate]  # per net, per scale: (N, K, L, 4) in full-image pixels
        weights: list[list[Tensor]] = [[] for _ in self.locate]  # per net, per scale: (N, classes, L)
        posteriors = []
        for s in range(len(plans[0])):
            images = torch.stack([render(f, p[s]) for f, p in zip(files, plans, strict=True)])
            boxes, scores, probs = self.forward(images.contiguous(memory_format=torch.channels_last))  # as rendered
            posteriors.append(probs)
            for net, (net_boxes, net_scores) in enumerate(zip(boxes, scores, strict=True)):
                found[net].append(torch.stack([from_crop(b.reshape(-1, 4), f.size, p[s]).view(b.shape)
                                               for b, f, p in zip(net_boxes, files, plans, strict=True)]))
                weights[net].append(net_scores)
        best = torch.stack(posteriors).mean(dim=0).topk(min(top, posteriors[0].shape[1]))
        unions = [torch.cat(per_scale, dim=2) for per_scale in found]
        support = [torch.cat(per_scale, dim=2) for per_scale in weights]
        return [DenseOutput(labels, scores, [u[i][labels] if u.shape[1] > 1 else u[i] for u in unions], files[i].size,
                            [w[i][labels] for w in support])
                for i, (labels, scores) in enumerate(zip(best.indices, best.values, strict=True))]

    def outputs(self, paths: Sequence[str | Path], scales: Sequence[int], top: int = 5,
                batch_size: int = 64) -> list[DenseOutput]:
        """Protocol 2 on images (Appendix A): at each scale Q every location's boxes of every net, mapped
        to the full image, with the classifier's posteriors at their locations, and the classifier's
        posteriors of the image (their mean over the scales picks the top classes). Images that
        rescale to the same sizes go through the nets together, ``batch_size`` at a time."""
        files = [ImageFile(path) for path in paths]
        plans = [[RescaleTransform(q).plan(file.size, False) for q in scales] for file in files]
        groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
        for i, image_plans in enumerate(plans):
            groups.setdefault(tuple(plan.out for plan in image_plans), []).append(i)
        results: list[DenseOutput | None] = [None] * len(files)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                outputs = self.batch([files[i] for i in chunk], [plans[i] for i in chunk], top)
                for i, output in zip(chunk, outputs, strict=True):
                    results[i] = output
        return [output for output in results if output is not None]

    def guesses(self, path: str | Path, scales: Sequence[int], top: int = 5) -> list[Guess]:
        """Protocol 2 on one image: for each of the ``top`` classes the union of every net's boxes over the
        scales, scored by the classifier's posteriors at their locations, merged greedily, the best kept."""
        return ranked(self.outputs([path], scales, top)[0])


@dataclass
class DenseNetResult:
    """One localisation net of protocol 2 alone: its head, training scale S and crop, its error (%)."""

    checkpoint: str
    head: str
    scale: int
    crop: int
    localisation_error: float


@dataclass
class DenseResult:
    """Protocol 2's top-5 localisation error (%) of the union of the localisation nets' boxes ranked by a
    classifier, and of two boxes that ignore the image, each with the classifier's top-5 classes: the
    whole image, and the mean training box; ``nets``: each net alone."""

    checkpoint: str
    classifier: str
    scales: list[int]
    images: int
    localisation_error: float
    whole_image_error: float
    centre_prior_error: float
    nets: list[DenseNetResult]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: ``checkpoint`` is the first net's; ``nets`` only for several nets."""
        fields = {key: value for key, value in self.__dict__.items() if key != "nets"}
        return {**fields, "nets": [net.__dict__ for net in self.nets]} if len(self.nets) > 1 else fields


def image_misses(output: DenseOutput, truth: Sequence[tuple[int, Tensor]], prior: Tensor) -> Tensor:
    """Whether protocol 2 is wrong on one image: the union of all nets, each net alone, the whole image
    and the mean training box (each with the top classes)."""
    w, h = output.size
    union = ranked(output)
    alone = [ranked(output, [net]) for net in range(len(output.boxes))] if len(output.boxes) > 1 else [union]
    guesses, labels = [union, *alone], output.labels.tolist()
    whole, centre = torch.tensor([0.0, 0.0, w, h]), prior * torch.tensor([w, h, w, h])
    guesses += [[Guess(label, box, 0.0) for label in labels] for box in (whole, centre)]
    return torch.tensor([ilsvrc_wrong([(g.label, g.box) for g in row], truth) for row in guesses], dtype=torch.float)


def evaluate_dense(checkpoint: str | Path | Sequence[str | Path], classifier: str | Path | None, data: str | Path,
                   boxes: str | Path | None = None, scales: Sequence[int] | None = None, limit: int | None = None,
                   device: str = "auto", batch_size: int = 64) -> DenseResult:
    """Protocol 2 on the validation split of ``data``, the union of the nets' boxes (scales Q default to
    the first net's training S)."""
    if classifier is None:
        raise UserError("--protocol dense ranks the boxes by a classification net's scores: give --classifier RUN")
    checkpoints = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
    nets = DenseNets.load(checkpoints, classifier, device)
    recipe = nets.recipes[0]
    qs = list(scales or [fixed_scale(recipe)])
    nets.check_scales(qs)
    transform = CenterCropTransform(max(qs), int(recipe["crop"]))
    task = task_of(recipe, boxes_source(boxes, data, nets.recipes))
    train_set, val_set = task.open_splits(str(data), transform, transform)
    prior, indices = mean_relative_box(train_set), balanced_subset(val_set.targets, limit)
    misses, window = torch.zeros(len(checkpoints) + 3), batch_size * WINDOW_BATCHES
    for start in sharding.shard(range(0, len(indices), window)):
        chosen = [val_set.samples[i] for i in indices[start:start + window]]
        outputs = nets.outputs([path for path, _ in chosen], qs, batch_size=batch_size)
        for (path, label), output in zip(chosen, outputs, strict=True):
            truth = [(val_set.classes.index(b.label) if b.label else label, torch.tensor(b.corners))
                     for b in val_set.transform.boxes[str(path)]]
            misses += image_misses(output, truth, prior)
    misses = sharding.total(misses)
    if not indices:
        raise UserError(f"{data}: no validation image with a box to evaluate")
    errors = (100.0 * misses / len(indices)).tolist()
    per_net = [DenseNetResult(str(c), t.head, fixed_scale(r), int(r["crop"]), e)
               for c, r, t, e in zip(checkpoints, nets.recipes, nets.tasks, errors[1:-2], strict=True)]
    return DenseResult(str(checkpoints[0]), str(classifier), qs, len(indices), errors[0], *errors[-2:], per_net)


def paper_scales(net: DenseNetResult, scales: Sequence[int]) -> LocalisationScales:
    """A net's training S and test scales Q at the paper's 224-pixel crop (Table 9's key)."""

    def at_224(pixels: int) -> int:
        return round(pixels * 224 / net.crop)

    return LocalisationScales(at_224(net.scale), tuple(sorted(at_224(q) for q in scales)))


def table_9(result: DenseResult) -> Any:
    """Table 9's layout (protocol 2, top-5 localisation error %): each net alone (several nets) and the
    union of their boxes, the two baselines, then the paper's rows not shown beside ours. A net whose
    S and Q, scaled to 224-pixel crops, are a row of the paper's has its figures beside it; the union of
    several nets has the paper's fusion."""

    def figures(paper: ValTest | None) -> tuple[str, str] | None:
        return None if paper is None else (f"{paper.val:.1f}", "-" if paper.test is None else f"{paper.test:.1f}")

    q, fused, rows = scales_label(result.scales), len(result.nets) > 1, []
    keys = [paper_scales(net, result.scales) for net in result.nets]
    for net, key in zip(result.nets, keys, strict=True):
        rows.append(Row((f"{net_name(net.checkpoint)} ({net.head.upper()})", str(net.scale), q,
                         f"{net.localisation_error:.1f}"), figures(TABLE_9.get(key))))
    if fused:
        union = "union of " + " + ".join(net_name(net.checkpoint) for net in result.nets)
        rows.append(Row((union, scales_label(sorted({net.scale for net in result.nets})), q,
                         f"{result.localisation_error:.1f}"), figures(TABLE_9_FUSION)))
    rows += [Row((name, "-", q, f"{error:.1f}")) for name, error in (
        ("whole image box", result.whole_image_error), ("mean training box", result.centre_prior_error))]
    rows += [Row(("paper: D, PCR", str(key.train), scales_label(key.test), "-"), figures(paper))
             for key, paper in TABLE_9.items() if key not in keys]
    if not fused:
        rows.append(Row(("paper: fusion of its nets", "-", "-", "-"), figures(TABLE_9_FUSION)))
    columns = [Column("net(s)"), Column("S"), Column("Q"), Column("top-5 loc. error %", True)]
    return Table(f"Table 9: top-5 localisation error, dense boxes merged greedily ({result.images} val. images)",
                 columns, rows, [Column("paper val. %", True), Column("paper test %", True)], show_paper=True,
                 paper_missing="-")


# ---- the command line ---------------------------------------------------------------------------

#: Appendix A's fine-tuning settings, below a recipe's and the flags': configuration D, lr 1e-3.
PAPER_DEFAULTS = {"config": "D", "lr": 1e-3}


def run_train(args: argparse.Namespace) -> None:
    """``localize train``: :func:`verydeep.train.train` with the :class:`Localisation` task; the boxes it
    read go into the run record (a resumed run reads them again unless ``--boxes`` is given)."""

    given = {key: value for key, value in vars(args).items() if key not in ("command", "action", "func", "head",
                                                                             "boxes", "targets")}
    settings = {**({} if given.get("resume") else PAPER_DEFAULTS), **settings_from_flags(given)}
    resumed = given["out"] if given.get("resume") and given.get("out") else None
    stored = stored_settings(resumed) if resumed else {}
    head = getattr(args, "head", None) or str(stored.get("task", "")).removeprefix("localisation-") or "pcr"
    trained_with = str(stored.get("box_targets", "raw"))  # runs older than --targets regressed the raw code
    targets = getattr(args, "targets", None) or (trained_with if resumed else "standardised")
    if resumed and targets != trained_with:
        raise UserError(f"--targets {targets}: {resumed} was trained with {trained_with} targets; "
                        "start a new run to change them")
    cfg = make_config(settings)
    explicit = set(settings_from_flags(given))  # not PAPER_DEFAULTS: --weights decide what the user left open
    recorded = stored.get("boxes") if stored.get("boxes") and Path(stored["boxes"]).exists() else None
    task = Localisation(head, getattr(args, "boxes", None) or recorded, targets, stored.get("box_code_mean"),
                        stored.get("box_code_std"))
    summary = train(cfg, task=task, given=explicit)
    if runtime.Processes.from_env().main:
        print(json.dumps(summary.to_dict()))


def fine_tuned_labels(given: Sequence[str] | None, nets: int) -> list[str]:
    """``--fine-tuned`` per net: once for all of them (default ``all``) or once per ``--checkpoint``."""
    labels = list(given or ["all"])
    if len(labels) == 1:
        return labels * nets
    if len(labels) != nets:
        raise UserError(f"--fine-tuned given {len(labels)} times for {nets} --checkpoint: give it once, or once each")
    return labels


def run_eval(args: argparse.Namespace) -> None:
    """``localize eval``: protocol 1 (``center``, a Table 8 row per net) or 2 (``dense``, the union of the
    nets' boxes, Table 9); a table, or one JSON line. Under ``torchrun`` the processes share the images and
    the first prints."""
    with sharding.process_group(args.device) as procs:
        payload, text = eval_tables(args)
    if procs.main:
        print(json.dumps(payload) if args.json else text)


def eval_tables(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``localize eval``'s JSON object and its table (Table 8 or 9)."""
    if args.protocol != "dense" and (args.classifier is not None or args.scales):
        flag = "--classifier" if args.classifier is not None else "--scales"
        raise UserError(f"{flag} is for --protocol dense (protocol 1 reads the central crop at the training scale, "
                        "for the ground-truth class): drop it, or give --protocol dense")
    if args.protocol == "dense":
        result = evaluate_dense(args.checkpoint, args.classifier, args.data, args.boxes, args.scales, args.limit,
                                args.device, args.batch_size)
        payload, text = result.to_dict(), table_9(result).markdown("###")
    else:
        labels = fine_tuned_labels(args.fine_tuned, len(args.checkpoint))
        results = [evaluate_center(checkpoint, args.data, args.boxes, args.limit, args.batch_size, args.device,
                                   args.workers) for checkpoint in args.checkpoint]
        payload, text = center_json(results), table_8(results, labels).markdown("###")
    return payload, text


def classifier_columns(classifier: dict[str, Any], net: dict[str, Any], source: str | Path) -> list[int] | None:
    """Where the localisation net's classes sit among the classifier's outputs (``None``: the same list),
    by synset id, else by name; a class the classifier lacks is a :class:`UserError`."""
    theirs, ours = list(classifier.get("classes") or []), list(net.get("classes") or [])
    if theirs == ours:
        return None
    names = classifier.get("class_names") or theirs
    return list(columns_of(theirs, names, ours, net.get("class_names") or ours, f"--classifier {source}"))


def readable_image(path: str | Path) -> None:
    """An image file that decodes whole; otherwise a :class:`UserError` naming it."""
    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no such image")
    try:
        ImageFile(path).pillow().load()
    except DECODE_ERRORS as error:
        raise UserError(unreadable(path, error)) from None


def draw(path: str | Path, guesses: Sequence[Guess], names: Sequence[str], out: Path) -> Path:
    """``path`` with each guess's box and class name drawn on it, as ``out/<stem>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    image = Image.open(path).convert("RGB")
    fig, ax = plt.subplots(figsize=(6, 6 * image.height / image.width))
    ax.imshow(image)
    for rank, guess in enumerate(guesses):
        x0, y0, x1, y1 = guess.box.tolist()
        colour = plt.cm.tab10(rank)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, linewidth=3 - rank * 0.4))
        ax.text(x0, y0, f"{rank + 1}. {names[guess.label]} {guess.score:.2f}", color="white", fontsize=8,
                backgroundcolor=colour, va="bottom")
    ax.axis("off")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{Path(path).stem}.png"
    fig.savefig(target, bbox_inches="tight", dpi=100)
    plt.close(fig)
    return target


def run_predict(args: argparse.Namespace) -> None:
    """``localize predict``: protocol 2's top (class, box) predictions of each image (the union of the nets'
    boxes), drawn, and one JSON line each."""
    drawn_at = {}
    for image in args.images:
        target = Path(args.out) / f"{Path(image).stem}.png"
        if target in drawn_at:
            raise UserError(f"{image} and {drawn_at[target]} would both be drawn as {target}: give images of "
                            "different names, or predict them into different --out folders")
        if target.exists() and any(target.samefile(given) for given in args.images if Path(given).exists()):
            raise UserError(f"{target}: the drawing would overwrite the input image; give another --out")
        drawn_at[target] = image
        readable_image(image)
    nets = DenseNets.load(args.checkpoint, args.classifier, args.device)
    recipe = nets.recipes[0]
    names = list(recipe.get("class_names") or recipe.get("classes") or [])
    scales = args.scales or [fixed_scale(recipe)]
    nets.check_scales(scales)
    for image in args.images:
        guesses = nets.guesses(image, scales, args.top)
        drawn = draw(image, guesses, names, args.out)
        print(json.dumps({"image": str(image), "drawn": str(drawn), "predictions": [
            {"class": names[g.label], "box": [round(v, 1) for v in g.box.tolist()], "score": g.score}
            for g in guesses]}))


def add_cli(subparsers: argparse._SubParsersAction) -> None:

    p = subparsers.add_parser("localize", help="localisation (Appendix A): box regression nets and their error",
                              description="Train a box regression net, measure its localisation error, draw its boxes.")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", argument_default=argparse.SUPPRESS,
                           help="fine-tune a net to regress boxes (train's flags; lr 1e-3, configuration D)")
    add_flags(t)
    t.add_argument("--boxes", help="boxes: a text file, a LOC_*_solution.csv, or a folder of XML annotations "
                                   "(default DIR/boxes.txt; with --resume the run's own); recorded in recipe.json")
    t.add_argument("--head", choices=HEADS, help="single-class or per-class regression (default pcr)")
    t.add_argument("--targets", choices=TARGETS, help="FC8 regresses the box code standardised by the training "
                                                      "boxes' mean and deviation (default) or the raw code")
    t.set_defaults(func=run_train)
    e = actions.add_parser("eval", help="the localisation error: protocol 1 (center, Table 8) or 2 (dense, Table 9)")
    e.add_argument("--checkpoint", action="append", required=True,
                   help="a localisation run (or checkpoint); again for several nets: protocol dense pools their "
                        "boxes (the union, Appendix A) before merging, protocol center gives each net a Table 8 row "
                        "(the JSON's localisation_error is then the first net's, and 'nets' holds each net's)")
    e.add_argument("--classifier", help="the classification run that ranks the classes (protocol dense)")
    e.add_argument("--data", required=True, help="dataset folder with train/ and val/")
    e.add_argument("--boxes", help="boxes file or folder (default DIR/boxes.txt, else the boxes the first "
                                   "--checkpoint's run was trained on, from its recipe.json)")
    e.add_argument("--protocol", choices=("center", "dense"), default="center")
    e.add_argument("--scales", type=test_scale, nargs="+", help="test scales Q (dense; default the training S)")
    e.add_argument("--fine-tuned", choices=("all", "fc"), action="append",
                   help="Table 8's label of the net: once for all nets, or once per --checkpoint (default all)")
    e.add_argument("--limit", type=positive_int, help="at most this many validation images, class-balanced")
    e.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward pass (dense: images of the same size batched together)")
    add_workers(e, default=0, help="data-loading processes of protocol 1, at most the CPU cores (default 0)")
    add_device(e)
    e.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (localisation_error, whole_image_error, "
                        "centre_prior_error, ...)")
    e.set_defaults(func=run_eval)
    r = actions.add_parser("predict", help="draw protocol 2's top (class, box) predictions of images")
    r.add_argument("images", nargs="+", help="image files")
    r.add_argument("--checkpoint", action="append", required=True,
                   help="a localisation run (or checkpoint); again for several nets, their boxes pooled (the union)")
    r.add_argument("--classifier", required=True, help="the classification run that ranks the classes")
    r.add_argument("--scales", type=test_scale, nargs="+", help="test scales Q (default the training S)")
    r.add_argument("--top", type=positive_int, default=5, help="predictions per image")
    r.add_argument("--out", type=output_dir, required=True, help="folder for the drawn PNGs")
    add_device(r)
    r.set_defaults(func=run_predict)
