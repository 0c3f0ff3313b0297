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
    names = list(posteriors.rows) if rows else []
    arrays = {key: array.astype(np.float32) for key, array in posteriors.arrays.items()}
    kept_rows = {f"row{j}": posteriors.rows[name].astype(np.float32) for j, name in enumerate(names)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, targets=posteriors.targets, paths=np.array(posteriors.paths, dtype=str),
                     readable=posteriors.readable, row_names=np.array(names, dtype=str), **arrays, **kept_rows)

    return atomic_write(path, write)


def load_posteriors(path: str | Path) -> Posteriors:
    """The :class:`Posteriors` of a file :func:`save_posteriors` wrote (``rows`` empty if it kept none); a
    missing, damaged or foreign file is one line naming it."""
    saved = read_npz(path, ("targets", "paths", "readable", "row_names"), "posteriors file")
    names = saved["row_names"].tolist()
    missing = [f"row{j}" for j in range(len(names)) if f"row{j}" not in saved]
    if missing:
        raise UserError(f"{path}: not a verydeep posteriors file (no {', '.join(missing)})")
    return Posteriors(arrays={key: array for key, array in saved.items() if ARRAY_KEY.fullmatch(key)},
                      targets=saved["targets"], paths=saved["paths"].tolist(), readable=saved["readable"],
                      rows={name: saved[f"row{j}"] for j, name in enumerate(names)})
