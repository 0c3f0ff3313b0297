"""The bench's images (``--data``, Sec. 3.1's training crops): links to a dataset's class folders, else
generated JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from verydeep.bench.settings import test_scales
from verydeep.data.datasets import find_split
from verydeep.errors import UserError

#: Images the bench trains on when present, beside the repository.
DEFAULT_DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "imagenette"


def bench_data(data: Path | None, scratch: Path, size: int, count: int) -> tuple[Path, str]:
    """A dataset folder under ``scratch`` (train/ and val/): links to ``data``'s class folders, else
    ``count`` generated 4:3 JPEGs in 10 classes, their short side 1.2 times the training scale."""
    root = scratch / "data"
    root.mkdir()
    if data is not None:
        train = find_split(data, "train")
        try:
            val = find_split(data, "val")
        except UserError:
            val = train
        (root / "train").symlink_to(train.resolve(), target_is_directory=True)
        (root / "val").symlink_to(val.resolve(), target_is_directory=True)
        return root, str(data)
    rng = np.random.default_rng(0)
    side = round(1.2 * test_scales(size)[0])
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
        for split in ("train", "val"):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < 10:
                img.save(folder / f"{i}.jpg", quality=90)
    return root, f"{count} generated {side * 4 // 3}x{side} JPEGs"
