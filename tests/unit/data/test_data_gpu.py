"""Decoding on the device: workers plan and send bytes, ``decode_batch`` decodes and cuts.

Everything runs with ``device=cpu`` too (torchvision's libjpeg standing in for nvJPEG); the
nvJPEG checks need CUDA and are skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import photo
from PIL import Image
from torch.utils.data import DataLoader

from verydeep.data import Batch, CenterCropTransform, ImageFolder, RescaleTransform, TrainTransform, collate, gpu
from verydeep.data.gpu import Encoded, EncodedTransform, collate_encoded, decode_batch, resolve_decode
from verydeep.data.transforms import cut
from verydeep.errors import UserError

CUDA = pytest.mark.gpu
CPU = torch.device("cpu")


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


def both_paths(root: Path, transform, indices: list[int], device: torch.device = CPU) -> tuple[Batch, Batch]:
    """The same samples, each drawn from ``Generator(seed=index)``, through the CPU transform +
    ``collate`` and through ``EncodedTransform`` + ``collate_encoded`` + ``decode_batch``."""
    cpu = ImageFolder(root, transform)
    encoded = ImageFolder(root, EncodedTransform(transform))

    def seeded(i: int) -> torch.Generator:
        return torch.Generator().manual_seed(i)

    expected = collate([cpu.load(i, seeded(i)) for i in indices])
    got = decode_batch(collate_encoded([encoded.load(i, seeded(i)) for i in indices]), device)
    return expected, got


@pytest.mark.parametrize(("transform", "tolerance"), [(TrainTransform(96, (128, 200)), 1),
                                                     (TrainTransform(96, (112, 144), fast=False), 4)],
                         ids=["fast", "reference"])
def test_encoded_train_transform_gives_the_cpu_crops(tmp_path, transform, tolerance):
    """Same generators, same crops and flips, as long as the CPU path decodes at full size too
    (k = 1; the device always does): here by the scale (the fast path), or with ``fast=False``
    at a scale where the fast path would decode at 1/2. The pixels differ only by the
    resamplers' rounding: torch's uint8 kernel against float and round (1 grey level), or
    Pillow's bilinear resize (4 grey levels; means under 0.1)."""
    paths = folder(tmp_path)
    expected, got = both_paths(tmp_path, transform, list(range(len(paths))))
    assert got.images.shape == expected.images.shape == (6, 3, 96, 96)
    assert got.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.labels, expected.labels) and got.skipped == expected.skipped
    assert sorted(got.skipped) == sorted([str(paths["truncated"]), str(paths["cut"])])
    diff = (got.images.int() - expected.images.int()).abs()
    assert diff.float().mean() < 2 and diff.max() <= tolerance


@pytest.mark.parametrize("transform", [RescaleTransform(160), CenterCropTransform(150, 128)], ids=["rescale", "center"])
def test_encoded_test_transforms_give_the_cpu_images(tmp_path, transform):
    """Whole images rescaled to Q (a batch each: their sizes differ) and central crops."""
    folder(tmp_path)
    names = [str(p) for p, _ in ImageFolder(tmp_path, transform).samples]
    for i in range(len(names)):
        expected, got = both_paths(tmp_path, transform, [i])
        assert got.images.shape == expected.images.shape and got.skipped == expected.skipped
        if len(got.images):
            assert (got.images.int() - expected.images.int()).abs().max() <= 1, names[i]


def test_workers_send_bytes_for_nvjpeg_and_cut_images_for_the_rest(tmp_path):
    paths = folder(tmp_path)
    dataset = ImageFolder(tmp_path, EncodedTransform(TrainTransform(96, (112, 112))))
    loader = DataLoader(dataset, batch_size=len(dataset), num_workers=2, collate_fn=collate_encoded)
    (batch,) = list(loader)
    kinds = {Path(p).name: tuple(payload.shape) for payload, p in zip(batch.payloads(), batch.paths, strict=True)}
    sizes = {f"{i}.jpg": (paths[f"jpeg{i}"].stat().st_size,) for i in range(3)}  # the JPEG files' bytes
    assert kinds == {**sizes, "p.png": (3, 96, 96), "cmyk.jpg": (3, 96, 96), "rot.jpg": (3, 96, 96)}
    assert all(plan.k == 1 for plan, n in zip(batch.plans, batch.lengths, strict=True) if n)
    # a header cut short, and data cut short (no EOI marker: nvJPEG would decode it silently)
    assert sorted(batch.skipped) == sorted([str(paths["truncated"]), str(paths["cut"])])
    assert batch.labels.tolist() == [0, 0, 0, 0, 1, 1]
    out = decode_batch(batch, CPU)
    assert out.images.shape == (6, 3, 96, 96) and out.labels.tolist() == [0, 0, 0, 0, 1, 1]


def test_a_file_the_device_refuses_is_decoded_on_the_cpu_or_named(tmp_path, monkeypatch):
    """The batched decode fails; file by file, the device refuses ``jpeg1`` (read on the CPU
    instead) and the cut JPEG, which no decoder reads."""
    paths = folder(tmp_path)
    transform = EncodedTransform(TrainTransform(96, (112, 144)))
    items = [(transform(paths[n], torch.Generator().manual_seed(i)), i, str(paths[n]))
             for i, n in enumerate(["jpeg0", "jpeg1"])]
    cut = torch.frombuffer(bytearray(paths["cut"].read_bytes()), dtype=torch.uint8)
    items.append((Encoded(cut, items[0][0].plan), 2, str(paths["cut"])))
    refused = items[1][0].payload.numel()
    decode_jpeg = gpu.decode_jpeg

    def device_decoder(data, **options):
        if isinstance(data, list) or data.numel() == refused:
            raise RuntimeError("refused")
        return decode_jpeg(data, **options)

    monkeypatch.setattr(gpu, "decode_jpeg", device_decoder)
    batch = decode_batch(collate_encoded(items), CPU)
    assert batch.images.shape == (2, 3, 96, 96) and batch.labels.tolist() == [0, 1]
    assert batch.skipped == [str(paths["cut"])]
    cpu = TrainTransform(96, (112, 144))(paths["jpeg1"], torch.Generator().manual_seed(1))
    assert (batch.images[1].int() - cpu.int()).abs().max() <= 1


def test_resolve_decode():
    cuda = torch.device("cuda", 0)
    assert resolve_decode("auto", cuda) == "gpu" and resolve_decode("auto", CPU) == "cpu"
    assert resolve_decode("gpu", cuda) == "gpu" and resolve_decode("cpu", cuda) == "cpu"
    with pytest.raises(UserError, match="^--decode gpu needs a CUDA device; got cpu$"):
        resolve_decode("gpu", CPU)
    with pytest.raises(UserError, match="--decode"):
        resolve_decode("nvjpeg", cuda)


@CUDA
def test_gpu_decode_and_cut_on_the_device(tmp_path):
    paths = folder(tmp_path)
    dataset = ImageFolder(tmp_path, EncodedTransform(TrainTransform(96, (112, 144))))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_encoded, pin_memory=True)
    images, skipped = 0, []
    for encoded in loader:
        batch = decode_batch(encoded, torch.device("cuda"))
        assert batch.images.device.type == "cuda" and batch.images.dtype == torch.uint8
        assert batch.images.shape[1:] == (3, 96, 96) and len(batch.labels) == batch.images.shape[0]
        assert batch.labels.device.type == "cuda"
        images += batch.images.shape[0]
        skipped += batch.skipped
    assert images == 6 and sorted(skipped) == sorted([str(paths["truncated"]), str(paths["cut"])])


@CUDA
def test_gpu_decode_matches_the_cpu_path(tmp_path):
    """nvJPEG against libjpeg-turbo on the same plans (k = 1 on both paths): within a mean of
    1.5 grey levels (the decoders' IDCT and chroma upsampling differ)."""
    folder(tmp_path)
    expected, got = both_paths(tmp_path, TrainTransform(crop=96, scale=(128, 200)), list(range(8)),
                               torch.device("cuda"))
    assert got.skipped == expected.skipped and torch.equal(got.labels.cpu(), expected.labels)
    diff = (got.images.cpu().int() - expected.images.int()).abs().float()
    assert diff.mean() < 1.5 and diff.max() <= 16


@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda"), marks=CUDA)], ids=["cpu", "cuda"])
def test_a_batch_is_each_image_resampled_rounded_and_mirrored_on_its_own(tmp_path, device):
    """``decode_batch`` resamples every image into one block and rounds, converts and mirrors the batch at
    once; bit for bit what doing it image by image gives (float box, antialiased bilinear, round, clip, flip)."""
    paths = folder(tmp_path)
    transform = EncodedTransform(TrainTransform(96, (100, 300)))
    generator = torch.Generator().manual_seed(3)
    jpegs = [paths[f"jpeg{i}"] for i in range(3)] * 3  # nine samples, upscaled and downscaled, mirrored or not
    encoded = collate_encoded([(transform(p, generator), 0, str(p)) for p in jpegs])
    assert {plan.flip for plan in encoded.plans} == {True, False}
    got = decode_batch(encoded, device).images
    expected = []
    for data, plan in zip(encoded.payloads(), encoded.plans, strict=True):
        image = gpu.device_decode([data], device)[0]
        left, top, right, bottom = plan.box
        region = image[:, top:bottom, left:right][None].float()
        region = torch.nn.functional.interpolate(region, size=plan.out[::-1], mode="bilinear", antialias=True)[0]
        region = cut(region.round().clamp(0, 255).to(torch.uint8), plan.cut)  # a small image: rescaled whole, cut
        expected.append(region.flip(-1) if plan.flip else region)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.stack(expected))
