"""Input decoded on the device (nvJPEG), cut by the same plans as the CPU transforms (Sec. 3.1, 3.2).

At GPU training speeds the CPU's JPEG decoding is the bottleneck. With :class:`EncodedTransform`
the DataLoader workers read each file once and plan it from its header with the wrapped
transform's planner (for training :func:`~verydeep.data.transforms.plan_crop`, drawing from the
same generator in the same order), at full resolution (k = 1: nvJPEG does not scale in the DCT),
and send the file's bytes with the plan. :func:`decode_batch` decodes the batch on the device
(``torchvision.io.decode_jpeg(device=...)``: nvJPEG on CUDA, libjpeg on the CPU), cuts each
plan's box, resamples it (bilinear, antialiased) and flips it. Files nvJPEG cannot take (not
JPEG, CMYK, EXIF-rotated, cut short) go through the wrapped transform in the worker; a file the
device decoder refuses is decoded on the CPU instead; unreadable ones are skipped and named, as
on the CPU path.

    decoder = resolve_decode("auto", device)
    transform = TrainTransform(crop=224, scale=(256, 512))
    train = ImageFolder(split, EncodedTransform(transform) if decoder == "gpu" else transform)
    batches = [list(range(i, min(i + 256, len(train)))) for i in range(0, len(train), 256)]
    loader = image_loader(train, batches, 8, collate_encoded if decoder == "gpu" else collate, device)
    for batch in loader:
        batch = decode_batch(batch, device) if decoder == "gpu" else batch   # a Batch either way
        x = to_input(batch.images.to(device), pre, pca_shift(len(batch.images), pre, 0.1))
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from verydeep.data.batches import Batch, batch_memory, nhwc_shape
from verydeep.data.datasets import DECODE_ERRORS, report_skip
from verydeep.data.decode import ImageFile
from verydeep.data.transforms import CropPlan, PlannedTransform, cut, render
from verydeep.errors import UserError

#: ``--decode`` values: where JPEGs are decoded ("auto": on the training device if it is CUDA).
DECODERS = ("auto", "cpu", "gpu")


def resolve_decode(name: str, device: torch.device) -> str:
    """``--decode NAME`` on ``device`` as "cpu" or "gpu"; "auto" is "gpu" on a CUDA device."""
    if name not in DECODERS:
        raise UserError(f"--decode must be one of {', '.join(DECODERS)}; got {name!r}")
    if name == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if name == "gpu" and device.type != "cuda":
        raise UserError(f"--decode gpu needs a CUDA device; got {device}")
    return name


class Encoded(NamedTuple):
    """One image as a worker sends it: the JPEG file's bytes (1-D uint8) with the plan the device
    executes, or the image the worker already cut by ``plan`` (uint8 (3, h, w))."""

    payload: Tensor
    plan: CropPlan


@dataclass(frozen=True)
class EncodedTransform:
    """``transform`` (Train-, Rescale- or CenterCropTransform) split between a DataLoader worker,
    which plans, and :func:`decode_batch`, which decodes on the device and executes the plan.

    Called as ``(path, generator)``, like the transform, with the same draws from ``generator``;
    a JPEG the device decodes is planned at full size (k = 1), so its crop is the CPU path's
    wherever that decodes at full size too, and otherwise an equally likely one.
    """

    transform: PlannedTransform

    def __call__(self, path: str | Path, generator: torch.Generator | None = None) -> Encoded:
        file = ImageFile(path)
        if file.complete_jpeg():
            plan = self.transform.plan(file.size, False, generator)
            return Encoded(torch.frombuffer(bytearray(file.data), dtype=torch.uint8), plan)
        fast = self.transform.fast
        plan = self.transform.plan(file.size, fast and file.reducible, generator)
        return Encoded(render(file, plan, fast), plan)


class EncodedBatch(NamedTuple):
    """A batch as the workers send it: the JPEG files' bytes in one block (one shared-memory
    transfer, one pinned copy), the images the workers cut, the plans, labels and paths of the
    readable samples, and the paths of the unreadable ones."""

    encoded: Tensor  # the JPEGs' bytes, one file after another
    lengths: list[int]  # bytes per sample; 0 where the sample is in ``decoded`` instead
    decoded: list[Tensor]  # the other samples, already cut (3, h, w), in order
    plans: list[CropPlan]
    labels: Tensor
    paths: list[str]
    skipped: list[str]

    def payloads(self) -> list[Tensor]:
        """Per sample: its JPEG bytes (a 1-D view into ``encoded``) or its cut image."""
        sizes = [n for n in self.lengths if n]
        chunks = iter(torch.split(self.encoded, sizes) if sizes else ())
        images = iter(self.decoded)
        return [next(chunks) if n else next(images) for n in self.lengths]


def collate_encoded(items: Sequence[tuple[Encoded | None, int, str]]) -> EncodedBatch:
    """Concatenate the JPEG bytes, keep the cut images apart; drop and name unreadable samples."""
    good = [(item, label, path) for item, label, path in items if item is not None]
    jpegs = [item.payload for item, _, _ in good if item.payload.dim() == 1]
    encoded = batch_memory((sum(p.numel() for p in jpegs),))
    if jpegs:
        torch.cat(jpegs, out=encoded)
    return EncodedBatch(
        encoded=encoded,
        lengths=[item.payload.numel() if item.payload.dim() == 1 else 0 for item, _, _ in good],
        decoded=[item.payload for item, _, _ in good if item.payload.dim() == 3],
        plans=[item.plan for item, _, _ in good],
        labels=torch.tensor([label for _, label, _ in good], dtype=torch.int64),
        paths=[path for _, _, path in good],
        skipped=[path for item, _, path in items if item is None],
    )


def device_decode(jpegs: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """JPEG bytes decoded to RGB (3, h, w) on ``device`` in one batched call; file by file when
    that fails, ``None`` for each file the device decoder refuses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)) if jpegs else []
        except RuntimeError:
            out: list[Tensor | None] = []
            for data in jpegs:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def resampled(image: Tensor, plan: CropPlan) -> Tensor:
    """``plan``'s box (k = 1) of a whole decoded image (3, h, w), any device, at the plan's output size
    (resampled bilinearly with antialiasing, in float, where the sizes differ; else the box itself, uint8),
    then the plan's cut of it.
    Not flipped: :func:`assemble` flips and rounds a whole batch at once."""
    if plan.k != 1:
        raise ValueError(f"resampling on the device needs a plan at full resolution; got k = {plan.k}")
    left, top, right, bottom = plan.box
    region = image[:, top:bottom, left:right]
    w, h = plan.out
    if region.shape[1:] != (h, w):
        region = F.interpolate(region[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
    return cut(region, plan.cut)


def assemble(images: Sequence[Tensor], flips: Sequence[bool], device: torch.device) -> Tensor:
    """Images of one size (3, h, w), uint8 or float, as one uint8 batch (N, 3, h, w), channels_last: each
    copied into one float block, then all rounded, clipped and converted, and the ``flips`` mirrored, in
    a few operations for the whole batch rather than as many per image."""
    if not images:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=device)
    block = torch.empty(nhwc_shape(images), device=device).permute(0, 3, 1, 2)
    for i, image in enumerate(images):
        block[i] = image
    out = block.round_().clamp_(0, 255).to(torch.uint8, memory_format=torch.channels_last)
    mirrored = torch.tensor([i for i, flip in enumerate(flips) if flip], dtype=torch.long)
    if len(mirrored):
        mirrored = mirrored.to(device, non_blocking=True)
        out[mirrored] = out[mirrored].flip(-1)
    return out


def cpu_cut(data: Tensor, plan: CropPlan, path: str) -> Tensor | None:
    """A file the device decoder refused, decoded and cut on the CPU; ``None`` (logged once,
    naming the file) if nothing can read it."""
    try:
        return render(ImageFile(data.numpy().tobytes()), plan)
    except DECODE_ERRORS as error:
        report_skip(path, error)
        return None


def decode_batch(encoded: EncodedBatch, device: torch.device) -> Batch:
    """Decode an :class:`EncodedBatch` on ``device`` and execute its plans: a :class:`Batch`
    of uint8 images (N, 3, H, W), channels_last, with labels, on ``device``, as
    :func:`~verydeep.data.collate` gives on the CPU. Files no decoder reads join ``skipped``."""
    payloads = encoded.payloads()
    jpegs = [i for i, p in enumerate(payloads) if p.dim() == 1]
    decoded = dict(zip(jpegs, device_decode([payloads[i] for i in jpegs], device), strict=True))
    images: list[Tensor | None] = []  # each sample at its output size, unflipped (None: unreadable)
    for i, (payload, plan) in enumerate(zip(payloads, encoded.plans, strict=True)):
        if i not in decoded:  # cut by the worker, flipped if planned
            images.append(payload.to(device, non_blocking=True))
        elif (image := decoded[i]) is not None:
            images.append(resampled(image, plan))
        else:
            fallback = cpu_cut(payload, plan, encoded.paths[i])
            images.append(None if fallback is None else fallback.to(device))
    kept = [i for i, image in enumerate(images) if image is not None]
    skipped = list(encoded.skipped) + [encoded.paths[i] for i, image in enumerate(images) if image is None]
    labels = encoded.labels[kept].to(device, non_blocking=True)
    flips = [encoded.plans[i].flip and decoded.get(i) is not None for i in kept]  # the others come flipped
    return Batch(assemble([images[i] for i in kept], flips, device), labels, skipped)
