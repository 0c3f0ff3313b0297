"""The posteriors file, ``posteriors.npz``: what ``eval --out`` writes beside ``results.json`` and what
the reproduction caches each net's evaluation in (``eval/NAME/``), written and read here only.

Plain numpy, no pickles: ``targets`` (N,), ``paths`` (N,) and ``readable`` (N,), the mask of the images
that were read, over all the images in the data's order; every posterior array computed, (N, classes)
in float32 as computed, by net, kind and Q (``net0_dense_Q256``: NaN rows for unread images), from which
every row can be recomputed exactly (float16 would tie and reorder near-equal classes, and so change
top-k errors); and optionally each row's own posteriors, (readable, classes) in float32 as
computed, ``row0`` ... in the order of ``row_names``: what fusing rows afterwards and the paired test
need, exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from verydeep.errors import UserError
from verydeep.eval.rows import Posteriors
from verydeep.io.atomic import atomic_write
from verydeep.io.npz import read_npz

#: The key of a posterior array of net i, kind and Q.
ARRAY_KEY = re.compile(r"net\d+_[a-z]+_Q\d+")


def save_posteriors(path: str | Path, posteriors: Posteriors, rows: bool = False) -> Path:
    """Write ``posteriors`` to ``path`` (replaced whole or not at all); each row's posteriors too with ``rows``."""
    return atomic_write(path, posteriors_writer(posteriors, rows))


def posteriors_writer(posteriors: Posteriors, rows: bool = False) -> Callable[[str], None]:
    """What writes ``posteriors`` (:func:`save_posteriors`) to the file it is given."""
    names = list(posteriors.rows) if rows else []
    arrays = {key: array.astype(np.float32) for key, array in posteriors.arrays.items()}
    kept_rows = {f"row{j}": posteriors.rows[name].astype(np.float32) for j, name in enumerate(names)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, targets=posteriors.targets, paths=np.array(posteriors.paths, dtype=str),
                     readable=posteriors.readable, row_names=np.array(names, dtype=str), **arrays, **kept_rows)

    return write


def load_posteriors(path: str | Path) -> Posteriors:
    """The :class:`Posteriors` of a file :func:`save_posteriors` wrote (``rows`` empty if it kept none); a
    missing, damaged or foreign file is one line naming it."""
    saved = read_npz(path, ("targets", "paths", "readable", "row_names"), "posteriors file")
    names = saved["row_names"].tolist()
    missing = [f"row{j}" for j in range(len(names)) if f"row{j}" not in saved]
    if missing:
        raise UserError(f"{path}: not a verydeep posteriors file (no {', '.join(missing)})")
    _check_arrays(path, saved)
    return Posteriors(arrays={key: array for key, array in saved.items() if ARRAY_KEY.fullmatch(key)},
                      targets=saved["targets"], paths=saved["paths"].tolist(), readable=saved["readable"],
                      rows={name: saved[f"row{j}"] for j, name in enumerate(names)})


def _check_arrays(path: str | Path, saved: dict[str, np.ndarray]) -> None:
    """Every array of a posteriors file as :func:`save_posteriors` writes it: the per-image arrays of one length N,
    ``readable`` a mask, each posterior array (N or the readable count, classes) with finite values in [0, 1] on
    the readable images and every readable target one of its classes; else one line naming the file and array."""
    targets, readable = saved["targets"], saved["readable"]
    n = len(targets)
    shapes = {key: saved[key].shape for key in ("targets", "paths", "readable", "row_names")}
    if any(len(shape) != 1 for shape in shapes.values()) or {shapes["paths"][0], shapes["readable"][0]} != {n}:
        raise UserError(f"{path}: targets, paths, readable and row_names must be lists, the first three of one "
                        f"length; got shapes {shapes}")
    if readable.dtype != bool or targets.dtype.kind not in "iu":
        raise UserError(f"{path}: readable must be booleans and targets integers; got {readable.dtype} and "
                        f"{targets.dtype}")
    labels = targets[readable]
    arrays = {key: n for key in saved if ARRAY_KEY.fullmatch(key)}  # a row for every image, NaN if unread
    arrays |= {f"row{j}": len(labels) for j in range(len(saved["row_names"]))}  # a row for every image read
    for key, rows in arrays.items():
        whole = saved[key]
        if whole.ndim != 2 or whole.shape[0] != rows or whole.dtype.kind != "f":
            raise UserError(f"{path}: {key} must be {rows} rows of class posteriors; got {whole.dtype} of shape "
                            f"{whole.shape}")
        values = whole[readable] if ARRAY_KEY.fullmatch(key) else whole
        if not (np.isfinite(values).all() and values.min(initial=0) >= 0 and values.max(initial=0) <= 1):
            raise UserError(f"{path}: {key} holds posteriors that are not finite numbers in [0, 1]")
        if len(labels) and not (labels.min() >= 0 and labels.max() < whole.shape[1]):
            raise UserError(f"{path}: targets outside the {whole.shape[1]} classes of {key}: from {labels.min()} to "
                            f"{labels.max()}")
