"""GPU input path (issue 3): nvJPEG batch decode and tensor-op augmentation.

The tensor maths and the byte-reading workers are checked on the CPU; decoding on the device
needs CUDA and is skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from verydeep.data import ImageFolder, TrainTransform, collate
from verydeep.data.gpu import (
    EncodedImages,
    GpuTrainAugment,
    collate_encoded,
    random_resized_crops,
)
from verydeep.data.transforms import to_tensor

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8))
    return coarse.resize((w, h), Image.Resampling.BICUBIC)


def folder(root: Path) -> dict[str, Path]:
    """Plain JPEGs, a PNG, a CMYK and an EXIF-rotated JPEG; JPEGs cut in the header and in the data."""
    paths = {f"jpeg{i}": root / "a" / f"{i}.jpg" for i in range(3)}
    paths |= {"png": root / "a" / "p.png", "cmyk": root / "b" / "cmyk.jpg",
              "rotated": root / "b" / "rot.jpg", "truncated": root / "b" / "trunc.jpg",
              "cut": root / "b" / "cut.jpg"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        photo(300 + 20 * i, 240, i).save(paths[f"jpeg{i}"], quality=92)
    photo(280, 260).save(paths["png"])
    photo(260, 250).convert("CMYK").save(paths["cmyk"], quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(300, 250).save(paths["rotated"], exif=exif, quality=92)
    data = paths["jpeg0"].read_bytes()
    paths["truncated"].write_bytes(data[:500])
    paths["cut"].write_bytes(data[: len(data) * 6 // 10])
    return paths


def test_tensor_crops_equal_the_cpu_transform(tmp_path):
    """Same draws, same maths: the tensor path matches TrainTransform within 1 grey level."""
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    for i, p in enumerate(paths):
        photo(200 + 30 * i, 180, i).save(p)
    cpu = TrainTransform(crop=96, scale=(112, 160))
    torch.manual_seed(3)
    expected = torch.stack([cpu(p) for p in paths])
    torch.manual_seed(3)
    images = [to_tensor(Image.open(p).convert("RGB")) for p in paths]
    got = random_resized_crops(images, crop=96, scale=(112, 160))
    assert got.shape == (4, 3, 96, 96) and got.dtype == torch.uint8
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got.int() - expected.int()).abs().max() <= 1


def test_workers_send_bytes_for_nvjpeg_and_pixels_for_the_rest(tmp_path):
    paths = folder(tmp_path)
    samples = ImageFolder(tmp_path, TrainTransform(96, (112, 112))).samples
    loader = DataLoader(EncodedImages(samples), batch_size=len(samples), collate_fn=collate_encoded)
    (batch,) = list(loader)
    kinds = {Path(p).name: payload.dim() for payload, p in zip(batch.payloads(), batch.paths, strict=True)}
    assert kinds == {"0.jpg": 1, "1.jpg": 1, "2.jpg": 1,  # JPEG bytes
                     "p.png": 3, "cmyk.jpg": 3, "rot.jpg": 3}  # decoded upright RGB by Pillow
    rotated = batch.payloads()[batch.paths.index(str(paths["rotated"]))]
    assert rotated.shape == (3, 300, 250)
    # a header cut short, and data cut short (no EOI marker: nvJPEG would decode it silently)
    assert sorted(batch.skipped) == sorted([str(paths["truncated"]), str(paths["cut"])])
    assert batch.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert batch.encoded.numel() == sum(paths[f"jpeg{i}"].stat().st_size for i in range(3))
    out = GpuTrainAugment(crop=96, scale=(112, 144), device=torch.device("cpu"))(batch)
    assert out.images.shape == (6, 3, 96, 96) and out.labels.tolist() == [0, 0, 0, 0, 1, 1]


def test_augment_falls_back_file_by_file_and_skips_what_no_decoder_reads(tmp_path):
    """On the CPU device too: the batched decode fails on the cut JPEG, the others still come out."""
    paths = folder(tmp_path)
    names = ["jpeg0", "cut", "jpeg1"]
    encoded = collate_encoded([
        (torch.frombuffer(bytearray(paths[n].read_bytes()), dtype=torch.uint8), i, str(paths[n]))
        for i, n in enumerate(names)
    ])
    batch = GpuTrainAugment(crop=96, scale=(112, 144), device=torch.device("cpu"))(encoded)
    assert batch.images.shape == (2, 3, 96, 96) and batch.labels.tolist() == [0, 2]
    assert batch.skipped == [str(paths["cut"])]


@CUDA
def test_gpu_augment_decodes_and_crops_on_the_device(tmp_path):
    paths = folder(tmp_path)
    samples = ImageFolder(tmp_path, TrainTransform(96, (112, 112))).samples
    loader = DataLoader(EncodedImages(samples), batch_size=4, num_workers=2,
                        collate_fn=collate_encoded, pin_memory=True)
    augment = GpuTrainAugment(crop=96, scale=(112, 144), device=torch.device("cuda"))
    images, skipped = 0, []
    for encoded in loader:
        batch = augment(encoded)
        assert batch.images.device.type == "cuda" and batch.images.dtype == torch.uint8
        assert batch.images.shape[1:] == (3, 96, 96) and len(batch.labels) == batch.images.shape[0]
        images += batch.images.shape[0]
        skipped += batch.skipped
    assert images == 6 and sorted(skipped) == sorted([str(paths["truncated"]), str(paths["cut"])])


@CUDA
def test_gpu_decode_matches_the_cpu_path(tmp_path):
    """nvJPEG against libjpeg-turbo on the same crop: within a mean of 1.5 grey levels."""
    paths = folder(tmp_path)
    cpu = TrainTransform(crop=96, scale=(112, 144))  # k = 1 for these sizes: no draft decoding
    jpegs = [paths[f"jpeg{i}"] for i in range(3)]
    torch.manual_seed(0)
    expected = collate([(cpu(p), 0, str(p)) for p in jpegs]).images
    torch.manual_seed(0)
    encoded = collate_encoded([(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8), 0, str(p))
                               for p in jpegs])
    got = GpuTrainAugment(96, (112, 144), device=torch.device("cuda"))(encoded).images.cpu()
    diff = (got.int() - expected.int()).abs().float()
    assert diff.mean() < 1.5 and diff.max() <= 16
