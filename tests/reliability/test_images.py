"""Mutated images through training and evaluation: unreadable files are skipped, counted and named
once; every file that still decodes is used.

Hundreds of files are made deterministically from real photos (the JPEGs of the shared ImageNet
samples, else generated ones) by flipping bytes in the header and in the image data, cutting them
short, swapping headers, writing random bytes, declaring absurd sizes and so on. The rule the
data code must follow: a file is *bad* when no decoder reads it, that is neither Pillow
(``Image.open(...).load()``) nor verydeep's own decoder (the whole image, at full size); a
mutated file that still decodes to an image is *good*, and is trained and evaluated on like any
other. ``VERYDEEP_RELIABILITY=full`` makes more mutations.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, photo, tiny
from PIL import Image

from verydeep.data.datasets import LabelledImages
from verydeep.data.decode import ImageFile, load_region
from verydeep.eval.evaluate import evaluate
from verydeep.train import train

pytestmark = pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning",  # garbage EXIF
                                        "ignore::PIL.Image.DecompressionBombWarning")

MUTATIONS = 1000 if os.environ.get("VERYDEEP_RELIABILITY") == "full" else 220
CLASSES = 4
BATCH = 16
PNG_SIGNATURE, JPEG_SOI, JPEG_EOI = b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd9"

Mutation = Callable[[bytes, np.random.Generator], bytes]


# ---- source images --------------------------------------------------------------------------------


def photos(count: int) -> list[Image.Image]:
    """``count`` small RGB photos, 40-64 pixels a side: the shared ImageNet samples shrunk, else generated."""
    found = sorted(SHARED.glob("imagenet-samples/*.JPEG"))
    out = []
    for i in range(count):
        size = (40 + (i * 7) % 25, 40 + (i * 11) % 25)
        if found:
            with Image.open(found[i % len(found)]) as img:
                out.append(img.convert("RGB").resize(size))
        else:
            out.append(photo(*size, seed=i))
    return out


def encodings(img: Image.Image, i: int) -> tuple[bytes, str]:
    """One of the ways photos are stored, by ``i``: JPEG (baseline, progressive, 4:4:4 with restart
    markers, greyscale, EXIF-rotated) or PNG; with the file's usual extension."""
    buffer, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6
    options: list[tuple[Image.Image, str, dict]] = [
        (img, "JPEG", dict(quality=90)), (img, "JPEG", dict(quality=80, progressive=True)),
        (img, "JPEG", dict(quality=85, subsampling=0, restart_marker_rows=1)), (img.convert("L"), "JPEG", {}),
        (img, "JPEG", dict(exif=exif)), (img, "PNG", {}), (img.convert("P"), "PNG", {}),
    ]
    image, fmt, kwargs = options[i % len(options)]
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue(), ".png" if fmt == "PNG" else (".jpg", ".JPEG", ".jpeg")[i % 3]


# ---- mutations --------------------------------------------------------------------------------------


def header_end(data: bytes) -> int:
    """Where the image data starts: after a JPEG's SOS segment, or a PNG's first IDAT tag."""
    if data.startswith(PNG_SIGNATURE):
        return data.index(b"IDAT") + 4
    pos = 2
    while data[pos + 1] != 0xDA:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")


def flip(data: bytes, rng: np.random.Generator, start: int, stop: int, count: int) -> bytes:
    out = bytearray(data)
    for offset in rng.integers(start, stop, count):
        out[offset] ^= int(rng.integers(1, 256))
    return bytes(out)


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def frame_header(data: bytes) -> int:
    """Where a JPEG's frame header (SOF0, SOF1 or SOF2) starts."""
    return next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))


def set_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG's frame header or a PNG's IHDR (its CRC made right again) declaring another size."""
    out = bytearray(data)
    if data.startswith(PNG_SIGNATURE):
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(out[12:29]))
        return bytes(out)
    frame = frame_header(data)
    out[frame + 5 : frame + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return bytes(out)


def stray_marker(data: bytes, rng: np.random.Generator) -> bytes:
    """A marker written into the last rows' image data, where a whole decode meets it below many crops."""
    start = header_end(data)
    pos = int(rng.integers(len(data) - (len(data) - start) // 5, len(data) - 4))
    return data[:pos] + bytes([0xFF, int(rng.integers(0x01, 0xD0))]) + data[pos + 2 :]


def cut(data: bytes, rng: np.random.Generator) -> bytes:
    """Cut at 0 bytes, inside the signature, mid-header, at the data's start, mid-data, before the end."""
    start = header_end(data)
    lengths = [0, 1, 2, 7, start // 2, start, int(rng.integers(start, len(data))), len(data) - 2, len(data) - 1]
    return data[: lengths[int(rng.integers(len(lengths)))]]


def cut_but_ended(data: bytes, rng: np.random.Generator) -> bytes:
    """Cut in the image data, then ended properly (a JPEG's EOI, a PNG's IEND chunk)."""
    head = data[: int(rng.integers(header_end(data), len(data) - 2))]
    return head + (b"\x00\x00\x00\x00IEND\xaeB`\x82" if data.startswith(PNG_SIGNATURE) else JPEG_EOI)


def swap_signature(data: bytes, rng: np.random.Generator) -> bytes:
    """A PNG signature on JPEG data, a JPEG SOI (and APP0 marker) on PNG data."""
    return PNG_SIGNATURE + data[2:] if data.startswith(JPEG_SOI) else JPEG_SOI + b"\xff\xe0" + data[8:]


def sizes(data: bytes, rng: np.random.Generator) -> bytes:
    """Zero, tiny, large, over the decompression-bomb limit, over libjpeg's or PNG's limits."""
    choices = [(0, 40), (40, 0), (1, 1), (7, 5), (3000, 2000), (60000, 60000), (65535, 65535), (20000, 20000)]
    if data.startswith(PNG_SIGNATURE):
        choices.append((2**31 - 1, 2**31 - 1))
    width, height = choices[int(rng.integers(len(choices)))]
    return set_size(data, width, height)


def damaged_fields(data: bytes, rng: np.random.Generator) -> bytes:
    """A PNG's IHDR field (depth, colour type, ...) changed with its CRC made right; a JPEG's frame
    header byte changed, or a garbage EXIF block put after its SOI."""
    out = bytearray(data)
    if data.startswith(PNG_SIGNATURE):
        out[int(rng.integers(24, 29))] = int(rng.choice([0, 1, 2, 3, 4, 6, 8, 16, int(rng.integers(256))]))
        out[29:33] = struct.pack(">I", zlib.crc32(out[12:29]))
        return bytes(out)
    if rng.random() < 0.5:
        return JPEG_SOI + b"\xff\xe1\x00\xc8Exif\x00\x00" + random_bytes(rng, 192) + data[2:]
    frame = frame_header(data)
    out[frame + 4 + int(rng.integers(0, 15))] = int(rng.integers(256))
    return bytes(out)


def runs(data: bytes, rng: np.random.Generator) -> bytes:
    """A run of bytes zeroed, deleted or inserted (random) at a random offset."""
    at, n = int(rng.integers(2, len(data))), int(rng.integers(1, 200))
    choice = int(rng.integers(3))
    run = (bytes(n), b"", random_bytes(rng, n))[choice]
    return data[:at] + run + data[at + (n if choice < 2 else 0) :]


def header_flips(data: bytes, rng: np.random.Generator) -> bytes:
    return flip(data, rng, 0, header_end(data), int(rng.integers(1, 4)))


def data_flips(data: bytes, rng: np.random.Generator) -> bytes:
    return flip(data, rng, header_end(data), len(data) - 2, int(rng.integers(1, 6)))


#: Every mutation, by name: (source bytes, generator) -> the file's bytes.
MUTATORS: dict[str, Mutation] = {
    "header-flip": header_flips,
    "data-flip": data_flips,
    "many-flips": lambda data, rng: flip(data, rng, 0, len(data), len(data) // 100 + 1),
    "stray-marker": lambda data, rng: (stray_marker if data.startswith(JPEG_SOI) else data_flips)(data, rng),
    "cut": cut,
    "cut-but-ended": cut_but_ended,
    "swapped-signature": swap_signature,
    "soi-then-garbage": lambda data, rng: JPEG_SOI + random_bytes(rng, int(rng.integers(1, 3000))),
    "random-bytes": lambda data, rng: random_bytes(rng, int(rng.integers(1, 5000))),
    "text": lambda data, rng: b"<html><body>404 Not Found</body></html>\n",
    "sizes": sizes,
    "fields": damaged_fields,
    "runs": runs,
    "appended": lambda data, rng: data + data[: int(rng.integers(1, len(data)))],
    "wrong-extension": lambda data, rng: data,
}

#: Extensions a good file may wrongly carry: Pillow identifies images by their content.
WRONG_EXTENSIONS = (".png", ".jpg", ".gif", ".webp", ".bmp", ".tif")


# ---- the oracle -------------------------------------------------------------------------------------


def readable(path: Path) -> bool:
    """Whether any decoder reads the file: Pillow, or verydeep's decoder on the whole image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                img.load()
            return True
        except Exception:  # noqa: BLE001 - any failure means Pillow cannot read it
            pass
        try:
            file = ImageFile(path)
            load_region(file, 1, (0, 0, *file.size), file.size)
            return True
        except Exception:  # noqa: BLE001
            return False


@dataclass
class Zoo:
    """A class-folder dataset of mutated and good files, named relative to its root."""

    root: Path
    bad: set[str]
    good: set[str]
    mutated: int

    def paths(self, names: set[str], split: str = "") -> set[str]:
        """The paths of ``names`` in ``split`` (all splits if empty)."""
        return {str(self.root / name) for name in names if name.startswith(split)}

    def copy(self, root: Path) -> Zoo:
        """The same files at ``root``."""
        shutil.copytree(self.root, root)
        return Zoo(root, self.bad, self.good, self.mutated)


def write_zoo(root: Path) -> Zoo:
    """``MUTATIONS`` mutated files (a quarter in ``val/``) and good ones, classed round-robin; the
    training split padded with good files to whole batches, so an epoch reads every file once. Also
    a hidden AppleDouble file and a text file, which are not images and must never be read."""
    rng = np.random.default_rng(0)
    sources = [encodings(img, i) for i, img in enumerate(photos(28))]
    kinds = list(MUTATORS)
    files: dict[str, bytes] = {}
    for i in range(MUTATIONS):
        kind = kinds[i % len(kinds)]
        data, ext = sources[int(rng.integers(len(sources)))]
        if kind == "wrong-extension":
            ext = next(e for e in rng.permutation(WRONG_EXTENSIONS) if e != ext.lower())
        files[f"{'val' if i % 4 == 3 else 'train'}/class{i % CLASSES}/{i:04d}-{kind}{ext}"] = MUTATORS[kind](data, rng)
    for split, count in (("val", 8), ("train", 8 + (-(8 + sum(n.startswith("train/") for n in files)) % BATCH))):
        for i in range(count):
            data, ext = sources[i % len(sources)]
            files[f"{split}/class{i % CLASSES}/good-{i:03d}{ext}"] = data
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "train/class0/._0000-photo.jpg").write_bytes(random_bytes(rng, 4096))
    (root / "train/class0/notes.txt").write_text("not an image\n")
    bad = {name for name in files if not readable(root / name)}
    return Zoo(root, bad, set(files) - bad, MUTATIONS)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return write_zoo(tmp_path_factory.mktemp("zoo") / "data")


# ---- what the data code did -----------------------------------------------------------------------------


@pytest.fixture
def reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Counter]:
    """Every read of a dataset item, also in DataLoader workers (forked, they inherit the patch),
    as a Counter of ``(path, used)``."""
    record, load = tmp_path / "reads.tsv", LabelledImages.load

    def recording_load(self: LabelledImages, index: int, generator: torch.Generator | None = None) -> tuple:
        image, label, path = load(self, index, generator)
        with open(record, "a") as f:
            f.write(f"{path}\t{image is not None}\n")
        return image, label, path

    monkeypatch.setattr(LabelledImages, "load", recording_load)
    return lambda: Counter((path, used == "True") for path, used in (line.split("\t")
                                                                     for line in record.read_text().splitlines()))


def named_once(messages: list[str], bad: set[str]) -> None:
    """Each bad file is named by exactly one message, by its path; no message names a stream."""
    named = Counter(m.removeprefix("skipped ").split(": unreadable image (")[0] for m in messages)
    assert named == Counter(bad), sorted(set(named) ^ bad)
    assert not [m for m in messages if "BytesIO" in m or " object at 0x" in m or "\n" in m]


def trained(zoo: Zoo, out: Path, reads: Callable[[], Counter], workers: int) -> tuple[int, int]:
    """Train an epoch on ``zoo``; check that every file was read once (training, then validation),
    used exactly when it is good, and each bad one counted. Returns the training files skipped (as
    counted) and used (as read)."""
    summary = train(tiny(zoo.root, out, batch_size=BATCH, workers=workers))
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    good, bad = zoo.paths(zoo.good, "train/"), zoo.paths(zoo.bad, "train/")
    assert summary.epochs == 1 and summary.steps == len(good | bad) // BATCH and np.isfinite(epoch["train_loss"])
    got = reads()
    expected = Counter({(str(zoo.root / name), name in zoo.good): 1 for name in zoo.good | zoo.bad})
    assert not sorted(set(got.items()) ^ set(expected.items()))
    assert epoch["skipped"] == len(bad)
    assert epoch["val_skipped"] == len(zoo.paths(zoo.bad, "val/"))
    assert epoch["val_images"] == len(zoo.paths(zoo.good, "val/"))
    return epoch["skipped"], sum(n for (path, used), n in got.items() if used and path in good)


def test_training_and_evaluation_skip_exactly_the_unreadable_files(zoo, tmp_path, reads, caplog):
    with caplog.at_level(logging.WARNING, logger="verydeep.data"):
        skipped, used = trained(zoo, tmp_path / "run", reads, workers=0)
        result = evaluate([tmp_path / "run"], zoo.root, workers=0, progress=False, batch_size=4)
    assert result.skipped == sorted(zoo.paths(zoo.bad, "val/"))
    assert result.images == len(zoo.paths(zoo.good, "val/")) and all(r.images == result.images for r in result.rows)
    named_once([r.getMessage() for r in caplog.records if r.name == "verydeep.data"], zoo.paths(zoo.bad))
    print(f"\nreliability: {zoo.mutated} mutated files and {len(zoo.good | zoo.bad) - zoo.mutated} intact ones, "
          f"{len(zoo.bad)} bad and {len(zoo.good)} good; training skipped {skipped} of "
          f"{len(zoo.paths(zoo.bad, 'train/'))} bad and used {used} of {len(zoo.paths(zoo.good, 'train/'))} good; "
          f"evaluation skipped {len(result.skipped)} of {len(zoo.paths(zoo.bad, 'val/'))} bad and scored "
          f"{result.images} of {len(zoo.paths(zoo.good, 'val/'))} good")


def test_with_workers_every_bad_file_is_counted_and_named_once(zoo, tmp_path, reads):
    """Two workers name the files they skip, each once, in a log that every process writes to, however many
    passes read them again (training's validation, then evaluation at two scales, each pass's workers new)."""
    zoo = zoo.copy(tmp_path / "data")  # paths this process has not named yet
    handler = logging.FileHandler(tmp_path / "data.log")
    logger = logging.getLogger("verydeep.data")
    logger.addHandler(handler)
    try:
        skipped, used = trained(zoo, tmp_path / "run", reads, workers=2)
        result = evaluate([tmp_path / "run"], zoo.root, ["dense"], [32, 40], workers=2, progress=False, batch_size=4)
        assert result.skipped == sorted(zoo.paths(zoo.bad, "val/"))
    finally:
        logger.removeHandler(handler)
        handler.close()
    named_once((tmp_path / "data.log").read_text().splitlines(), zoo.paths(zoo.bad))
    print(f"\nreliability, 2 workers: training skipped {skipped} and used {used}")
