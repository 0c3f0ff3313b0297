"""Reading a ``.npz`` file of plain arrays (no pickles): a missing, damaged or foreign file is one line
naming it, never a traceback."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from verydeep.errors import MissingFileError, UserError


def read_npz(path: str | Path, keys: Sequence[str], kind: str) -> dict[str, np.ndarray]:
    """Every array of the ``kind`` file (e.g. "features file") at ``path``, which must hold ``keys``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a {kind}")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such {kind}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # else numpy takes any other file for a pickle, and says so
        raise UserError(f"{path}: not a {kind} (not a .npz archive: it begins {head!r})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    # zipfile says NotImplementedError of a compression it lacks, RuntimeError of an encrypted member
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, RuntimeError, zipfile.BadZipFile,
            zlib.error) as error:
        raise UserError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from error
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise UserError(f"{path}: not a verydeep {kind} (no {', '.join(missing)})")
    return arrays
