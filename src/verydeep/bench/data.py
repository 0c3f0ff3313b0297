"""The bench's images (``--data``, Sec. 3.1's training crops): links to a dataset's class folders, else
generated JPEGs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from verydeep.data.datasets import DECODE_ERRORS, ImageFolder, find_split
from verydeep.data.decode import image_size
from verydeep.errors import UserError
from verydeep.eval.nets import paper_scales

#: Images the bench trains on when present, beside the repository.
DEFAULT_DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "imagenette"


def _headers_read(split: Path) -> Iterator[tuple[Path, bool]]:
    """Each image file of ``split``'s class folders, in order, and whether its header reads."""
    for path, _ in ImageFolder(split, None).samples:
        try:
            image_size(path)
            yield Path(path), True
        except DECODE_ERRORS:
            yield Path(path), False


def readable_images(split: Path, wanted: int) -> tuple[int, int]:
    """The images of ``split``'s class folders whose headers read, counted up to ``wanted``, and the
    unreadable files met on the way."""
    readable = unreadable = 0
    for _, ok in _headers_read(split):
        if readable == wanted:
            break
        readable, unreadable = readable + ok, unreadable + (not ok)
    return readable, unreadable


def first_photo(root: Path) -> Path:
    """The first training image of the bench's data whose header reads (any image format): the photo its
    dense and multi-crop evaluation times."""
    photo = next((path for path, ok in _headers_read(root / "train") if ok), None)
    if photo is None:
        raise UserError(f"{root}: no readable training image")
    return photo


def bench_data(data: Path | None, scratch: Path, size: int, count: int) -> tuple[Path, str]:
    """A dataset folder under ``scratch`` (train/ and val/): links to ``data``'s class folders, which hold
    ``count`` readable training images, else ``count`` generated 4:3 JPEGs in 10 classes, their short side 1.2
    times the training scale."""
    root = scratch / "data"
    root.mkdir()
    if data is not None:
        train = find_split(data, "train")
        readable, unreadable = readable_images(train, count)
        if readable < count:
            raise UserError(f"--data {data}: {readable} readable training images ({unreadable} files unreadable), "
                            f"fewer than the {count} the bench's training steps need (fewer with a smaller --batch "
                            "or --rounds)")
        try:
            val = find_split(data, "val")
        except UserError:
            val = train
        (root / "train").symlink_to(train.resolve(), target_is_directory=True)
        (root / "val").symlink_to(val.resolve(), target_is_directory=True)
        return root, str(data)
    rng = np.random.default_rng(0)
    side = round(1.2 * paper_scales(size)[0])
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
        for split in ("train", "val"):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < 10:
                img.save(folder / f"{i}.jpg", quality=90)
    return root, f"{count} generated {side * 4 // 3}x{side} JPEGs"
