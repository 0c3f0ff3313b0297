"""A dataset's split opened in its layout (class folders, or the flat ILSVRC validation folder), and the
class-balanced parts taken from one: a ``--limit`` of its images, a validation set carved from training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from verydeep.data.datasets import ImageFolder, LabelledImages, Transform, _class_dirs, _has_images
from verydeep.data.ilsvrc_val import TINY_LABELS, ILSVRCValFolder
from verydeep.errors import UserError


def open_split(folder: str | Path, transform: Transform, strict: bool = False) -> LabelledImages:
    """:class:`ImageFolder` for class folders, else :class:`ILSVRCValFolder` (flat images + labels, or Tiny
    ImageNet's ``images/`` beside ``val_annotations.txt``); the split read for validation, evaluation or
    statistics, so a class folder without images is allowed."""
    folder = Path(folder)
    if (folder / TINY_LABELS).is_file() and [  # Tiny ImageNet's val/, a stray folder (__MACOSX/) beside it or not
            name for name in _class_dirs(folder) if _has_images(folder / name)] == ["images"]:
        return ILSVRCValFolder(folder / "images", transform, labels=folder / TINY_LABELS, strict=strict,
                               names_from=folder)  # val/ and the root beside train/, where words.txt lies
    if folder.is_dir() and _class_dirs(folder):
        return ImageFolder(folder, transform, strict, allow_empty=True)
    return ILSVRCValFolder(folder, transform, strict=strict)


def balanced_subset(targets: Sequence[int], limit: int | None) -> list[int]:
    """``limit`` indices taken round-robin over the classes in folder order (deterministic, class-balanced)."""
    if limit is None or limit >= len(targets):
        return list(range(len(targets)))
    if limit <= 0:
        raise UserError(f"--limit must be positive; got {limit}")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return sorted(chosen)


def carve_validation(targets: Sequence[int], count: int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (training, validation): ``count`` validation indices drawn class-balanced
    (round-robin over the classes, each class's images in an order shuffled by ``seed``), the rest
    for training; every class keeps at least one training image. The same targets and seed always give
    the same split."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    most = len(targets) - len(by_class)
    if count <= 0 or count > most:
        raise UserError(f"--val-split must be between 1 and {most} (the training images less one of each class, "
                        f"which each class keeps for training); got {count}")
    rng = np.random.default_rng(seed)
    queues = [[by_class[c][i] for i in rng.permutation(len(by_class[c]))][:-1] for c in sorted(by_class)]
    held: list[int] = []
    depth = 0
    while len(held) < count:
        held += [queue[depth] for queue in queues if depth < len(queue)][: count - len(held)]
        depth += 1
    kept = set(held)
    return [i for i in range(len(targets)) if i not in kept], sorted(held)
