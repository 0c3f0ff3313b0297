"""Reading image files: header sizes, EXIF rotation, 8-bit RGB, reduced JPEG decodes, resampling.

Apart from the paper's transforms (:mod:`verydeep.data.transforms`), which plan a crop from the
displayed size and ask this module for its pixels. Each file is read once (:class:`ImageFile`);
a plain JPEG is sized by libjpeg-turbo's header reader and only the crop's box is decoded
(:mod:`verydeep.data.jpeg`); other files go through Pillow, which reads EXIF rotation, other
formats and modes, and raises on damage. A JPEG may be decoded at 1/2, 1/4 or 1/8 of its size
in the DCT (as Pillow's draft mode); the box is then resampled by torch's uint8
bilinear-antialias kernel. ``fast=False`` is the reference: a full decode and Pillow's resize.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, TiffImagePlugin
from torch import Tensor

from verydeep.data.jpeg import Box, Size, decode_region

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
#: Per EXIF orientation, whether displaying the stored image reverses its (x, y) axes.
_REVERSED_AXES = {1: (False, False), 2: (True, False), 3: (True, True), 4: (False, True), 5: (False, False),
                  6: (False, True), 7: (True, True), 8: (True, False)}
#: The largest DCT scaling a decode reduces a JPEG by (Pillow's draft mode: 1/2, 1/4, 1/8).
MAX_REDUCTION = 8
_EXIF_ORIENTATION_TAG = 0x0112
#: JPEG markers: APP1 (which holds EXIF, after this signature), start of scan (the header's end).
_APP1, _SOS, _EXIF_SIGNATURE = 0xE1, 0xDA, b"Exif\x00\x00"
#: Start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC), and those of progressive frames.
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
#: Start-of-frame markers of lossless frames: no DCT, so no decode at 1/k of the size.
_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
#: A marker in entropy-coded data: 0xFF followed by neither a stuffed zero, a restart marker nor fill.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: The start of Pillow's warning of an EXIF block it cannot read whole.
_CORRUPT_EXIF = "Corrupt EXIF data"
#: An orientation in XMP, as Pillow's ``getexif`` finds one where EXIF has none.
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


@contextlib.contextmanager
def _pillow_quiet() -> Iterator[None]:
    """Pillow's warnings that name no file and span two lines left out: of a large image (the sizes an image may
    have are bounded where it is planned; Pillow's own error, at twice its limit, stays) and of a damaged EXIF block
    (read as far as it goes; a broken orientation counts as upright)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message=_CORRUPT_EXIF, category=UserWarning)
        yield


def open_image(source: str | Path | io.BytesIO) -> Image.Image:
    """Pillow's ``Image.open`` without its warnings that name no file (:func:`_pillow_quiet`)."""
    with _pillow_quiet():
        return Image.open(source)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) read from the header, else XMP's, as Pillow reads them. A
    PNG's counts only from an eXIf chunk (or XMP) before its pixels, as browsers read it: one after
    them would take decoding the whole image to find."""
    if img.format == "PNG" and "exif" not in img.info:  # Pillow's getexif would decode the pixels
        match = _XMP_ORIENTATION.search(img.info.get("XML:com.adobe.xmp", "").encode())
        value = int(match[2]) if match else 1
        return value if value in _ORIENTATION else 1
    try:
        with _pillow_quiet():  # a damaged EXIF block warns here too
            value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: treat as upright
        return 1
    return value if value in _ORIENTATION else 1


def _turns(orient: int | None) -> bool:
    """Whether an orientation swaps width and height."""
    return orient in (5, 6, 7, 8)


def pending_orientation(img: Image.Image) -> int:
    """The orientation still to apply after Pillow decodes ``img`` (1 = none): :func:`orientation`,
    except of a TIFF, which Pillow's TIFF plugin transposes upright itself as it loads."""
    return 1 if isinstance(img, TiffImagePlugin.TiffImageFile) else orientation(img)


def displayed_size(img: Image.Image) -> Size:
    """(w, h) of the image as displayed, i.e. after its EXIF rotation.

    A TIFF's ``size`` already counts a turning orientation tag in its IFD (Pillow's TIFF plugin
    swaps it when opening); only one that tag does not give (e.g. from XMP) is left to apply.
    """
    w, h = img.size
    turns = _turns(orientation(img))
    if isinstance(img, TiffImagePlugin.TiffImageFile):
        turns = turns != _turns(img.tag_v2.get(_EXIF_ORIENTATION_TAG))
    return (h, w) if turns else (w, h)


def image_size(path: str | Path) -> Size:
    """Displayed (w, h) of the image at ``path``, from its header only."""
    with open_image(path) as img:
        return displayed_size(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode ``img`` to 8-bit RGB: greyscale, palette, CMYK, alpha and 16-bit modes handled.

    16-bit greyscale is scaled to 8 bits (Pillow's own conversion would clip it at 255). A floating-point image
    holding NaN or infinity, which has no grey level, is a ``ValueError`` (an unreadable image).
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("pixel values that are not finite (NaN or infinity)")
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
    orient = pending_orientation(img)
    if k > 1 and img.format == "JPEG":
        img.draft("RGB", (img.width // k, img.height // k))  # Pillow then picks exactly k
    img = to_rgb(img)
    return img.transpose(_ORIENTATION[orient]) if orient != 1 else img


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


def header_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """``(marker, offset)`` of each segment of a JPEG's header after SOI, up to its first SOS
    included; it stops early at anything that is not a segment."""
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        yield marker, pos
        if marker == _SOS:
            return
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")


def may_hold_exif(data: bytes) -> bool:
    """Whether a JPEG's header segments (up to the image data) may hold an orientation: an EXIF
    block, or XMP naming one (which Pillow reads too). False only when every segment was walked
    and no APP1 is either; anything unexpected counts as True."""
    for marker, pos in header_segments(data):
        if marker == _SOS:
            return False
        if marker == _APP1:
            end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if data[pos + 4 : pos + 10] == _EXIF_SIGNATURE or _XMP_ORIENTATION.search(data, pos + 4, end):
                return True
    return True


def box_safe(data: bytes) -> bool:
    """Whether decoding only a box of the JPEG ``data`` meets whatever damage a whole decode meets.

    libjpeg-turbo reads a multi-scan (progressive) file whole before any output, but of a
    single-scan file only the rows down to the box's bottom. So a single-scan file qualifies only
    if its entropy-coded data holds no marker but restarts up to the EOI that ends the file: a
    stray one (a damaged byte) stops a whole decode, or fails it, below rows a box may not reach.
    """
    frame = scan = None
    for marker, pos in header_segments(data):
        if marker in _FRAMES:
            frame = pos
        elif marker == _SOS:
            scan = pos
    if frame is None or scan is None or not data.endswith(b"\xff\xd9"):
        return False
    if data[frame + 1] in _PROGRESSIVE or data[scan + 4 : scan + 5] != data[frame + 9 : frame + 10]:
        return True  # components in several scans: read whole
    stray = _MARKER.search(data, scan + 2 + int.from_bytes(data[scan + 2 : scan + 4], "big"))
    return stray is not None and stray.start() == len(data) - 2


def lossless_jpeg(data: bytes) -> bool:
    """Whether a JPEG's frame is lossless (SOF3, SOF7, SOF11, SOF15): stored without the DCT, which a decode at 1/k
    of the size scales."""
    return any(marker in _LOSSLESS for marker, _ in header_segments(data))


def plain_jpeg_size(data: bytes) -> Size | None:
    """(w, h) of a colour or greyscale JPEG with no EXIF block or XMP orientation (so nothing can
    rotate it), from libjpeg-turbo's header reader alone; ``None`` for anything else (Pillow then
    opens it)."""
    if data[:2] != b"\xff\xd8" or may_hold_exif(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (w, h) if colorspace in ("YCbCr", "Gray") else None


def check_pixels(size: Size) -> None:
    """Pillow's decompression-bomb error for a size over its limit (twice ``MAX_IMAGE_PIXELS``),
    where it refuses to open a file: the same for the JPEGs sized without Pillow."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > 2 * limit:
        raise Image.DecompressionBombError(f"image size {size[0]}x{size[1]} is over {2 * limit} pixels")


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

    ``source`` is a path, or the file's bytes. A plain JPEG (:func:`plain_jpeg_size`) is sized
    without Pillow; anything else is opened by Pillow, which reads EXIF rotation, other formats
    and modes, and raises on damage.
    """

    def __init__(self, source: str | Path | bytes) -> None:
        self.data = source if isinstance(source, bytes) else Path(source).read_bytes()
        size = plain_jpeg_size(self.data)
        if size is not None:
            check_pixels(size)
        self._pillow = None if size is not None else open_image(io.BytesIO(self.data))
        self.size: Size = size if size is not None else displayed_size(self._pillow)
        self.jpeg = self._pillow is None or self._pillow.format == "JPEG"
        self.plain = self._pillow is None or plain_jpeg(self._pillow)

    @property
    def reducible(self) -> bool:
        """A JPEG whose 1/k decode (:func:`decode`) keeps pixel i over [i*k, (i+1)*k) of the image as displayed: of
        DCT blocks (not lossless), shown as stored, or turned upright without reversing an axis that ends in a
        partial block of pixels (reversed, that block's padding would shift every pixel by up to k - 1)."""
        if not self.jpeg or lossless_jpeg(self.data):
            return False
        if self._pillow is None:
            return True
        reversed_x, reversed_y = _REVERSED_AXES[pending_orientation(self._pillow)]
        width, height = self._pillow.size  # as stored
        return not (reversed_x and width % MAX_REDUCTION or reversed_y and height % MAX_REDUCTION)

    def pillow(self) -> Image.Image:
        """The file opened by Pillow (not yet decoded, so draft mode still applies)."""
        if self._pillow is None:
            self._pillow = open_image(io.BytesIO(self.data))
        return self._pillow

    def complete_jpeg(self) -> bool:
        """A plain JPEG that ends in its EOI marker, with no stray marker in its image data
        (:func:`box_safe`): what libjpeg-turbo (box only) and nvJPEG decode as they are. Any
        other goes through Pillow, which names the damage: the box alone may lie before it, and
        nvJPEG decodes a file cut short without complaint."""
        return self.plain and box_safe(self.data)


def load_region(file: ImageFile, k: int, box: Box, out: Size, fast: bool = True) -> Tensor:
    """``box`` (whole pixels of the 1/``k`` decode) of ``file`` resampled to ``out`` pixels.

    ``fast``: of a complete plain JPEG only the box is decoded
    (:func:`~verydeep.data.jpeg.decode_region`; without libturbojpeg the whole image at full
    size, by simplejpeg), straight into a tensor; torch's uint8 bilinear-antialias resampler;
    else Pillow throughout (the reference path).
    """
    if fast and file.complete_jpeg():
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
