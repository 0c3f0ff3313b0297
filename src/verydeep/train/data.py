"""A run's images (Sec. 3.1): the training and validation splits, their subsets, and their loaders."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from verydeep.data import (
    CenterCropTransform,
    Preprocess,
    TrainTransform,
    balanced_subset,
    carve_validation,
    collate,
)
from verydeep.data import gpu as gpu_decode
from verydeep.data.datasets import LabelledImages, split_apart, unicode_twins
from verydeep.data.ilsvrc_val import ILSVRCValFolder
from verydeep.data.loaders import image_loader
from verydeep.data.sampling import GlobalBatchSampler, SeededSamples, collate_shifted
from verydeep.errors import UserError
from verydeep.nn.tasks import Task
from verydeep.runtime.processes import Processes
from verydeep.train.recipe import TrainConfig


def _relative(path: Path, root: Path) -> Path:
    """``path`` relative to ``root`` when it lies under it, else as it is."""
    return path.relative_to(root) if path.is_relative_to(root) else path


def check_validation_classes(data: str | Path, train_set: LabelledImages, val_set: LabelledImages) -> None:
    """Raise :class:`UserError` unless ``val_set`` has the classes of ``train_set``, naming those that differ."""
    if val_set.classes != train_set.classes:
        missing = [c for c in train_set.classes if c not in val_set.classes]
        extra = [c for c in val_set.classes if c not in train_set.classes]
        flat = isinstance(val_set, ILSVRCValFolder)  # its classes: those its ground truth or synset list names
        advice = ("list every training class in a synset list beside it, LOC_synset_mapping.txt" if flat else
                  "a class without validation images needs an empty folder")
        said = [f"validation lacks the classes {', '.join(missing[:5])} ({advice})" if missing else "",
                f"validation has class folders training lacks: {', '.join(extra[:5])}" if extra else ""]
        twins = unicode_twins(train_set.classes, val_set.classes)
        said = f"{twins} (rename one)" if twins else ("; ".join(part for part in said if part)
                                                      or "their class folders are listed in another order")
        raise UserError(f"{data}: the validation classes differ from the training classes: {said}")


def relative_paths(images: LabelledImages, indices: Iterable[int] | None = None) -> list[str]:
    """The paths of ``images`` (those at ``indices``, default all) within their split, sorted: the class folder
    included, so that an image moved to another class is another path; in a flat validation folder, whose
    classes its ground-truth file gives, the class after the path."""
    root = Path(getattr(images, "root", "/"))
    chosen = range(len(images.samples)) if indices is None else indices
    flat = isinstance(images, ILSVRCValFolder)
    return sorted(str(_relative(Path(images.samples[i][0]), root)) + (f"\t{images.classes[images.samples[i][1]]}"
                                                                     if flat else "") for i in chosen)


def path_digest(paths: list[str]) -> str:
    """A digest of images' paths within their split (:func:`relative_paths`)."""
    return hashlib.sha256("\n".join(paths).encode(errors="surrogateescape")).hexdigest()  # any file name


class TrainingData:
    """The images ``task`` trains and validates on: training crops at a scale S (fixed or jittered), one
    central crop of each validation image (``--val-split``: held-out training images)."""

    def __init__(self, cfg: TrainConfig, task: Task, decode: str) -> None:
        self.cfg, self.decode = cfg, decode
        train_transform, val_transform = TrainTransform(cfg.crop, tuple(cfg.scale)), CenterCropTransform(
            cfg.scale[0], cfg.crop)
        if decode == "gpu":
            train_transform, val_transform = gpu_decode.EncodedTransform(train_transform), gpu_decode.EncodedTransform(
                val_transform)
        if cfg.val_split is None:  # validating on the training images would choose the best and the lr by them
            split_apart(cfg.data, "validation", "give --val-split N to hold out N training images for validation")
            self.train_set, val_set = task.open_splits(cfg.data, train_transform, val_transform)
            assert val_set is not None
            check_validation_classes(cfg.data, self.train_set, val_set)
            self.val_set, trainable = val_set, list(range(len(self.train_set)))
            self.val_indices = balanced_subset(self.val_set.targets, cfg.limit_val)
        else:  # no validation split is read: it is held out of training
            self.train_set, _ = task.open_splits(cfg.data, train_transform, None)
            trainable, self.val_indices = carve_validation(self.train_set.targets, cfg.val_split, cfg.seed)
            self.val_set = task.held_out(self.train_set, val_transform)
        picked = balanced_subset([self.train_set.targets[i] for i in trainable], cfg.limit_train)
        self.train_indices = [trainable[i] for i in picked]
        if len(self.train_indices) < cfg.batch_size:
            raise UserError(f"{cfg.data}: {len(self.train_indices)} training images, fewer than --batch-size "
                            f"{cfg.batch_size}")
        task.fit(self.train_set, self.train_indices)

    @property
    def classes(self) -> list[str]:
        return list(self.train_set.classes)

    def record(self) -> dict[str, Any]:
        """What the run record says of the images: the classes, and which images trained and validated."""
        paths = relative_paths(self.train_set, self.train_indices)
        return {"classes": self.classes, "class_names": list(self.train_set.class_names),
                "training": {"folder": str(getattr(self.train_set, "root", "")), "images": len(paths),
                             "sha256": path_digest(paths)},
                "validation": self._validation_record()}

    def _validation_record(self) -> dict[str, Any]:
        """Which images validation reads: their folder, count and a digest of their paths; with
        ``--val-split``, every held-out training image (relative to the training folder)."""
        paths = relative_paths(self.val_set, self.val_indices)
        record = {"folder": str(getattr(self.val_set, "root", "/")), "images": len(paths), "sha256": path_digest(paths)}
        if self.cfg.val_split is not None:
            record.update(held_out_of_training=True, paths=paths)
        return record

    def loaders(self, procs: Processes, micro_batch: int, pre: Preprocess, workers: int,
                device: torch.device) -> tuple[GlobalBatchSampler, DataLoader, DataLoader]:
        """The training sampler and loader (seeded samples in global batches, this process's slice in
        micro-batches) and the validation loader (this process's share of the images)."""
        cfg = self.cfg
        collate_images = gpu_decode.collate_encoded if self.decode == "gpu" else collate
        sampler = GlobalBatchSampler(self.train_indices, cfg.batch_size, micro_batch, procs.rank, procs.world,
                                     cfg.seed)
        samples = SeededSamples(self.train_set, cfg.seed, pre, cfg.alpha_std)
        mine = self.val_indices[procs.rank::procs.world]
        val_batches = [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]

        def loader(dataset: Dataset, batches: Any, collate_fn: Any) -> DataLoader:
            return image_loader(dataset, batches, workers, collate_fn, device, persistent=True, prefetch=4)

        return sampler, loader(samples, sampler, collate_shifted(collate_images)), loader(
            self.val_set, val_batches, collate_images)
