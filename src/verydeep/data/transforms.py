"""The paper's training and test transforms (Sec. 3.1, 3.2): path in, uint8 (3, h, w) out.

Training (Sec. 3.1): draw S uniformly from the integers [Smin, Smax], rescale isotropically so
the smallest side is S, take one random crop, flip horizontally with probability 1/2. The PCA
colour shift and mean subtraction come later, per batch on the device (:func:`to_input`).

Fast path: each file is read once (:class:`ImageFile`); the crop is planned from the header
before anything is decoded, as a square of whole pixels of the (possibly reduced) decode; a
JPEG is decoded at a reduced size where that still leaves at least the target resolution (DCT
scaling by 1/2, 1/4, 1/8, as Pillow's draft mode). Of a plain JPEG, libjpeg-turbo decodes only
the crop's box, straight into a tensor (:mod:`verydeep.data.jpeg`: about 15% less decoding than
the whole image at S = 256, the same pixels); other images go through Pillow. Only the box is
resampled, by torch's uint8 bilinear-antialias kernel (about 5x Pillow's resize here).
``fast=False`` is the reference: full decode and Pillow's resize of the same region.

Randomness comes from torch's global RNG, which DataLoader seeds per worker.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from verydeep.data.jpeg import Box, Size, decode_region, decoded_size

#: EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
#: JPEG markers: APP1 (which holds EXIF, after this signature), start of scan (the header's end).
_APP1, _SOS, _EXIF_SIGNATURE = 0xE1, 0xDA, b"Exif\x00\x00"


# ---- pure steps ---------------------------------------------------------------------------


def sample_scale(smin: int, smax: int) -> int:
    """Training scale S, uniform over the integers [smin, smax] (Sec. 3.1 scale jittering)."""
    if smin == smax:
        return smin
    return int(torch.randint(smin, smax + 1, ()).item())


def resized_size(size: Size, s: int) -> Size:
    """(w, h) after an isotropic rescale making the smallest side ``s`` (torchvision's rounding)."""
    w, h = size
    if w <= h:
        return s, int(s * h / w)
    return int(s * w / h), s


def crop_box(size: Size, crop: int) -> Box:
    """A uniformly random ``crop`` x ``crop`` box inside an image of ``size``."""
    w, h = size
    if crop > w or crop > h:
        raise ValueError(f"crop {crop} does not fit in a {w}x{h} image")
    left = int(torch.randint(0, w - crop + 1, ()).item())
    top = int(torch.randint(0, h - crop + 1, ()).item())
    return left, top, left + crop, top + crop


def center_box(size: Size, crop: int) -> Box:
    """The central ``crop`` x ``crop`` box (torchvision's rounding)."""
    w, h = size
    if crop > w or crop > h:
        raise ValueError(f"crop {crop} does not fit in a {w}x{h} image")
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return left, top, left + crop, top + crop


def hflip(image: Tensor) -> Tensor:
    """Mirror a (3, h, w) image left-right, keeping its channel-fastest (HWC) memory layout."""
    return image.permute(1, 2, 0).flip(1).permute(2, 0, 1)


def flip_coin(p: float = 0.5) -> bool:
    """True with probability ``p`` (the random horizontal flip)."""
    return bool(torch.rand(()) < p)


# ---- decoding -----------------------------------------------------------------------------


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) read from the header."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: treat as upright
        return 1
    return value if value in _ORIENTATION else 1


def displayed_size(img: Image.Image) -> Size:
    """(w, h) of the image as displayed, i.e. after its EXIF rotation."""
    w, h = img.size
    return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)


def image_size(path: str | Path) -> Size:
    """Displayed (w, h) of the image at ``path``, from its header only."""
    with Image.open(path) as img:
        return displayed_size(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode ``img`` to 8-bit RGB: greyscale, palette, CMYK, alpha and 16-bit modes handled.

    16-bit greyscale is scaled to 8 bits (Pillow's own conversion would clip it at 255).
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        arr = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)  # 2-D uint8: mode "L"
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def draft_factor(size: Size, target: Size) -> int:
    """JPEG DCT reduction (8, 4, 2 or 1) that Pillow's draft mode picks: the largest that
    still leaves the image at least ``target``."""
    room = min(size[0] // target[0], size[1] // target[1])
    return next((k for k in (8, 4, 2) if room >= k), 1)


def decode(img: Image.Image, k: int = 1) -> Image.Image:
    """Decode ``img`` upright in 8-bit RGB; a JPEG at 1/``k`` of its size (DCT scaling).

    Pixel i of the reduced image covers pixels [i*k, (i+1)*k) of the full one.
    """
    orient = orientation(img)
    if k > 1 and img.format == "JPEG":
        img.draft("RGB", (img.width // k, img.height // k))  # Pillow then picks exactly k
    img = to_rgb(img)
    return img.transpose(_ORIENTATION[orient]) if orient != 1 else img


def region_side(size: Size, s: int, crop: int, k: int = 1) -> int:
    """Side, in pixels of the 1/``k`` decode, of the square that becomes ``crop`` x ``crop`` once
    the image of (full) ``size`` is rescaled so its smallest side is ``s``."""
    return max(1, min(round(crop * min(size) / (s * k)), -(-min(size) // k)))


def to_tensor(img: Image.Image) -> Tensor:
    """RGB Pillow image to a uint8 (3, h, w) tensor (a channels-last view, no float step)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def resample(image: Tensor, out: Size) -> Tensor:
    """uint8 (3, h, w) to (3, out_h, out_w): bilinear with antialiasing (torch's uint8 kernel)."""
    if (image.shape[2], image.shape[1]) == out:
        return image
    # a (1, h, w, 3) tensor seen as NCHW: unambiguously channels_last, torch's fast uint8 path
    batch = image.permute(1, 2, 0).contiguous().unsqueeze(0).permute(0, 3, 1, 2)
    return F.interpolate(batch, size=(out[1], out[0]), mode="bilinear", antialias=True)[0]


def plain_jpeg(img: Image.Image) -> bool:
    """An RGB or greyscale JPEG shown as stored (no EXIF rotation): libjpeg-turbo decodes it
    to RGB on its own, straight into an array."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and orientation(img) == 1


def may_hold_exif(data: bytes) -> bool:
    """Whether a JPEG's header segments (up to the image data) may hold an EXIF block: False only
    when every segment was walked and none is an EXIF APP1; anything unexpected counts as True."""
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _SOS:
            return False
        if marker == _APP1 and data[pos + 4 : pos + 10] == _EXIF_SIGNATURE:
            return True
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return True


def plain_jpeg_size(data: bytes) -> Size | None:
    """(w, h) of a colour or greyscale JPEG with no EXIF block (so nothing can rotate it), from
    libjpeg-turbo's header reader alone; ``None`` for anything else (Pillow then opens it)."""
    if data[:2] != b"\xff\xd8" or may_hold_exif(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (w, h) if colorspace in ("YCbCr", "Gray") else None


def decode_jpeg_tensor(data: bytes) -> Tensor | None:
    """A plain JPEG's bytes as uint8 (3, h, w) in HWC memory, decoded by simplejpeg's
    libjpeg-turbo; ``None`` if that decoder refuses the file (Pillow then decodes it, or names
    the damage)."""
    try:
        array = simplejpeg.decode_jpeg(data, "RGB")
    except ValueError:
        return None
    return torch.from_numpy(array).permute(2, 0, 1)


class ImageFile:
    """An image file read once: its displayed size and format from the header, decoded on demand.

    A plain JPEG (:func:`plain_jpeg_size`) is sized without Pillow; anything else is opened by
    Pillow, which reads EXIF rotation, other formats and modes, and raises on damage.
    """

    def __init__(self, path: str | Path) -> None:
        self.data = Path(path).read_bytes()
        size = plain_jpeg_size(self.data)
        self._pillow = None if size is not None else Image.open(io.BytesIO(self.data))
        self.size: Size = size if size is not None else displayed_size(self._pillow)
        self.jpeg = self._pillow is None or self._pillow.format == "JPEG"
        self.plain = self._pillow is None or plain_jpeg(self._pillow)

    def pillow(self) -> Image.Image:
        """The file opened by Pillow (not yet decoded, so draft mode still applies)."""
        if self._pillow is None:
            self._pillow = Image.open(io.BytesIO(self.data))
        return self._pillow

    def reduction(self, target: Size) -> int:
        """The draft factor for decoding to at least ``target`` (displayed size); 1 unless JPEG."""
        return draft_factor(self.size, target) if self.jpeg else 1


def load_region(file: ImageFile, k: int, box: Box, out: Size, fast: bool = True) -> Tensor:
    """``box`` (whole pixels of the 1/``k`` decode) of ``file`` resampled to ``out`` pixels.

    ``fast``: of a plain JPEG only the box is decoded (:func:`~verydeep.data.jpeg.decode_region`;
    without libturbojpeg the whole image at full size, by simplejpeg), straight into a tensor;
    torch's uint8 bilinear-antialias resampler; else Pillow throughout (the reference path).
    """
    if fast and file.plain:
        image = decode_region(file.data, box, k)
        if image is None and k == 1:  # no libturbojpeg, or it refused the file: simplejpeg, whole
            whole = decode_jpeg_tensor(file.data)
            image = None if whole is None else whole[:, box[1] : box[3], box[0] : box[2]]
        if image is not None:
            return resample(image, out)
    img = decode(file.pillow(), k)
    if fast:
        return resample(to_tensor(img.crop(box)), out)
    return to_tensor(img.resize(out, Image.Resampling.BILINEAR, box=box))


# ---- transforms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainTransform:
    """Sec. 3.1: S ~ U{smin..smax}, isotropic rescale to smallest side S, random crop, flip.

    The crop is taken in the decoded image's pixels: a square of ``region_side`` pixels at a
    uniformly random whole-pixel position, resampled to ``crop`` x ``crop``. That is the
    rescale-then-crop of the paper with S rounded so the square's side is whole (S within
    0.5% of the drawn value at ImageNet sizes).
    """

    crop: int = 224
    scale: tuple[int, int] = (256, 256)
    flip: bool = True
    fast: bool = True

    def __post_init__(self) -> None:
        smin, smax = self.scale
        if not 0 < smin <= smax:
            raise ValueError(f"scale must be (Smin, Smax) with 0 < Smin <= Smax; got {self.scale}")
        if smin < self.crop:
            raise ValueError(f"Smin {smin} is smaller than the crop {self.crop}")

    def plan(self, size: Size, jpeg: bool) -> tuple[int, Box]:
        """Draw S and the crop for an image of displayed ``size``: (draft factor k, box in the
        1/k decode's pixels)."""
        s = sample_scale(*self.scale)
        k = draft_factor(size, resized_size(size, s)) if self.fast and jpeg else 1
        return k, crop_box(decoded_size(size, k), region_side(size, s, self.crop, k))

    def __call__(self, path: str | Path) -> Tensor:
        file = ImageFile(path)
        k, box = self.plan(file.size, file.jpeg)
        out = load_region(file, k, box, (self.crop, self.crop), self.fast)
        return hflip(out) if self.flip and flip_coin() else out


@dataclass(frozen=True)
class RescaleTransform:
    """Sec. 3.2: the whole image, rescaled isotropically so its smallest side is Q."""

    q: int
    fast: bool = True

    def __call__(self, path: str | Path) -> Tensor:
        file = ImageFile(path)
        out = resized_size(file.size, self.q)
        k = file.reduction(out) if self.fast else 1
        return load_region(file, k, (0, 0, *decoded_size(file.size, k)), out, self.fast)


@dataclass(frozen=True)
class CenterCropTransform:
    """The usual single-crop test: smallest side to ``resize``, central ``crop`` x ``crop``.

    256/224 at ImageNet size; keep the same ratio for small crops (e.g. 36/32 for CIFAR).
    """

    resize: int
    crop: int
    fast: bool = True

    def __post_init__(self) -> None:
        if self.resize < self.crop:
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.crop}")

    def __call__(self, path: str | Path) -> Tensor:
        file = ImageFile(path)
        k = file.reduction(resized_size(file.size, self.resize)) if self.fast else 1
        box = center_box(decoded_size(file.size, k), region_side(file.size, self.resize, self.crop, k))
        return load_region(file, k, box, (self.crop, self.crop), self.fast)


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
