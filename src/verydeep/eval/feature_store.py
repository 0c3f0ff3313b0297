"""Appendix B's descriptors on disk: the ``.npz`` of :class:`Features` (numpy reads it without pickles;
a damaged or foreign file is a one-line error), and the :class:`Partial` extraction saved to ``OUT.partial``,
per net and Q before aggregation, from which a run with the same nets, images and scales continues (after
a kill, bit for bit) and into which ``torchrun``'s processes merge their rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verydeep.errors import UserError
from verydeep.eval.descriptors import TAP, FeatureNet
from verydeep.eval.image_sets import ImageSet
from verydeep.io.atomic import atomic_write
from verydeep.io.npz import read_npz
from verydeep.runtime import sharding
from verydeep.runtime.limits import MAX_SIDE, is_whole

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
        arrays = read_npz(path, ("features", "labels", "paths", "splits", "classes", "class_names", "skipped",
                                  "settings"), "features file")
        x = arrays["features"]
        if x.ndim != 2 or x.dtype.kind not in "fiu" or 0 in x.shape:
            raise UserError(f"{path}: features must be a 2-D array of numbers, images x dimensions, neither zero; "
                            f"got {x.dtype} of shape {x.shape}")
        if not np.isfinite(x).all():
            row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise UserError(f"{path}: features hold values that are not finite (NaN or inf), first in row {row}")
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
        off = np.flatnonzero((np.abs(norms - 1) > UNIT_TOLERANCE) & (norms != 0))
        if off.size:  # descriptors are L2-normalised (a blank image's is zero): the SVMs' C is set for them
            raise UserError(f"{path}: features must be L2-normalised rows (Appendix B); row {off[0]} has norm "
                            f"{norms[off[0]]:.6g}")
        classes = _strings(path, arrays, "classes")
        if not classes:
            raise UserError(f"{path}: classes is empty")
        twice = next((name for i, name in enumerate(classes) if name in classes[:i]), None)
        if twice is not None:
            raise UserError(f"{path}: classes must be distinct; {twice} is listed twice")
        paths, splits = _strings(path, arrays, "paths", len(x)), _strings(path, arrays, "splits", len(x))
        odd = sorted(set(splits) - {"train", "test", ""})
        if odd:
            raise UserError(f"{path}: splits must be train, test or empty; got {odd[0]!r}")
        if "" in splits and len(set(splits)) > 1:  # the given split's protocol would leave the unsplit rows out
            raise UserError(f"{path}: splits must be all empty (splits drawn at random) or all train or test (a "
                            f"split given); {splits.count('')} of {len(splits)} are empty")
        return cls(x, _labels(path, arrays["labels"], len(x), len(classes)), paths, splits, classes,
                   _strings(path, arrays, "class_names", len(classes)), _settings(path, arrays["settings"]),
                   _strings(path, arrays, "skipped"))


#: How far from 1 a stored descriptor's norm may be (float32 rounding, float16 storage).
UNIT_TOLERANCE = 1e-3


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
    """The JSON object stored as ``settings``, its sizes (a raw-pixel ``side``, the ``scales`` Q) checked whole
    numbers in range."""
    try:
        settings = json.loads(str(value.item())) if value.ndim == 0 and value.dtype.kind == "U" else None
    except (ValueError, RecursionError):  # not JSON, an integer of thousands of digits, arrays nested deep
        settings = None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: settings must be a JSON object (how the features were made)")
    for key, several in (("side", False), ("scales", True)):
        value = settings.get(key)
        sizes = (value if isinstance(value, list) else []) if several else [value]
        if value is not None and not (sizes and all(is_whole(v) and 1 <= v <= MAX_SIDE for v in sizes)):
            raise UserError(f"{path}: settings {key} must be {'a list of ' if several else ''}whole numbers of "
                            f"pixels from 1 to {MAX_SIDE}; got {str(value)[:80]}")
    return settings


# ---- partial extractions ---------------------------------------------------------------


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
        arrays = read_npz(path, ("done", "skipped", "key"), "features file")
        if str(arrays["key"]) != fresh.key or set(fresh.arrays) - set(arrays):
            raise UserError(f"{path}: a partial extraction with other nets, images (or files changed since), scales "
                            "or precision; give the same settings to continue it, or delete it")
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


def extraction_key(nets: Sequence[FeatureNet], images: ImageSet, scales: Sequence[int],
                   dtype: torch.dtype | None) -> str:
    """What the per-image descriptors depend on, as JSON: the nets' weights, the images (each file's path, size
    and time of change: a file rewritten since is described again), the scales and the precision."""
    files = hashlib.blake2b(digest_size=16)
    for path in images.paths:
        try:
            stat = os.stat(path)
            files.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode(errors="surrogateescape"))
        except OSError:  # not a file of its own (a region of one) or gone: its path alone
            files.update(f"{path}\n".encode(errors="surrogateescape"))
    return json.dumps({"nets": [n.digest for n in nets], "files": files.hexdigest(), "scales": list(scales),
                       "tap": TAP, "precision": str(dtype or torch.float32).removeprefix("torch.")})
