"""Decoding only a crop's box of a JPEG (verydeep.data.jpeg, the fast path of the training transform)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image

from verydeep.data import TrainTransform, jpeg
from verydeep.data.decode import ImageFile, box_safe, load_region, may_hold_exif, plain_jpeg_size

needs_library = pytest.mark.skipif(jpeg.library() is None, reason="libturbojpeg 3 is not installed")


def encode(img: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def pillow_decode(data: bytes, k: int) -> torch.Tensor:
    """Reference: Pillow's decode of the whole image, at 1/k by draft mode, as (3, h, w)."""
    with Image.open(io.BytesIO(data)) as img:
        if k > 1:
            img.draft(img.mode, (img.width // k, img.height // k))
        rgb = img.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def boxes(width: int, height: int, count: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Random boxes, plus ones touching every edge and one at an odd left offset."""
    out = [(0, 0, width, height), (0, 0, width // 2, height // 2), (width // 2, height // 2, width, height),
           (7, 5, width - 3, height - 1)]
    for _ in range(count):
        left, top = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        out.append((left, top, int(rng.integers(left + 1, width + 1)), int(rng.integers(top + 1, height + 1))))
    return out


@needs_library
@pytest.mark.parametrize("options", [dict(subsampling=2), dict(subsampling=1), dict(subsampling=0),
                                     dict(subsampling=2, progressive=True), dict(grey=True)],
                         ids=["420", "422", "444", "progressive", "grey"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_region_is_the_slice_of_the_whole_decode(options, k):
    """Bit for bit: the box decoded alone equals the whole image decoded (by Pillow, same DCT
    scaling) and sliced, at any offset, including boxes on the image's edges."""
    options = dict(options)
    img = photo(301, 227, seed=k)
    data = encode(img.convert("L") if options.pop("grey", False) else img, **options)
    whole = pillow_decode(data, k)
    _, height, width = whole.shape
    for box in boxes(width, height, 12, np.random.default_rng(k)):
        left, top, right, bottom = box
        region = jpeg.decode_region(data, box, k)
        assert region is not None and region.dtype == torch.uint8
        assert torch.equal(region, whole[:, top:bottom, left:right]), box


@needs_library
def test_damaged_or_foreign_data_is_refused_not_fatal():
    data = encode(photo(64, 48))
    for bad in (data[: len(data) // 2], data[:200], b"", b"\xff\xd8not a jpeg", encode(photo(64, 48).convert("CMYK"))):
        assert jpeg.decode_region(bad, (0, 0, 16, 16)) is None
    with pytest.raises(ValueError, match="outside"):
        jpeg.decode_region(data, (0, 0, 65, 48))


def test_without_the_library_the_whole_image_is_decoded_instead(tmp_path, monkeypatch):
    """The fast path falls back to a whole decode when libturbojpeg is absent: same pixels."""
    path = tmp_path / "a.jpg"
    path.write_bytes(encode(photo(320, 240)))
    file = ImageFile(path)
    box, out = (30, 10, 250, 230), (112, 112)
    with_library = load_region(file, 1, box, out)
    monkeypatch.setattr(jpeg, "library", lambda: None)
    assert jpeg.decode_region(file.data, box) is None
    assert torch.equal(load_region(file, 1, box, out), with_library)
    assert TrainTransform(crop=112, scale=(128, 128))(path, torch.Generator().manual_seed(0)).shape == (3, 112, 112)


def test_exif_is_found_by_walking_the_header_segments():
    img = photo(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    plain, with_exif = encode(img), encode(img, exif=exif)
    with_comment = encode(img, comment=b"Exif\x00\x00 in a comment is not EXIF")
    assert not may_hold_exif(plain) and not may_hold_exif(with_comment)
    assert may_hold_exif(with_exif)
    assert may_hold_exif(with_exif[:30]) and may_hold_exif(plain[:4])  # cut short: not known, so True
    assert plain_jpeg_size(plain) == (64, 48) and plain_jpeg_size(with_exif) is None


def with_stray_marker(data: bytes, before_end: int = 40) -> bytes:
    """``data`` with an unknown marker (0xFF46) written over its image data ``before_end`` bytes
    from the end: what a damaged byte makes, fatal to a whole decode."""
    pos = len(data) - before_end
    while data[pos - 1] == 0xFF or data[pos] == 0xFF:  # not inside a stuffed 0xFF00
        pos -= 1
    return data[:pos] + b"\xff\x46" + data[pos + 2:]


def test_a_stray_marker_below_the_box_is_found_whatever_the_crop(tmp_path):
    """The box's rows may end above the damage; the file is refused all the same, as Pillow does."""
    img = photo(64, 64)
    clean = encode(img)
    assert box_safe(clean) and box_safe(encode(img, progressive=True)) and box_safe(encode(img, restart_marker_rows=1))
    damaged = with_stray_marker(clean)
    assert not box_safe(damaged) and not box_safe(clean[:-2])
    if jpeg.library() is not None:
        assert jpeg.decode_region(damaged, (0, 0, 64, 16)) is not None  # the top rows alone decode
    path = tmp_path / "damaged.jpg"
    path.write_bytes(damaged)
    with pytest.raises(OSError), Image.open(path) as opened:
        opened.load()
    transform = TrainTransform(crop=16, scale=(16, 20))
    for seed in range(50):
        with pytest.raises(OSError):
            transform(path, torch.Generator().manual_seed(seed))


def test_a_header_declaring_too_many_pixels_is_refused_before_decoding():
    data = bytearray(encode(photo(64, 48)))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = (60000).to_bytes(2, "big") * 2  # 60000 x 60000, libjpeg's limit is 65500
    assert plain_jpeg_size(bytes(data)) == (60000, 60000)
    with pytest.raises(Image.DecompressionBombError):
        ImageFile(bytes(data))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))  # as Pillow does for the files it opens
