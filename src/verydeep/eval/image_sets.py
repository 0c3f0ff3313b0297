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

from verydeep.data import ImageFolder, LabelledImages, collate, find_split
from verydeep.data.datasets import require_folder
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


def open_image_set(data: str | Path) -> ImageSet:
    """The images of ``data``: a VOC root (:mod:`verydeep.data.voc`), a root with ``train/`` and ``test/``
    (or ``val/``) class folders (one given split), or a folder of class folders (split at random later)."""

    root = require_folder(Path(data))
    if is_voc(root):
        voc = open_voc(root)
        return ImageSet([str(p) for p in voc.paths], voc.labels, voc.splits, voc.classes, voc.classes)
    if not (root / "train").is_dir():
        refuse_split_without_train(root)
        folder = ImageFolder(root, None)
        return ImageSet([str(p) for p, _ in folder.samples], np.array(folder.targets), [""] * len(folder),
                        folder.classes, folder.class_names)
    # a test split may lack a class's images yet keep its folder, as a validation split may
    train, test = ImageFolder(find_split(root, "train"), None), ImageFolder(find_split(root, "test"), None,
                                                                            allow_empty=True)
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
