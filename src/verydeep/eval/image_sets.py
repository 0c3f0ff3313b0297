"""The images Appendix B's descriptors are computed for: a VOC root, train/test class folders or a folder of
class folders, as paths, labels, splits and classes; the dataset that labels each image by its index, and its
batches as loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from verydeep.data import ImageFolder, LabelledImages, collate, find_split, open_split
from verydeep.data.datasets import _class_dirs, is_one_split, require_folder, unicode_twins
from verydeep.data.loaders import image_loader
from verydeep.data.voc import is_voc, open_voc
from verydeep.errors import MissingFileError, UserError


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


def refuse_split_without_train(root: Path) -> None:
    """A root with ``val/`` or ``test/`` but no ``train/`` is a :class:`UserError`: read as class folders, its
    split folders would be its classes."""
    held = [name for name in ("val", "test") if (root / name).is_dir()]
    if held:
        raise MissingFileError(f"data folder {root} has {' and '.join(held)} but no train: give {root / held[0]} "
                               "to describe its images as one unsplit set, or add train/")


def held_out_split(root: Path) -> Path:
    """The split of ``root`` described beside ``train/``: ``test/``, else ``val/``; a ``test/`` of images without
    class folders (ILSVRC's and Tiny ImageNet's, unlabelled) is passed over for a ``val/`` beside it."""
    test, val = root / "test", root / "val"
    if test.is_dir() and val.is_dir() and _class_dirs(test) in ([], ["images"]):
        return val
    return find_split(root, "test")


def open_image_set(data: str | Path) -> ImageSet:
    """The images of ``data``: a VOC root (:mod:`verydeep.data.voc`), a root with ``train/`` class folders and a
    held-out split (:func:`held_out_split`: class folders, or flat images with their labels as ``eval`` reads
    them; one given split), or a folder of class folders (split at random later)."""

    root = require_folder(Path(data))
    if is_voc(root):
        voc = open_voc(root)
        return ImageSet([str(p) for p in voc.paths], voc.labels, voc.splits, voc.classes, voc.classes)
    if not (root / "train").is_dir() or is_one_split(root):  # CIFAR-100's split holds a class named train
        refuse_split_without_train(root)
        folder = ImageFolder(root, None)
        return ImageSet([str(p) for p, _ in folder.samples], np.array(folder.targets), [""] * len(folder),
                        folder.classes, folder.class_names)
    held_out = held_out_split(root)
    train, test = ImageFolder(find_split(root, "train"), None), open_split(held_out, None)
    if train.classes != test.classes:
        twins = unicode_twins(train.classes, test.classes)
        differ = sorted(set(train.classes) ^ set(test.classes))[:5] or ["the same, in another order"]
        raise UserError(f"{root}: the classes of train/ and {held_out.name}/ differ: "
                        f"{twins + ' (rename one)' if twins else ', '.join(differ)}")
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
