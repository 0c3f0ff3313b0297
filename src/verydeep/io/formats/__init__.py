"""Readers of the published weights' foreign formats (PAPER.md Sec. 8), each into torchvision's state dict keys,
which are ours: torchvision's own files, the authors' Caffe models, Keras' HDF5 files."""

from __future__ import annotations

import zipfile
from pathlib import Path

from verydeep.errors import UserError

#: How many times its stored bytes compressed weights may unpack to: trained float32 weights are close to
#: random bits, which deflate or gzip shrink by a few percent only; 4 leaves room for float16 and shuffling.
PACKING = 4
#: Bytes allowed beyond that: small entries and datasets (headers, zero biases) compress far better.
MARGIN = 1 << 20


def refuse_unpacking_beyond_weights(path: Path, archive: zipfile.ZipFile) -> None:
    """A zip archive (a torch file, a ``.keras`` file) whose entries claim to unpack to more than weights stored in
    them could (:data:`PACKING`) is a :class:`UserError`, before anything is read: the claims are the zip's own, the
    stored bytes cannot exceed the archive, and what an entry unpacks to is held in memory whole."""
    size = path.stat().st_size
    for entry in archive.infolist():
        stored = min(entry.compress_size, size)
        if entry.file_size > PACKING * stored + MARGIN:
            raise UserError(f"{path}: {entry.filename} would unpack {stored} bytes into {entry.file_size}, more than "
                            "weights could hold: refused unread")
