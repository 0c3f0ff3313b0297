"""Box regression as a :class:`~verydeep.nn.tasks.Task` (Appendix A): FC8 predicts a box (SCR) or a box
per class (PCR), trained on the Euclidean loss and validated by protocol 1's error; and what a run's
recipe says of it (its task, its training scale, the boxes it read)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from verydeep.data import Batch
from verydeep.data.boxes import (
    BoxedTransform,
    PlannedTransform,
    clipped,
    decode,
    default_boxes,
    encode,
    match_boxes,
    read_boxes,
    to_crop,
    with_boxes,
)
from verydeep.data.datasets import DECODE_ERRORS, LabelledImages, Transform
from verydeep.data.decode import ImageFile
from verydeep.data.sampling import Stream, stream_generator
from verydeep.errors import UserError
from verydeep.eval.classmap import recipe_columns
from verydeep.eval.localize.scoring import wrong
from verydeep.eval.nets import train_scale
from verydeep.io.checkpoint import check_box_code, resolve
from verydeep.io.weights import load_published
from verydeep.nn.tasks import Task

#: Heads of Appendix A: single-class and per-class regression.
HEADS = ("scr", "pcr")

#: What FC8 regresses: the box code standardised by the mean and deviation of the training crops' codes, or
#: the raw code (the paper's literal Euclidean loss; at small scale the net then barely leaves the mean box).
TARGETS = ("standardised", "raw")

#: Training crops whose box codes fit the standardisation: enough for their mean and spread, few enough
#: to plan (never decode) in a second or so.
CODE_SAMPLE = 4096

#: The least spread (crop sides) a code coordinate is divided by: a coordinate every crop gives the same
#: value (a box's width under a fixed S when all boxes have one shape) is regressed as its mean, and
#: a rarer value that the sample missed stays within a few dozen units instead of thousands.
MIN_CODE_STD = 0.02


class Localisation(Task):
    """Appendix A's box regression: FC8 predicts (centre x, centre y, width, height) in crop sides,
    for one box (SCR) or one per class (PCR); Euclidean loss on the ground-truth class's box (the
    first of its boxes); validation: the localisation error (%) of the central crop (protocol 1).

    Targets are (N, M, 9): the image's class, a box's corners and the image's frame in crop sides (NaN
    rows pad).
    Standardised targets are fitted on the codes of the training crops (:func:`training_codes`) that the
    run's ``seed`` draws, unless ``code_mean`` and ``code_std`` are given (a trained net's, kept)."""

    metrics = ("loc_error",)
    higher_is_better = False

    def __init__(self, head: str = "pcr", boxes: str | Path | None = None, targets: str = "standardised",
                 code_mean: Sequence[float] | None = None, code_std: Sequence[float] | None = None, *,
                 seed: int = 0) -> None:
        if head not in HEADS:
            raise UserError(f"--head {head}: one of {', '.join(HEADS)}")
        if targets not in TARGETS:
            raise UserError(f"--targets {targets}: one of {', '.join(TARGETS)}")
        self.head, self.boxes, self.target_kind, self.seed = head, boxes, targets, seed
        self.name = f"localisation-{head}"
        self.source: Path | None = None  # the boxes read, once open_splits has read them
        self.data_root: Path | None = None  # the data they were read for
        # FC8 predicts (code - mean) / std; the identity for raw codes (and for runs that predate this)
        self.code_mean = torch.tensor(code_mean or [0.0] * 4)
        self.code_std = torch.tensor(code_std or [1.0] * 4)
        self.fitted = code_mean is not None  # a trained net's standardisation is kept, never refitted

    def outputs(self, num_classes: int) -> int:
        return 4 if self.head == "scr" else 4 * num_classes

    def record(self) -> dict[str, Any]:
        """The boxes read and the data they were read for (absolute paths), for ``localize eval`` to
        default to on that data, and the box code's standardisation, which every reader of the net's
        outputs needs."""
        found = {"box_targets": self.target_kind, "box_code_mean": self.code_mean.tolist(),
                 "box_code_std": self.code_std.tolist()}
        if self.source is None:
            return found
        return {**found, "boxes": str(self.source), "boxes_data": str(self.data_root)}

    def open_splits(self, data: str, train: Transform, val: Transform | None
                    ) -> tuple[LabelledImages, LabelledImages | None]:
        train_set, val_set, matched = self.matched_splits(data, train, val)
        return with_boxes(train_set, matched, train), None if val is None else with_boxes(val_set, matched, val)

    def fit(self, train_set: LabelledImages, indices: Sequence[int]) -> None:
        """Standardised targets: the mean and spread of the codes of the crops training draws from the images
        at ``indices`` (never a held-out validation image's), unless the net's own are kept."""
        if self.target_kind == "standardised" and not self.fitted:
            codes = training_codes(train_set, self.seed, indices)
            self.code_mean, self.code_std = codes.mean(dim=0), codes.std(dim=0).clamp(min=MIN_CODE_STD)

    def open_for_eval(self, data: str, transform: Transform, unreadable: Callable[[Path], Exception] | None = None,
                      ) -> tuple[LabelledImages | None, LabelledImages]:
        """The validation images with their boxes, and the training images with theirs for the centre prior:
        None when the boxes file holds none of them (ILSVRC's ``LOC_val_solution.csv``: validation boxes).
        ``unreadable``: the error for a validation image with a box that cannot be read (else it is skipped)."""
        train_set, val_set, matched = self.matched_splits(data, transform, transform)
        assert val_set is not None
        boxed = any(matched.get(str(path)) for path, _ in train_set.samples)
        return (with_boxes(train_set, matched, transform) if boxed else None,
                with_boxes(val_set, matched, transform, unreadable))

    def matched_splits(self, data: str, train: Transform, val: Transform | None
                       ) -> tuple[LabelledImages, LabelledImages | None, dict[str, list[Any]]]:
        """Both splits and the boxes file's boxes matched to their images by path (:func:`match_boxes`)."""
        source = Path(self.boxes or default_boxes(data))
        table = read_boxes(source)
        self.source, self.data_root = source.absolute(), Path(data).absolute()
        train_set, val_set = super().open_splits(data, train, val)
        paths = [path for images in (train_set, val_set) if images is not None for path, _ in images.samples]
        return train_set, val_set, match_boxes(table, dict.fromkeys(paths), Path(data))  # no name shared unseen

    def held_out(self, train_set: LabelledImages, val: Transform) -> LabelledImages:
        """The training images with their boxes, read as validation reads them (``--val-split``)."""
        boxed = train_set.transform
        if not isinstance(boxed, BoxedTransform) or not isinstance(val, PlannedTransform):
            raise UserError("localisation reads images on the CPU: use --decode cpu")
        held = copy.copy(train_set)
        held.transform = BoxedTransform(val, boxed.boxes)
        return held

    def targets(self, batch: Batch, device: torch.device) -> Tensor:
        """(N, M, 9): per box of an image, its class, its corners and the image's frame, in crop sides."""
        if batch.boxes is None or batch.frames is None:
            raise UserError("localisation needs images with boxes (a dataset opened by the task)")
        side, boxes = batch.images.shape[-1], batch.boxes.shape[1]
        labels = batch.labels[:, None, None].to(batch.boxes.dtype).expand(-1, boxes, 1)
        frames = batch.frames[:, None, :].to(batch.boxes.dtype).expand(-1, boxes, 4)
        return torch.cat([labels, batch.boxes / side, frames / side], dim=2).to(device, non_blocking=True)

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
        wanted = (encode(targets[:, 0, 1:5].float(), 1.0) - mean) / std  # the targets' float64 is for scoring
        return F.mse_loss(self.selected(outputs, targets[:, 0, 0]), wanted, reduction="sum")

    def metric_sums(self, outputs: Tensor, targets: Tensor) -> list[float]:
        """Protocol 1's wrong boxes, in %: each predicted box clipped to its image, as protocol 2 clips it."""
        boxes = clipped(decode(self.predicted(outputs, targets[:, 0, 0]), 1.0), targets[:, 0, 5:])
        return [100.0 * float(wrong(boxes, targets[:, :, 1:5]).sum())]


def training_codes(images: LabelledImages, seed: int, indices: Sequence[int] | None = None,
                   draws: int = CODE_SAMPLE) -> Tensor:
    """The codes (N, 4) of the first box of at least ``draws`` training crops of ``images`` (read through a
    :class:`~verydeep.data.boxes.BoxedTransform`) at ``indices`` (default all), each drawn as training draws
    it: image ``i``'s crop in epoch ``e`` from the :data:`~verydeep.data.sampling.Stream.AUGMENT` generator of
    ``(seed, e, i)``. The images are every one, or an even stride of them where there are more than ``draws``;
    epochs 0, 1, ... until ``draws`` crops. Only the crops' plans are drawn, from the files' headers; no image
    is decoded."""
    transform = images.transform
    if not isinstance(transform, BoxedTransform):
        raise UserError("localisation needs images with boxes (a dataset opened by the task)")
    chosen = list(range(len(images)) if indices is None else indices)
    sizes = images.image_sizes()
    picked = [i for i in chosen[::max(1, math.ceil(len(chosen) / draws))] if sizes[i] is not None]
    crop, codes = transform.transform, []
    for index in picked:
        path = images.samples[index][0]
        try:
            file = ImageFile(path)
        except DECODE_ERRORS:
            continue  # training skips it too
        corners = torch.tensor([transform.boxes[str(path)][0].corners], dtype=torch.float64)  # as training's
        for epoch in range(math.ceil(draws / len(picked))):
            drawn = stream_generator(seed, Stream.AUGMENT, epoch, index)
            plan = crop.plan(file.size, crop.fast and file.reducible, drawn)
            codes.append(encode(to_crop(corners, file.size, plan)[0], plan.size[0]))
    if not codes:
        raise UserError("no readable training image with a box")
    return torch.stack(codes).float()


def smallest_training_scale(recipe: dict[str, Any]) -> int:
    """The training scale S of a run (Smin when jittered): protocol 1's resize, protocol 2's default Q."""
    return train_scale(recipe)[0]


def recipe_file(source: str | Path) -> Path:
    """The file a net's recipe is read from: a run directory's checkpoint (best, else last), else ``source``."""
    path = Path(source)
    return resolve(path) if path.is_dir() else path


def recorded_head(recipe: dict[str, Any], where: str | Path) -> str:
    """The head of a localisation net, from its recipe's ``task``; a recipe of another task, or of no head
    of Appendix A, is a :class:`UserError` naming ``where`` (the file it was read from) and the key."""
    name = str(recipe.get("task", ""))
    if not name.startswith("localisation-"):
        raise UserError(f"{where}: not a localisation net (its recipe's task is {name or 'classification'}): train "
                        "one with verydeep localize train")
    head = name.removeprefix("localisation-")
    if head not in HEADS:
        known = " or ".join(f"localisation-{h}" for h in HEADS)
        raise UserError(f"{where}: recipe task must be {known}; got {recipe['task']!r}")
    return head


def recorded_targets(recipe: dict[str, Any], where: str | Path) -> str:
    """What a localisation net's FC8 regresses, from its recipe's ``box_targets`` (runs older than it: raw);
    another value is a :class:`UserError` naming ``where`` and the key."""
    targets = recipe.get("box_targets", "raw")
    if not isinstance(targets, str) or targets not in TARGETS:
        raise UserError(f"{where}: recipe box_targets must be {' or '.join(TARGETS)}; got {targets!r}")
    return targets


def recorded_box_code(recipe: dict[str, Any], where: str | Path) -> tuple[list[float] | None, list[float] | None]:
    """A localisation net's box code standardisation, from its recipe's ``box_code_mean`` and ``box_code_std``
    (None where absent), checked as a checkpoint's recipe is (:func:`~verydeep.io.checkpoint.check_box_code`,
    a :class:`UserError` naming ``where`` and the key)."""
    check_box_code(recipe, where)
    return recipe.get("box_code_mean"), recipe.get("box_code_std")


def task_of(recipe: dict[str, Any], boxes: str | Path | None = None,
            source: str | Path | None = None) -> Localisation:
    """The localisation task a net was trained with, from its recipe (``task``, ``box_targets``, the box code);
    ``source``: the net's file or run directory, which an error in the recipe names."""
    where = "the net" if source is None else recipe_file(source)
    return Localisation(recorded_head(recipe, where), boxes, recorded_targets(recipe, where),
                        *recorded_box_code(recipe, where))


def classes_in_net(recipe: dict[str, Any], images: LabelledImages, source: str | Path) -> Tensor | None:
    """Per class of the data ``images``, its index among a localisation net's classes, matched by synset id, else
    by name (None: the net's classes are the data's, in its order); a class of the data the net lacks is a
    :class:`UserError` naming ``source``."""
    columns = recipe_columns(recipe, int(recipe["num_classes"]), images.classes, images.class_names, source)
    return None if columns == tuple(range(int(recipe["num_classes"]))) else torch.tensor(columns)


def boxes_source(boxes: str | Path | None, data: str | Path, recipes: Iterable[dict[str, Any]]) -> Path:
    """The boxes to evaluate ``data`` on: ``--boxes`` when given, else ``DATA/boxes.txt`` when it exists,
    else the file the first of these runs recorded (``boxes`` in its recipe) that still exists, when it
    belongs to ``data``: it lies under ``data``, or the run read it for ``data``. A recorded file of
    other data is a :class:`UserError`; with none, ``DATA/boxes.txt`` (which the reader finds missing).
    ``recipes`` is read lazily, up to the first that recorded a file still there."""
    own = default_boxes(data)
    if boxes is not None or own.exists():
        return Path(boxes) if boxes is not None else own
    recorded = ((Path(recipe["boxes"]), recipe.get("boxes_data")) for recipe in recipes if recipe.get("boxes"))
    path, read_for = next(((path, read_for) for path, read_for in recorded if path.exists()), (None, None))
    if path is None:
        return own
    root = Path(data).resolve()
    if not (path.resolve().is_relative_to(root) or (read_for is not None and Path(read_for).resolve() == root)):
        raise UserError(f"{data}: no boxes.txt, and the boxes file the net was trained with ({path}) is not of "
                        f"this data; give the boxes file of {data} with --boxes")
    return path


def eval_boxes(boxes: str | Path | None, data: str | Path, checkpoints: Sequence[str | Path]) -> Path:
    """:func:`boxes_source` for ``localize eval``: the nets' recipes read only when neither ``--boxes``
    nor ``DATA/boxes.txt`` says."""
    return boxes_source(boxes, data, (load_published(checkpoint).recipe for checkpoint in checkpoints))
