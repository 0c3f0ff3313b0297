"""Training input on the GPU: nvJPEG batch decoding and the Sec. 3.1 augmentation as tensor ops.

At GPU training speeds the CPU's JPEG decoding is the bottleneck. Here DataLoader workers only
read file bytes (and check headers); the batch is decoded on the device by
``torchvision.io.decode_jpeg(device="cuda")`` and augmented there with the same maths as
:class:`~verydeep.data.TrainTransform` (S drawn per image, a square of ``region_side`` pixels
at a random position, bilinear-antialias resample to the crop, random flip). Files nvJPEG
cannot take (not JPEG, CMYK, EXIF-rotated, cut short) are decoded by Pillow in the workers;
unreadable ones are skipped and named, as on the CPU path.

    loader = DataLoader(EncodedImages(dataset.samples), batch_size=256, num_workers=8,
                        collate_fn=collate_encoded, pin_memory=True)
    augment = GpuTrainAugment(crop=224, scale=(256, 512), device=torch.device("cuda"))
    for encoded in loader:
        batch = augment(encoded)                       # uint8, channels_last, on the GPU
        x = to_input(batch.images, pre, pca_shift(len(batch.images), pre, 0.1))
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from verydeep.data.datasets import DECODE_ERRORS, Batch, batch_memory
from verydeep.data.transforms import (
    ImageFile,
    crop_box,
    decode,
    flip_coin,
    region_side,
    sample_scale,
    to_tensor,
)

log = logging.getLogger("verydeep.data")


def read_encoded(path: str | Path) -> Tensor:
    """File bytes (1-D uint8) for nvJPEG, or the Pillow-decoded upright RGB image (3, h, w).

    nvJPEG takes RGB or greyscale JPEGs without EXIF rotation that end in the EOI marker (it
    decodes a file cut short without complaint; Pillow names it instead).
    """
    file = ImageFile(path)
    if file.plain and file.data.endswith(b"\xff\xd9"):
        return torch.frombuffer(bytearray(file.data), dtype=torch.uint8)
    return to_tensor(decode(file.pillow()))


class EncodedImages(Dataset):
    """``(payload, label, path)`` for each ``(path, label)`` sample; payload ``None`` if unreadable."""

    def __init__(self, samples: Sequence[tuple[Path, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str]:
        path, label = self.samples[index]
        try:
            return read_encoded(path), label, str(path)
        except DECODE_ERRORS as error:
            log.warning("skipped %s: unreadable image (%s: %s)", path, type(error).__name__, error)
            return None, label, str(path)


class EncodedBatch(NamedTuple):
    """A batch as the workers send it: the JPEG files' bytes in one block (one shared-memory
    transfer, one pinned copy), the images Pillow decoded, labels, paths and skipped paths."""

    encoded: Tensor  # the JPEGs' bytes, one file after another
    lengths: list[int]  # bytes per sample; 0 where the sample is in ``decoded`` instead
    decoded: list[Tensor]  # the other samples, decoded upright RGB (3, h, w), in order
    labels: Tensor
    paths: list[str]
    skipped: list[str]

    def payloads(self) -> list[Tensor]:
        """Per sample: its JPEG bytes (a 1-D view into ``encoded``) or its decoded image."""
        sizes = [n for n in self.lengths if n]
        chunks = iter(torch.split(self.encoded, sizes) if sizes else ())
        images = iter(self.decoded)
        return [next(chunks) if n else next(images) for n in self.lengths]


def collate_encoded(batch: Sequence[tuple[Tensor | None, int, str]]) -> EncodedBatch:
    """Concatenate the JPEG bytes, keep decoded images apart; drop and name unreadable samples."""
    good = [(p, label, path) for p, label, path in batch if p is not None]
    jpegs = [p for p, _, _ in good if p.dim() == 1]
    encoded = batch_memory((sum(p.numel() for p in jpegs),))
    if jpegs:
        torch.cat(jpegs, out=encoded)
    return EncodedBatch(
        encoded=encoded,
        lengths=[p.numel() if p.dim() == 1 else 0 for p, _, _ in good],
        decoded=[p for p, _, _ in good if p.dim() == 3],
        labels=torch.tensor([label for _, label, _ in good], dtype=torch.int64),
        paths=[path for _, _, path in good],
        skipped=[path for p, _, path in batch if p is None],
    )


def _pillow_decode(data: Tensor) -> Tensor:
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
        return to_tensor(decode(img))


def decode_batch(encoded: EncodedBatch, device: torch.device) -> tuple[list[Tensor], list[int], list[str]]:
    """Decode a batch on ``device``: nvJPEG for byte payloads (one batched call; file by file
    when that fails, Pillow for a file nvJPEG rejects). Returns the images (3, h, w) uint8,
    the indices kept, and the paths of files no decoder could read."""
    images: dict[int, Tensor] = {}
    payloads = encoded.payloads()
    jpegs = [i for i, p in enumerate(payloads) if p.dim() == 1]
    for i, p in enumerate(payloads):
        if p.dim() == 3:
            images[i] = p.to(device, non_blocking=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        try:
            if jpegs:
                decoded = decode_jpeg([payloads[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
                images.update(zip(jpegs, decoded, strict=True))
        except RuntimeError:
            for i in jpegs:
                try:
                    images[i] = decode_jpeg(payloads[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    try:
                        images[i] = _pillow_decode(payloads[i]).to(device)
                    except DECODE_ERRORS as error:
                        log.warning("skipped %s: unreadable image (%s: %s)", encoded.paths[i],
                                    type(error).__name__, error)
    kept = sorted(images)
    failed = [path for i, path in enumerate(encoded.paths) if i not in images]
    return [images[i] for i in kept], kept, failed


def random_resized_crops(images: Sequence[Tensor], crop: int, scale: tuple[int, int],
                         flip: bool = True) -> Tensor:
    """Sec. 3.1 on tensors, any device: per image S ~ U{smin..smax}, the square of
    ``region_side`` pixels at a random position, bilinear-antialias resample to ``crop``, flip.

    Same maths and the same order of draws from torch's global RNG as :class:`TrainTransform`
    (with k = 1), so both give the same crops. Returns uint8 (N, 3, crop, crop), channels_last.
    """
    if not images:
        raise ValueError("random_resized_crops needs at least one image")
    out = torch.empty((len(images), 3, crop, crop), dtype=torch.float32, device=images[0].device)
    flips = []
    for i, image in enumerate(images):
        _, h, w = image.shape
        s = sample_scale(*scale)
        left, top, right, bottom = crop_box((w, h), region_side((w, h), s, crop))
        region = image[:, top:bottom, left:right].unsqueeze(0).float()
        if region.shape[-2:] != (crop, crop):
            region = F.interpolate(region, size=(crop, crop), mode="bilinear", antialias=True)
        out[i] = region[0]
        if flip and flip_coin():
            flips.append(i)
    if flips:
        index = torch.tensor(flips, device=out.device)
        out[index] = out[index].flip(-1)
    hwc = out.round_().clamp_(0, 255).permute(0, 2, 3, 1).to(torch.uint8, memory_format=torch.contiguous_format)
    return hwc.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class GpuTrainAugment:
    """Decode an :class:`EncodedBatch` on ``device`` and apply the training transform there."""

    crop: int = 224
    scale: tuple[int, int] = (256, 256)
    flip: bool = True
    device: torch.device = torch.device("cuda")

    def __post_init__(self) -> None:
        smin, smax = self.scale
        if not self.crop <= smin <= smax:
            raise ValueError(f"scale must be (Smin, Smax) with crop <= Smin <= Smax; got {self.scale}")

    def __call__(self, encoded: EncodedBatch) -> Batch:
        images, kept, failed = decode_batch(encoded, self.device)
        skipped = list(encoded.skipped) + failed
        labels = encoded.labels[kept].to(self.device, non_blocking=True)
        if not images:
            return Batch(torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=self.device), labels, skipped)
        return Batch(random_resized_crops(images, self.crop, self.scale, self.flip), labels, skipped)
