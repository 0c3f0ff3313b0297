"""Localisation nets in dense form (Appendix A, protocol 2): every location's boxes at every scale,
scored by a classification net's posteriors at their locations, pooled over the nets, and merged
greedily into one (class, box) guess per top class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verydeep.data import BadImageError, Preprocess, RescaleTransform, SizeGroupedBatchSampler, to_input
from verydeep.data.boxes import decode, from_crop
from verydeep.data.datasets import IndexedImages
from verydeep.errors import UserError
from verydeep.eval.classmap import columns_of
from verydeep.eval.image_sets import loaded_batches
from verydeep.eval.localize.scoring import merge_greedily
from verydeep.eval.localize.task import Localisation, task_of
from verydeep.eval.nets import refuse_repeats
from verydeep.io.sources import load
from verydeep.runtime.device import pick_device

#: Pixels between neighbouring locations of a dense net's output (five 2x2 poolings).
STRIDE = 32


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
class ScaleOutput:
    """One image at one test scale Q: per localisation net its boxes (K, L, 4) in pixels of the full image and
    their scores (classes, L) (:func:`location_scores`), and the classifier's posteriors (classes,)."""

    boxes: list[Tensor]
    box_scores: list[Tensor]
    posteriors: Tensor


def combined(found: Sequence[ScaleOutput], size: tuple[int, int], top: int) -> DenseOutput:
    """An image's :class:`DenseOutput` from its outputs at each scale: the classifier's posteriors averaged over
    the scales pick the ``top`` classes; each net's boxes and scores of every scale, of those classes."""
    best = torch.stack([scale.posteriors for scale in found]).mean(dim=0)
    scores, labels = best.topk(min(top, best.shape[0]))
    boxes = [torch.cat([scale.boxes[net] for scale in found], dim=1) for net in range(len(found[0].boxes))]
    support = [torch.cat([scale.box_scores[net] for scale in found], dim=1) for net in range(len(found[0].boxes))]
    return DenseOutput(labels, scores, [b[labels] if b.shape[0] > 1 else b for b in boxes], size,
                       [w[labels] for w in support])


def unreadable_image(path: str | Path) -> BadImageError:
    """The error for an image protocol 2 cannot read: every image of its pass has an output."""
    return BadImageError(f"{path}: unreadable image, which protocol 2 cannot leave out")


def classifier_columns(classifier: dict[str, Any], net: dict[str, Any], named: str) -> list[int] | None:
    """Where the localisation net's classes sit among the classifier's outputs (``None``: the same list),
    by synset id, else by name; a class the classifier lacks is a :class:`UserError`, which names the classifier
    as ``named`` (its option and source)."""
    theirs, ours = list(classifier.get("classes") or []), list(net.get("classes") or [])
    if theirs == ours:
        return None
    names = classifier.get("class_names") or theirs
    return list(columns_of(theirs, names, ours, net.get("class_names") or ours, named,
                           ("the localisation net's", "the classifier's")))


@dataclass
class DenseNets:
    """Localisation nets and the classification net that ranks their classes, in dense form."""

    locate: list[torch.nn.Module]
    classify: torch.nn.Module
    recipes: list[dict[str, Any]]  # the localisation nets'
    classifier_recipe: dict[str, Any]
    conventions: list[Preprocess]  # the localisation nets' input conventions
    classifier_convention: Preprocess
    device: torch.device
    columns: list[int] | None = None  # the classifier's outputs of the nets' classes (None: the same classes)
    tasks: list[Localisation] = field(init=False)  # each net's, read from its recipe once (it checks the recipe)

    def __post_init__(self) -> None:
        self.tasks = [task_of(recipe) for recipe in self.recipes]

    @classmethod
    def load(cls, checkpoints: str | Path | Sequence[str | Path], classifier: str | Path,
             device: str = "auto", options: tuple[str, str] = ("--checkpoint", "--classifier")) -> DenseNets:
        """The localisation nets of ``checkpoints`` and the classifier: any source of weights (a run, or
        published weights such as ``vgg16``), whose classes are matched to the nets' by synset or name; errors
        name them by the command's ``options`` (the nets', the classifier's)."""
        nets_option, classifier_option = options
        dev = pick_device(device)
        paths = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
        loaded = []
        for checkpoint in paths:
            net = load(checkpoint, device=dev)
            task_of(net.recipe, source=net.source)  # one line naming a net that is not a localisation net, first
            loaded.append(net)
        for checkpoint, net in zip(paths, loaded, strict=True):
            if list(net.recipe.get("classes") or []) != list(loaded[0].recipe.get("classes") or []):
                raise UserError(f"{nets_option} {checkpoint}: its classes are not those of {paths[0]}")
        # pooled with itself a net's boxes would be counted as two nets' union
        refuse_repeats([(path, net.model, net.preprocess, net.recipe) for path, net in zip(paths, loaded, strict=True)],
                       nets_option)
        published = load(classifier, device=dev)
        cls_recipe = published.recipe
        if str(cls_recipe.get("task", "")).startswith("localisation") or not published.has_fc_layers:
            raise UserError(f"{classifier_option} {classifier}: not a classification net (a localisation net, or "
                            "weights without FC layers); give the net that ranks the classes")
        columns = classifier_columns(cls_recipe, loaded[0].recipe, f"{classifier_option} {classifier}")
        return cls([net.model.dense() for net in loaded], published.model.dense(), [net.recipe for net in loaded],
                   cls_recipe, [net.preprocess for net in loaded], published.preprocess, dev, columns)

    @property
    def class_names(self) -> list[str]:
        """The readable name of each class the nets' guesses are labelled with: the nets' own, else (the
        classifier's classes being theirs) the classifier's."""
        for recipe in (self.recipes[0], self.classifier_recipe):
            names = recipe.get("class_names") or recipe.get("classes")
            if names:
                return [str(name) for name in names]
        return [str(c) for c in range(self.classifier_recipe["num_classes"])]

    def check_scales(self, scales: Sequence[int], option: str = "--scales") -> None:
        """Every test scale Q at least every net's crop (a dense net needs one window); else a :class:`UserError`
        naming ``option``, where the scales came from."""
        crops = [int(r["crop"]) for r in (*self.recipes, self.classifier_recipe)]
        if min(scales) < max(crops):
            raise UserError(f"{option} {min(scales)} is smaller than the nets' crop {max(crops)}: a dense net needs "
                            "a whole window")

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Uint8 images (N, 3, H, W) -> each localisation net's boxes (N, K, L, 4) in their pixels and their
        scores (N, classes, L) (:func:`location_scores`: the classifier's posterior at each location of
        its dense class-score map, or its spatial mean where the grids differ), and the classifier's
        posteriors (N, classes) (:func:`~verydeep.eval.sweep.dense_posteriors`, no flip), on the CPU."""
        images = images.to(self.device)
        x = to_input(images, self.classifier_convention)
        class_scores = self.classify(x).float()  # (N, classifier's classes, h, w)
        maps, boxes, scores = class_scores.softmax(dim=1), [], []
        if self.columns is not None:  # the nets' classes among the classifier's, over its full softmax
            maps = maps[:, self.columns]
        for net, recipe, task, convention in zip(self.locate, self.recipes, self.tasks, self.conventions, strict=True):
            found = dense_boxes(net, to_input(images, convention), int(recipe["crop"]), task)
            boxes.append(found.flatten(2, 3))
            scores.append(location_scores(maps, (found.shape[2], found.shape[3])))
        posteriors = class_scores.mean(dim=(2, 3)).softmax(dim=1)
        return boxes, scores, (posteriors if self.columns is None else posteriors[:, self.columns]).cpu()

    def scale_pass(self, images: IndexedImages, q: int, batch_size: int, workers: int) -> list[ScaleOutput]:
        """Every image of ``images`` at one test scale Q (:class:`ScaleOutput`, in the images' order): whole images
        rescaled to Q from a full-size decode, batched by their size there (``batch_size`` at a time) and read
        by ``workers`` processes; an image that does not decode is a :class:`~verydeep.data.BadImageError`."""
        transform = images.transform = RescaleTransform(q, reduce=False)
        batches = SizeGroupedBatchSampler(images, q, batch_size).batches
        sizes, found = images.image_sizes(), {}
        for indices, batch, skipped in loaded_batches(images, batches, min(workers, len(batches))):
            if skipped:
                raise unreadable_image(skipped[0])
            boxes, scores, posteriors = self.forward(batch)
            for row, i in enumerate(indices.tolist()):
                plan = transform.plan(sizes[i], False)
                found[i] = ScaleOutput([from_crop(b[row].reshape(-1, 4), sizes[i], plan).view(b[row].shape)
                                        for b in boxes], [net[row] for net in scores], posteriors[row])
        return [found[i] for i in range(len(images))]

    def outputs(self, paths: Sequence[str | Path], scales: Sequence[int], top: int = 5, batch_size: int = 64,
                workers: int = 0) -> list[DenseOutput]:
        """Protocol 2 on images (Appendix A), one pass per scale Q (:meth:`scale_pass`): every location's boxes
        of every net, mapped to the full image, with the classifier's posteriors at their locations, and the
        classifier's posteriors of the image (their mean over the scales picks the ``top`` classes). Images
        of the same size at Q go through the nets together, ``batch_size`` at a time, read by ``workers``
        processes."""
        images = IndexedImages(paths)
        sizes = images.image_sizes()
        if None in sizes:
            raise unreadable_image(paths[sizes.index(None)])
        passes = [self.scale_pass(images, q, batch_size, workers) for q in scales]
        return [combined([found[i] for found in passes], sizes[i], top) for i in range(len(images))]

    def guesses(self, path: str | Path, scales: Sequence[int], top: int = 5, workers: int = 0) -> list[Guess]:
        """Protocol 2 on one image (read by ``workers`` processes): for each of the ``top`` classes the union of
        every net's boxes over the scales, scored by the classifier's posteriors at their locations, merged
        greedily, the best kept."""
        return ranked(self.outputs([path], scales, top, workers=workers)[0])
