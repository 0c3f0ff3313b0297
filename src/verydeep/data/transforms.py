"""The paper's training and test transforms (Sec. 3.1, 3.2): path in, uint8 (3, h, w) out.

Training (Sec. 3.1): draw S uniformly from the integers [Smin, Smax], rescale isotropically so
the smallest side is S, take one random crop, flip horizontally with probability 1/2. The PCA
colour shift and mean subtraction come later, per batch on the device (:func:`to_input`).
Testing (Sec. 3.2): the whole image rescaled so its smallest side is Q, or a central crop;
the 5x5 grid of crops is cut from batches (:func:`grid_crops`).

Each transform plans first, from the file's header alone (a :class:`CropPlan`: the DCT
reduction k of a JPEG's decode, a box of whole pixels in that decode, the output size, the
part of it kept, the flip), then has :mod:`verydeep.data.decode` decode and resample only that box. The training
crop's plan is :func:`plan_crop`, the one planner of the CPU path and of the device decoder
(:mod:`verydeep.data.gpu`). Its random numbers come from the ``generator`` passed to the
transform (torch's global RNG when ``None``), always in the same order: S, the box's left
edge, its top edge, the flip.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from verydeep.data.decode import ImageFile, draft_factor, load_region
from verydeep.data.jpeg import Box, Size, decoded_size
from verydeep.errors import UserError
from verydeep.runtime.limits import MAX_TEST_PIXELS, check_side


class CropPlan(NamedTuple):
    """What a transform takes from an image: ``box`` (whole pixels of the image decoded at
    1/``k`` of its size) resampled to ``out`` (w, h), of which ``cut`` (whole pixels) is kept when
    given, then mirrored if ``flip``."""

    k: int
    box: Box
    out: Size
    flip: bool
    cut: Box | None = None

    @property
    def size(self) -> Size:
        """(w, h) of the image the plan makes."""
        return self.out if self.cut is None else (self.cut[2] - self.cut[0], self.cut[3] - self.cut[1])


# ---- pure steps ---------------------------------------------------------------------------


def sample_scale(smin: int, smax: int, generator: torch.Generator | None = None) -> int:
    """Training scale S, uniform over the integers [smin, smax] (Sec. 3.1 scale jittering);
    no draw when smin == smax."""
    if smin == smax:
        return smin
    return int(torch.randint(smin, smax + 1, (), generator=generator).item())


def resized_size(size: Size, s: int) -> Size:
    """(w, h) after an isotropic rescale making the smallest side ``s`` (torchvision's rounding)."""
    w, h = size
    if w <= h:
        return s, int(s * h / w)
    return int(s * w / h), s


def crop_box(size: Size, crop: int, generator: torch.Generator | None = None) -> Box:
    """A uniformly random ``crop`` x ``crop`` box inside an image of ``size`` (left drawn first)."""
    w, h = size
    if crop > w or crop > h:
        raise ValueError(f"crop {crop} does not fit in a {w}x{h} image")
    left = int(torch.randint(0, w - crop + 1, (), generator=generator).item())
    top = int(torch.randint(0, h - crop + 1, (), generator=generator).item())
    return left, top, left + crop, top + crop


def center_box(size: Size, crop: int) -> Box:
    """The central ``crop`` x ``crop`` box (torchvision's rounding)."""
    w, h = size
    if crop > w or crop > h:
        raise ValueError(f"crop {crop} does not fit in a {w}x{h} image")
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return left, top, left + crop, top + crop


def flip_coin(generator: torch.Generator | None = None, p: float = 0.5) -> bool:
    """True with probability ``p`` (the random horizontal flip)."""
    return bool(torch.rand((), generator=generator) < p)


def hflip(image: Tensor) -> Tensor:
    """Mirror a (3, h, w) image left-right, keeping its channel-fastest (HWC) memory layout."""
    return image.permute(1, 2, 0).flip(1).permute(2, 0, 1)


def region_side(size: Size, s: int, crop: int, k: int = 1) -> int:
    """Side, in pixels of the 1/``k`` decode, of the square that becomes ``crop`` x ``crop`` once
    the image of (full) ``size`` is rescaled so its smallest side is ``s``."""
    return max(1, min(round(crop * min(size) / (s * k)), -(-min(size) // k)))


def reduction(size: Size, target: Size, reducible: bool) -> int:
    """The DCT reduction k for decoding an image of ``size`` to at least ``target``: the draft
    factor where the decoder can scale (``reducible``: a JPEG on the CPU), else 1."""
    return draft_factor(size, target) if reducible else 1


#: The side, in pixels of the image, under which a crop's square is not resampled from the image itself but cut
#: from the whole image rescaled to S: a whole-pixel square of fewer pixels of the image would move S by more than
#: 0.5%, and its whole-pixel positions would lie several pixels of the crop apart (CIFAR's 32-pixel images). A JPEG
#: decoded reduced keeps a square of at least the crop's side in its decode.
SMALLEST_SQUARE = 100


def plan_crop(size: Size, crop: int, scale: tuple[int, int], generator: torch.Generator | None,
              reducible: bool = False, flip: bool = True) -> CropPlan:
    """Sec. 3.1's random crop of an image of displayed ``size``: S ~ U{smin..smax}, a square
    of :func:`region_side` pixels at a uniformly random whole-pixel position of the 1/k decode,
    resampled to ``crop`` x ``crop``, mirrored with probability 1/2 if ``flip``.

    That is the rescale-then-crop of the paper with S rounded so the square's side is whole: S within half a
    pixel of the square's side, 0.5% of the drawn value for a square of 100 pixels or more, and, where a JPEG is
    decoded reduced (as far as the rescaled image allows), within 0.5/crop (1.6% for a 32-pixel crop, whose
    square may then be as small as the crop: decoding it larger would cost several times the time). Where the
    square would be under :data:`SMALLEST_SQUARE` pixels, the paper's order itself: the whole image rescaled to
    S, ``crop`` x ``crop`` cut at a uniformly random position (but for a strip that rescaled would be over a test
    image's pixels, :func:`oversized`, whose square may be a pixel or two and S far off). Draws from
    ``generator``, in order: S (unless Smin == Smax), the left edge, the top edge, the flip (if ``flip``).
    """
    s = sample_scale(*scale, generator)
    rescaled = resized_size(size, s)
    if region_side(size, s, crop) < SMALLEST_SQUARE and not oversized(rescaled):  # a long strip: its square
        kept = crop_box(rescaled, crop, generator)  # drawn before the flip, as the square's position is
        return CropPlan(1, (0, 0, *size), rescaled, flip and flip_coin(generator), kept)
    k = reduction(size, rescaled, reducible)
    box = crop_box(decoded_size(size, k), region_side(size, s, crop, k), generator)
    return CropPlan(k, box, (crop, crop), flip and flip_coin(generator))


def render(file: ImageFile, plan: CropPlan, fast: bool = True) -> Tensor:
    """``plan`` executed on ``file``: its box decoded, resampled and flipped, uint8 (3, h, w)."""
    out = cut(load_region(file, plan.k, plan.box, plan.out, fast), plan.cut)
    return hflip(out) if plan.flip else out


def cut(image: Tensor, box: Box | None) -> Tensor:
    """``box`` (whole pixels) of ``image`` (3, h, w); the whole image for None."""
    if box is None:
        return image
    left, top, right, bottom = box
    return image[:, top:bottom, left:right]


# ---- transforms ---------------------------------------------------------------------------


class PlannedTransform(ABC):
    """A transform that plans from the header, then decodes only the plan's box.

    ``fast``: a JPEG may be decoded reduced and only in its box (:mod:`verydeep.data.decode`);
    else the reference path (whole decode, Pillow's resize), with the same plan at k = 1.
    """

    fast: bool

    @abstractmethod
    def plan(self, size: Size, reducible: bool, generator: torch.Generator | None = None) -> CropPlan:
        """The plan for an image of displayed ``size``; ``reducible``: k > 1 allowed."""

    def __call__(self, path: str | Path, generator: torch.Generator | None = None) -> Tensor:
        file = ImageFile(path)
        return render(file, self.plan(file.size, self.fast and file.reducible, generator), self.fast)


@dataclass(frozen=True)
class TrainTransform(PlannedTransform):
    """Sec. 3.1: S ~ U{smin..smax}, isotropic rescale to smallest side S, random crop, flip
    (:func:`plan_crop`)."""

    crop: int = 224
    scale: tuple[int, int] = (256, 256)
    flip: bool = True
    fast: bool = True

    def __post_init__(self) -> None:
        smin, smax = self.scale
        if not (isinstance(self.crop, int) and self.crop >= 1):
            raise UserError(f"crop must be a whole number of pixels, at least 1; got {self.crop!r}")
        if not 0 < smin <= smax:
            raise UserError(f"scale must be (Smin, Smax) with 0 < Smin <= Smax; got {self.scale}")
        if smin < self.crop:
            raise UserError(f"scale: Smin {smin} is smaller than the crop {self.crop}")

    def plan(self, size: Size, reducible: bool, generator: torch.Generator | None = None) -> CropPlan:
        return plan_crop(size, self.crop, self.scale, generator, reducible, self.flip)


@dataclass(frozen=True)
class RescaleTransform(PlannedTransform):
    """Sec. 3.2: the whole image, rescaled isotropically so its smallest side is Q. ``reduce=False``: never
    a reduced JPEG decode, so the plan depends on the image's size alone (localisation maps boxes back
    through it)."""

    q: int
    fast: bool = True
    reduce: bool = True

    def __post_init__(self) -> None:
        check_side(self.q, "a test scale Q")

    def plan(self, size: Size, reducible: bool, generator: torch.Generator | None = None) -> CropPlan:
        out = resized_size(size, self.q)
        if oversized(out):  # a long strip: its short side at Q, its long side far beyond
            raise ValueError(oversized_at(self.q, out))
        k = reduction(size, out, reducible and self.reduce)
        return CropPlan(k, (0, 0, *decoded_size(size, k)), out, False)


def oversized(out: Size) -> bool:
    """An image of ``out`` (w, h) pixels is more than a test image may have (:data:`MAX_TEST_PIXELS`)."""
    return out[0] * out[1] > MAX_TEST_PIXELS


def oversized_at(q: int, out: Size) -> str:
    """Why an image rescaled to ``q`` at ``out`` (w, h) pixels cannot be tested."""
    return (f"rescaled to Q = {q} it would be {out[0]} x {out[1]} pixels, above the {MAX_TEST_PIXELS / 1e6:.1f} M "
            "pixels a test image may have")


@dataclass(frozen=True)
class CenterCropTransform(PlannedTransform):
    """The usual single-crop test: smallest side to ``resize``, central ``crop`` x ``crop``.

    256/224 at ImageNet size; keep the same ratio for small crops (e.g. 36/32 for CIFAR). The
    pixels are torchvision's ``Resize(resize)`` then ``CenterCrop(crop)``: the whole image is
    decoded at full size (never reduced in the DCT, whose downscaling is not torchvision's), resampled,
    then cut. An image that would exceed the test size bound once resampled (a long strip) is resampled
    from its central square alone, within a pixel of that.
    """

    resize: int
    crop: int
    fast: bool = True

    def __post_init__(self) -> None:
        check_side(self.resize, "the smallest side of a resized image")
        if self.resize < self.crop:
            raise UserError(f"resize {self.resize} is smaller than the crop {self.crop}")

    def plan(self, size: Size, reducible: bool, generator: torch.Generator | None = None) -> CropPlan:
        out = resized_size(size, self.resize)
        if not oversized(out):
            return CropPlan(1, (0, 0, *size), out, False, center_box(out, self.crop))
        k = reduction(size, out, reducible)
        box = center_box(decoded_size(size, k), region_side(size, self.resize, self.crop, k))
        return CropPlan(k, box, (self.crop, self.crop), False)


def grid_offsets(length: int, crop: int, grid: int) -> list[int]:
    """``grid`` crop origins evenly spaced from 0 to ``length - crop`` (both ends included)."""
    if crop > length:
        raise ValueError(f"crop {crop} is larger than the image side {length}")
    if grid == 1:
        return [(length - crop) // 2]
    return [round(k * (length - crop) / (grid - 1)) for k in range(grid)]


def grid_crops(images: Tensor, crop: int, grid: int = 5, flip: bool = True) -> Tensor:
    """Sec. 3.2 multi-crop: a ``grid`` x ``grid`` regular grid of crops, plus their mirror images.

    (N, 3, H, W) -> (N, grid*grid*(2 if flip else 1), 3, crop, crop), row-major over the grid,
    unflipped crops first; any dtype, any device.
    """
    _, _, h, w = images.shape
    crops = [
        images[:, :, top : top + crop, left : left + crop]
        for top in grid_offsets(h, crop, grid)
        for left in grid_offsets(w, crop, grid)
    ]
    out = torch.stack(crops, dim=1)
    return torch.cat([out, out.flip(-1)], dim=1) if flip else out
