"""Data pipeline: transforms step by step, normalisation, datasets, batching."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, photo, save
from PIL import Image, ImageOps, PngImagePlugin
from PIL.PngImagePlugin import PngImageFile
from torch.utils.data import DataLoader

from verydeep.cli import main
from verydeep.data import (
    IMAGENET,
    CenterCropTransform,
    ILSVRCValFolder,
    ImageFolder,
    Preprocess,
    RescaleTransform,
    SizeGroupedBatchSampler,
    TrainTransform,
    collate,
    crop_box,
    find_split,
    grid_crops,
    load_preprocess,
    open_split,
    plan_crop,
    resized_size,
    sample_scale,
    save_preprocess,
    to_input,
)
from verydeep.data.datasets import IMAGE_EXTENSIONS, kaggle_download
from verydeep.data.decode import ImageFile, decode, image_size, load_region, resample, to_tensor
from verydeep.data.preprocess import pca_shift
from verydeep.data.transforms import CropPlan, render
from verydeep.errors import MissingFileError, UserError
from verydeep.eval.image_sets import open_image_set


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- transform steps ----------------------------------------------------------------------


def test_resized_size_makes_the_smallest_side_s():
    assert resized_size((500, 375), 256) == (341, 256)
    assert resized_size((375, 500), 256) == (256, 341)
    assert resized_size((32, 32), 40) == (40, 40)


def test_scale_jittering_is_uniform_over_the_integers():
    g = seeded(0)
    draws = torch.tensor([sample_scale(256, 512, g) for _ in range(20000)], dtype=torch.float64)
    assert draws.min() == 256 and draws.max() == 512
    assert draws.mean().item() == pytest.approx(384, abs=2)
    # variance of the discrete uniform on 257 values: (257^2 - 1) / 12
    assert draws.var().item() == pytest.approx((257**2 - 1) / 12, rel=0.05)
    assert sample_scale(384, 384) == 384


def test_crop_box_stays_inside_and_reaches_every_offset():
    g = seeded(0)
    boxes = {crop_box((227, 225), 224, g) for _ in range(500)}
    assert {b[0] for b in boxes} == {0, 1, 2, 3} and {b[1] for b in boxes} == {0, 1}
    assert all(b[2] - b[0] == 224 and b[3] - b[1] == 224 for b in boxes)
    with pytest.raises(ValueError, match="does not fit"):
        crop_box((200, 300), 224)


def test_train_transform_output_and_flip(tmp_path):
    # left half dark, right half bright: a flip is visible in the mean of the left columns
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:, 20:] = 255
    path = save(Image.fromarray(arr), tmp_path / "half.png")
    g = seeded(0)
    outs = [TrainTransform(crop=40, scale=(40, 40))(path, g) for _ in range(400)]
    assert all(o.shape == (3, 40, 40) and o.dtype == torch.uint8 for o in outs)
    flipped = [o[:, :, :20].float().mean() > 127 for o in outs]
    assert 0.4 < sum(flipped) / len(flipped) < 0.6
    assert not any(TrainTransform(40, (40, 40), flip=False)(path, g)[:, :, :20].float().mean() > 127
                   for _ in range(20))


def test_transforms_draw_only_from_the_generator_in_a_fixed_order(tmp_path):
    """Same seed, same crop, flip and following draws (the sampler's PCA alphas); the global
    RNG is left alone; the draws are S, left, top, flip, as :func:`plan_crop` documents."""
    path = save(photo(300, 200), tmp_path / "a.jpg")
    t = TrainTransform(crop=96, scale=(100, 180))
    before = torch.get_rng_state()
    first, second = seeded(5), seeded(5)
    assert torch.equal(t(path, first), t(path, second))
    assert torch.equal(pca_shift(1, IMAGENET, 0.1, first), pca_shift(1, IMAGENET, 0.1, second))
    assert torch.equal(torch.get_rng_state(), before)
    g = seeded(5)
    s = int(torch.randint(100, 181, (), generator=g))
    side = round(96 * 200 / s)
    left = int(torch.randint(0, 300 - side + 1, (), generator=g))
    top = int(torch.randint(0, 200 - side + 1, (), generator=g))
    flip = bool(torch.rand((), generator=g) < 0.5)
    assert t.plan((300, 200), reducible=False, generator=seeded(5)) == CropPlan(
        1, (left, top, left + side, top + side), (96, 96), flip)
    plan = t.plan((300, 200), reducible=True, generator=seeded(5))
    assert torch.equal(t(path, seeded(5)), render(ImageFile(path), plan))
    assert CenterCropTransform(128, 112)(path, seeded(5)).shape == (3, 112, 112)  # deterministic: ignored


def test_train_transform_rejects_a_scale_below_the_crop():
    with pytest.raises(ValueError, match="smaller than the crop"):
        TrainTransform(crop=224, scale=(200, 256))


def plain_region(path: Path, box: tuple[int, int, int, int], out: int) -> torch.Tensor:
    """Reference, Pillow only: full decode, crop the box, bilinear resize."""
    with Image.open(path) as img:
        region = img.convert("RGB").crop(box).resize((out, out), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(region)).permute(2, 0, 1)


def test_crop_region_is_the_rescaled_crop():
    """The square resampled to the crop covers crop/S of the smallest side: S is kept within 0.5% (within 0.5/crop
    where a JPEG is decoded reduced for a small crop)."""
    for seed in range(200):
        s = sample_scale(256, 512, seeded(seed))
        k, (left, top, right, bottom), out, _, _ = plan_crop((500, 375), 224, (256, 512), seeded(seed), reducible=True)
        assert right - left == bottom - top and k == 1 and out == (224, 224)
        assert 375 * 224 / (right - left) == pytest.approx(s, rel=0.005)
        assert 0 <= left and right <= 500 and 0 <= top and bottom <= 375
    fixed = TrainTransform(crop=224, scale=(256, 256))
    assert fixed.plan((2000, 1500), reducible=True).k == 4  # 1500/4 = 375 >= 256, 1500/8 < 256
    assert fixed.plan((2000, 1500), reducible=False).k == 1
    for s in range(36, 74):  # a small crop of a JPEG decoded reduced: its square at least the crop, S within 0.5/crop
        for size in ((500, 375), (224, 224)):
            plan = plan_crop(size, 32, (s, s), seeded(s), reducible=True)
            side = (plan.box[2] - plan.box[0]) * plan.k  # a square of the image (else rescaled whole: S exact)
            assert plan.cut is not None or min(size) * 32 / side == pytest.approx(s, rel=0.5 / 32), (size, s, plan.k)


def test_a_small_image_is_rescaled_to_every_s_and_cut_at_every_position_as_the_paper_does(tmp_path):
    """CIFAR's 32-pixel images at S in [36, 73]: a whole-pixel square of them would take 15 values of S and
    19 positions; the image rescaled whole to S and cut takes each of the 38 S and every position of each."""
    plans = [plan_crop((32, 32), 32, (36, 73), seeded(seed)) for seed in range(3000)]
    assert {plan.out for plan in plans} == {(s, s) for s in range(36, 74)} and all(plan.k == 1 for plan in plans)
    assert all(plan.size == (32, 32) and plan.box == (0, 0, 32, 32) for plan in plans)
    at_73 = [plan.cut[:2] for plan in plans if plan.out == (73, 73)]
    assert {left for left, _ in at_73} | {top for _, top in at_73} <= set(range(42)) and len(at_73) > 40
    assert len({left for left, _ in at_73}) > 25  # of the 42 positions of a side, not 19
    path = save(photo(32, 32), tmp_path / "small.png")
    plan = plans[0]
    left, top, right, bottom = plan.cut
    rescaled = resample(to_tensor(Image.open(path).convert("RGB")), plan.out)  # the paper's order, by hand
    expected = rescaled[:, top:bottom, left:right]
    assert torch.equal(render(ImageFile(path), plan), expected.flip(-1) if plan.flip else expected)


def test_a_long_strip_is_cut_as_a_square_of_its_pixels_not_rescaled_whole(tmp_path):
    """A 3,000,000 x 1 strip rescaled whole to S = 36 would be 108 M x 36 pixels (11 GB of floats): its crop is a
    whole-pixel square of it, resampled, as larger images' are."""
    for size in ((3_000_000, 1), (1, 3_000_000), (200_000, 32)):
        plan = plan_crop(size, 32, (36, 36), seeded(0))
        assert plan.out == (32, 32) and plan.cut is None and plan.box[2] - plan.box[0] == plan.box[3] - plan.box[1]
    path = save(Image.new("RGB", (400_000, 1), (200, 10, 90)), tmp_path / "strip.png")
    image = TrainTransform(crop=32, scale=(36, 36))(path)
    assert image.shape == (3, 32, 32) and image[:, 0, 0].tolist() == [200, 10, 90]

@pytest.mark.parametrize(("fmt", "size", "k"), [("JPEG", (1024, 768), 2), ("JPEG", (500, 375), 1),
                                                ("PNG", (1024, 768), 1)])
def test_fast_decode_matches_plain_decode_crop_resize(tmp_path, fmt, size, k):
    """Fast path (a JPEG decoded at 1/k by draft mode, or whole by simplejpeg straight into a
    tensor; torch's uint8 resampler) against Pillow's plain decode-crop-resize of the region.

    Tolerance: without a reduced decode, at most 1 grey level anywhere (the decoders give the
    same pixels; two bilinear-antialias implementations round differently). With the JPEG
    decoded at 1/2 (DCT scaling is a different low-pass than the bilinear antialias): mean
    under 1 grey level and 99th percentile at most 4 on this smooth image (real photos, with
    more fine detail, differ more).
    """
    path = save(photo(*size), tmp_path / f"img.{fmt.lower()}", format=fmt, quality=92)
    t = TrainTransform(crop=224, scale=(256, 320), flip=False)
    for seed in range(3):
        planned_k, box, _, _, _ = t.plan(size, reducible=fmt == "JPEG", generator=seeded(seed))
        fast = t(path, seeded(seed))
        assert planned_k == k
        diff = (fast.int() - plain_region(path, tuple(v * k for v in box), 224).int()).abs().float()
        if k == 1:
            assert diff.max() <= 1
        else:
            assert diff.mean() < 1.0 and diff.quantile(0.99) <= 4


def test_fast_decode_uses_a_reduced_jpeg(tmp_path):
    """k = 2: the box is taken from the image decoded at half size (as Pillow's draft mode)."""
    path = save(photo(1024, 768), tmp_path / "big.jpg", quality=92)
    with Image.open(path) as img:
        img.draft("RGB", (512, 384))
        half = img.convert("RGB")
    assert half.size == (512, 384)  # still at least 341x256
    expected = resample(to_tensor(half.crop((10, 20, 310, 320))), (224, 224))
    assert torch.equal(load_region(ImageFile(path), 2, (10, 20, 310, 320), (224, 224)), expected)


def test_exif_rotated_photo_is_displayed_upright(tmp_path):
    arr = np.zeros((60, 90, 3), np.uint8)  # stored landscape, top rows bright
    arr[:10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: portrait, bright column on the right
    path = save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = RescaleTransform(60)(path)
    assert out.shape == (3, 90, 60)
    assert out[:, :, -5:].float().mean() > 200 and out[:, :, :40].float().mean() < 30


def test_a_png_is_sized_from_its_header_and_rotated_by_an_exif_chunk_before_its_pixels(tmp_path, monkeypatch):
    arr = np.zeros((60, 90, 3), np.uint8)
    arr[:10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = save(Image.fromarray(arr), tmp_path / "rot.png", exif=exif)  # Pillow writes eXIf before IDAT
    plain = save(Image.fromarray(arr), tmp_path / "plain.png")
    out = RescaleTransform(60)(rotated)
    assert out.shape == (3, 90, 60) and out[:, :, -5:].float().mean() > 200  # upright, as a JPEG's
    assert RescaleTransform(60)(plain).shape == (3, 60, 90)

    def no_decoding(self):
        raise AssertionError("the pixels were decoded to read the size")

    monkeypatch.setattr(PngImageFile, "load", no_decoding)
    assert image_size(rotated) == (60, 90) and image_size(plain) == (90, 60)


#: EXIF orientation -> the transpose that stores an upright image so that the orientation shows it upright.
STORED_FOR = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def upright_reference(path: Path, k: int = 1) -> torch.Tensor:
    """Pillow's own upright decode: the whole file loaded (at 1/k by draft mode), then ImageOps.exif_transpose."""
    with Image.open(path) as img:
        if k > 1:
            img.draft("RGB", (img.width // k, img.height // k))
        return to_tensor(ImageOps.exif_transpose(img).convert("RGB"))


def assert_decodes_as(path: Path, reference: torch.Tensor, k: int = 1) -> None:
    """Every way of decoding ``path`` (at 1/k) gives ``reference``'s pixels: a box of it by the fast and the
    reference paths, the whole decode, the rescaling transform."""
    h, w = reference.shape[1:]
    box = (1, 2, w - 1, h - 3)
    for fast in (True, False):
        got = load_region(ImageFile(path), k, box, (box[2] - box[0], box[3] - box[1]), fast)
        assert torch.equal(got, reference[:, box[1]:box[3], box[0]:box[2]]), (path.name, k, fast)
    if k == 1:
        with Image.open(path) as img:
            assert torch.equal(to_tensor(decode(img)), reference)
        assert RescaleTransform(min(w, h))(path).shape == (3, h, w)


@pytest.mark.parametrize(("suffix", "options"), [
    (".jpg", {"quality": 95}), (".png", {}), (".webp", {"lossless": True}), (".tif", {}),
    (".tif", {"compression": "tiff_lzw"}),  # read by libtiff
])
def test_every_exif_orientation_of_every_format_decodes_upright_as_pillows_exif_transpose(tmp_path, suffix, options):
    """Pillow's TIFF plugin turns a TIFF upright as it loads it (and reports its upright size): it is not
    turned again."""
    upright = photo(24, 16)
    for orientation, stored_as in STORED_FOR.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = upright if stored_as is None else upright.transpose(stored_as)
        path = save(stored, tmp_path / f"o{orientation}{suffix}", exif=exif, **options)
        reference = upright_reference(path)
        assert reference.shape == (3, 16, 24), orientation
        if suffix != ".jpg":  # lossless: the reference is the upright image itself
            assert torch.equal(reference, to_tensor(upright))
        assert image_size(path) == ImageFile(path).size == (24, 16), (suffix, orientation)
        assert_decodes_as(path, reference)
        if suffix == ".jpg":  # decoded at half size in the DCT
            assert_decodes_as(path, upright_reference(path, 2), k=2)


@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 8])
def test_a_turned_jpeg_s_planned_crop_is_where_the_plan_says_at_any_dct_reduction(tmp_path, orientation):
    """A 1/k decode pads a partial last block of pixels; an orientation that reverses that axis would move the
    padding to the image's left or top, every reduced pixel then k - 1 pixels off the plan: such a JPEG is
    decoded whole, the others (an axis of whole blocks, or none reversed) at 1/k."""
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0)),
                                             size=(203, 301), mode="bicubic", align_corners=False)[0]
    upright = Image.fromarray((smooth.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())  # 301 x 203 shown
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright if STORED_FOR[orientation] is None else upright.transpose(STORED_FOR[orientation])
    path = save(stored, tmp_path / f"o{orientation}.jpg", exif=exif, quality=95)
    file = ImageFile(path)
    assert file.size == (301, 203) and file.reducible == (orientation in (1, 5))
    box = (4, 3, 28, 22)  # of the 1/8 decode: pixels 32 to 224 and 24 to 176 of the image shown

    def off(k: int) -> float:  # the mean difference from a whole decode of the same pixels
        got = load_region(ImageFile(path), k, tuple(v * 8 // k for v in box), (48, 38), fast=False).float()
        whole = load_region(ImageFile(path), 1, tuple(v * 8 for v in box), (48, 38), fast=False)
        return float((got - whole).abs().mean())

    assert off(4) < 2.5 if file.reducible else off(4) > 4.0  # turned, the padding of 301 = 75 x 4 + 1 moves it
    assert plan_crop(file.size, 20, (24, 24), None, file.reducible).k == (
        8 if file.reducible else 1)


def lossless_jpeg(pixels: np.ndarray) -> bytes | None:
    """``pixels`` (h, w, 3 uint8) as a lossless JPEG (SOF3) by libjpeg-turbo 3; None without the library."""
    import ctypes

    from verydeep.data.jpeg import library

    lib = library()
    if lib is None or not hasattr(lib, "tj3Compress8"):
        return None
    handle, out, size = lib.tj3Init(0), ctypes.c_void_p(), ctypes.c_size_t()  # 0: TJINIT_COMPRESS
    lib.tj3Set(handle, 15, 1)  # TJPARAM_LOSSLESS
    lib.tj3Compress8.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_void_p),
                                                                             ctypes.POINTER(ctypes.c_size_t)]
    h, w, _ = pixels.shape
    assert lib.tj3Compress8(handle, pixels.ctypes.data, w, 0, h, 0, ctypes.byref(out), ctypes.byref(size)) == 0
    data = ctypes.string_at(out, size.value)
    lib.tj3Free(out)
    lib.tj3Destroy(handle)
    return data


def test_a_lossless_jpeg_is_planned_at_full_size_and_read_alike_at_any_scale(tmp_path):
    """A lossless JPEG has no DCT to scale: a decode at 1/k would fail, and the file be skipped by some commands
    and read by others."""
    pixels = np.random.default_rng(0).integers(0, 255, (301, 403, 3), dtype=np.uint8)
    data = lossless_jpeg(pixels)
    if data is None:
        pytest.skip("libjpeg-turbo 3 is not installed (pip install 'verydeep[turbo]')")
    path = tmp_path / "lossless.jpg"
    path.write_bytes(data)
    file = ImageFile(path)
    assert file.size == (403, 301) and not file.reducible
    assert RescaleTransform(32).plan(file.size, file.reducible).k == 1
    for fast in (True, False):
        image = RescaleTransform(32, fast=fast)(path)
        assert image.shape == (3, 32, 42)
    whole = load_region(ImageFile(path), 1, (0, 0, 403, 301), (403, 301))
    assert torch.equal(whole, torch.from_numpy(pixels).permute(2, 0, 1))  # lossless, as stored

def test_an_orientation_given_only_in_xmp_is_followed_as_pillow_follows_it(tmp_path):
    """Pillow's getexif reads tiff:Orientation from XMP where EXIF has none: a JPEG (sized and decoded without
    Pillow when it has no EXIF) and a PNG (iTXt before its pixels) are turned as exif_transpose turns them."""
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    text = PngImagePlugin.PngInfo()
    text.add_itxt("XML:com.adobe.xmp", xmp)
    stored = photo(24, 16)
    for path in (save(stored, tmp_path / "x.jpg", xmp=xmp.encode(), quality=95),
                 save(stored, tmp_path / "x.png", pnginfo=text)):
        reference = upright_reference(path)
        assert reference.shape == (3, 24, 16) and image_size(path) == ImageFile(path).size == (16, 24), path.name
        assert_decodes_as(path, reference)

def test_rescale_and_center_crop_transforms(tmp_path):
    path = save(photo(300, 200), tmp_path / "a.jpg")
    assert RescaleTransform(100)(path).shape == (3, 100, 150)
    out = CenterCropTransform(resize=128, crop=112)(path)
    assert out.shape == (3, 112, 112)  # its pixels: the test below


@pytest.mark.parametrize("size, resize, crop", [((500, 375), 256, 224), ((64, 48), 37, 32), ((75, 101), 40, 32),
                                               ((1100, 700), 256, 224)])  # a JPEG the DCT could halve
def test_the_center_crop_is_torchvisions_resize_then_center_crop(tmp_path, size, resize, crop):
    """The pixels torchvision's published single-crop figures are measured on: Resize(resize), then
    CenterCrop(crop), where a square resampled from the original would sit up to a pixel off."""
    torchvision_transforms = pytest.importorskip("torchvision.transforms")
    path = save(photo(*size), tmp_path / "a.jpg", quality=95)
    reference = torchvision_transforms.Compose([torchvision_transforms.Resize(resize),
                                                torchvision_transforms.CenterCrop(crop)])
    with Image.open(path) as img:
        expected = torch.from_numpy(np.array(reference(img.convert("RGB")))).permute(2, 0, 1)
    for fast in (True, False):
        out = CenterCropTransform(resize, crop, fast=fast)(path)
        assert (out.int() - expected.int()).abs().max() <= 1  # two resamplers' rounding


def test_a_long_strip_is_center_cropped_from_its_central_square(tmp_path):
    path = save(photo(4000, 30), tmp_path / "strip.png", format="PNG")  # at 256: 34,133 x 256, over the bound
    out = CenterCropTransform(256, 224)(path)
    assert out.shape == (3, 224, 224)
    square = plain_region(path, (1987, 2, 2013, 28), 224)  # the central 26 pixels: 224/256 of 30
    assert (out.int() - square.int()).abs().max() <= 1


def test_grid_crops_span_corner_to_corner_with_flips():
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    crops = grid_crops(images, crop=6, grid=5)
    assert crops.shape == (2, 50, 3, 6, 6)
    assert torch.equal(crops[:, 0], images[:, :, :6, :6])  # top-left
    assert torch.equal(crops[:, 4], images[:, :, :6, 6:])  # top-right
    assert torch.equal(crops[:, 24], images[:, :, 4:, 6:])  # bottom-right
    assert torch.equal(crops[:, 25:], crops[:, :25].flip(-1))
    assert grid_crops(images, 6, grid=3, flip=False).shape == (2, 9, 3, 6, 6)


# ---- normalisation ------------------------------------------------------------------------


def test_pca_shift_covariance_matches_the_eigenvalues():
    g = torch.Generator().manual_seed(0)
    shifts = pca_shift(200_000, IMAGENET, alpha_std=0.1, generator=g).double()
    cov = torch.cov(shifts.T)
    expected = (0.1 * torch.tensor(IMAGENET.eigval, dtype=torch.float64)) ** 2
    values, vectors = torch.linalg.eigh(cov)
    assert torch.allclose(values.flip(0), expected, rtol=0.03)
    top = vectors[:, -1]
    assert abs(top @ torch.tensor([r[0] for r in IMAGENET.eigvec], dtype=torch.float64)) > 0.999
    assert shifts.mean(0).abs().max() < 1e-3


def test_to_input_subtracts_the_mean_and_keeps_channels_last():
    pre = IMAGENET
    rgb = torch.tensor([round(m * 255) for m in pre.mean], dtype=torch.uint8)
    images = rgb.view(1, 3, 1, 1).expand(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    out = to_input(images, pre)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert out.abs().max() < 0.01
    caffe = Preprocess(mean=pre.mean, std=(1 / 255,) * 3, eigval=pre.eigval, eigvec=pre.eigvec)
    x = torch.full((1, 3, 2, 2), 200, dtype=torch.uint8)
    expected = 200 - torch.tensor(pre.mean) * 255
    assert torch.allclose(to_input(x, caffe)[0, :, 0, 0], expected, atol=1e-3)
    for array in (x.numpy(), Image.new("RGB", (2, 2))):  # uint8 (1, 3, 2, 2) as an array: not a tensor
        with pytest.raises(TypeError, match=f"wants a torch tensor .*; got a {type(array).__name__}"):
            to_input(array, caffe)


def test_to_input_colour_shift_is_one_rgb_offset_per_image():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    base = to_input(images, IMAGENET)
    shifts = pca_shift(4, IMAGENET, 0.1, torch.Generator().manual_seed(1))
    delta = to_input(images, IMAGENET, shifts) - base  # (4, 3, 8, 8), constant over pixels
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-5)
    std = torch.tensor(IMAGENET.std)
    assert torch.allclose(delta[:, :, 0, 0], shifts / std, atol=1e-5)  # the shift on the 0..1 scale, normalised


@pytest.mark.parametrize("channels_last", [True, False])
def test_to_input_writes_into_a_reused_buffer(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randint(0, 256, (3, 3, 6, 7), dtype=torch.uint8).contiguous(memory_format=fmt)
    buffer = torch.full((3 * 3 * 6 * 7 + 5,), float("nan"))
    expected = to_input(images, IMAGENET)
    out = to_input(images, IMAGENET, out=buffer)
    assert out.data_ptr() == buffer.data_ptr() and torch.equal(out, expected)
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(to_input(images[:2], IMAGENET, out=buffer), expected[:2])  # a smaller last batch fits
    with pytest.raises(ValueError, match="at least"):
        to_input(images, IMAGENET, out=torch.empty(10))


def test_preprocess_round_trips_through_json(tmp_path):
    assert Preprocess.from_dict(json.loads(json.dumps(IMAGENET.to_dict()))) == IMAGENET
    with pytest.raises(ValueError, match="lack eigvec"):
        Preprocess.from_dict({"mean": [0, 0, 0], "std": [1, 1, 1], "eigval": [1, 1, 1]})
    assert load_preprocess(tmp_path) == IMAGENET
    mine = Preprocess((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), (0.1, 0.01, 0.001), IMAGENET.eigvec)
    save_preprocess(mine, tmp_path)
    (tmp_path / "train").mkdir()
    assert load_preprocess(tmp_path) == mine and load_preprocess(tmp_path / "train") == mine
    (tmp_path / "preprocess.json").write_text('{"mean": [0, 0]}')
    with pytest.raises(UserError, match="preprocess.json: bad preprocess statistics"):
        load_preprocess(tmp_path)
    with pytest.raises(MissingFileError, match="other.json"):
        load_preprocess(tmp_path / "other.json")


# ---- datasets and batching ----------------------------------------------------------------


def make_tree(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    for cls, dims in sizes.items():
        for i, (w, h) in enumerate(dims):
            save(photo(w, h, seed=i), root / cls / f"{i}.jpg")
    return root


def test_features_read_tiny_imagenet_s_val_beside_its_unlabelled_test_as_eval_does(tmp_path):
    synsets, root = ["n01443537", "n01629819"], tmp_path / "tiny"
    for i in range(4):
        save(photo(8, 8, seed=i), root / "train" / synsets[i % 2] / "images" / f"{synsets[i % 2]}_{i}.JPEG")
        save(photo(8, 8, seed=i), root / "test" / "images" / f"test_{i}.JPEG")  # unlabelled, as downloaded
    for i in range(3):
        save(photo(8, 8, seed=9 + i), root / "val" / "images" / f"val_{i}.JPEG")
    (root / "val" / "val_annotations.txt").write_text("".join(f"val_{i}.JPEG\t{synsets[i % 2]}\t0\t0\t7\t7\r\n"
                                                              for i in range(3)))
    images = open_image_set(root)
    assert images.classes == synsets and images.splits == ["train"] * 4 + ["test"] * 3
    assert [Path(p).name for p in images.paths[4:]] == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG"]
    assert images.labels.tolist() == [0, 0, 1, 1, 0, 1, 0]
    (root / "val" / "__MACOSX" / "images").mkdir(parents=True)  # an unpacker's stray folder, or an empty one
    (root / "val" / "__MACOSX" / "images" / "._val_0.JPEG").write_bytes(b"x")
    (root / "val" / "empty").mkdir()
    assert open_image_set(root).paths == images.paths and open_split(root / "val", None).classes == synsets
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{synsets[0]}\t0\t0\t7\t7\n")
    with pytest.raises(UserError, match="val_annotations.txt: no label for 2 images"):
        open_image_set(root)


def test_find_split_layouts_and_errors(tmp_path):
    make_tree(tmp_path / "ds" / "train", {"a": [(8, 8)]})
    make_tree(tmp_path / "ds" / "test", {"a": [(8, 8)]})
    assert find_split(tmp_path / "ds", "train") == tmp_path / "ds" / "train"
    assert find_split(tmp_path / "ds", "val") == tmp_path / "ds" / "test"
    assert find_split(tmp_path / "ds" / "train", "train") == tmp_path / "ds" / "train"
    with pytest.raises(MissingFileError, match="nowhere"):
        find_split(tmp_path / "nowhere", "train")
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        find_split(tmp_path / "empty", "val")
    with pytest.raises(UserError, match="holds no images"):
        ImageFolder(tmp_path / "empty" / "val", RescaleTransform(8))
    with pytest.raises(UserError, match="no class folders"):
        ImageFolder(tmp_path / "ds" / "train" / "a", RescaleTransform(8))


def test_a_split_of_class_folders_one_named_train_is_that_split_not_a_dataset_of_splits(tmp_path):
    for split in ("train", "test"):  # CIFAR-100 has a class "train"
        make_tree(tmp_path / "c100" / split, {name: [(8, 8)] * 2 for name in ("bicycle", "bus", "train")})
    assert find_split(tmp_path / "c100", "train") == tmp_path / "c100" / "train"
    for split in ("train", "test"):
        folder = tmp_path / "c100" / split
        assert find_split(folder, "train") == find_split(folder, "val") == folder
        assert ImageFolder(folder, None).classes == ["bicycle", "bus", "train"] and len(ImageFolder(folder, None)) == 6
    make_tree(tmp_path / "flat", {"val": [(8, 8)], "n01": [(8, 8)]})  # a flat val/ is ILSVRC's, never a class
    assert find_split(tmp_path / "flat", "val") == tmp_path / "flat" / "val"
    make_tree(tmp_path / "loose" / "train", {"a": [(8, 8)], "b": [(8, 8)]})  # a split beside a flat folder
    make_tree(tmp_path / "loose", {"ILSVRC2012_img_val": [(8, 8)]})
    with pytest.raises(MissingFileError, match="has train but no val or test"):
        find_split(tmp_path / "loose", "val")
    images = open_image_set(tmp_path / "c100" / "train")  # features' and transfer's reading: each image once, unsplit
    assert len(images.paths) == len(set(images.paths)) == 6 and set(images.splits) == {""}
    assert images.classes == ["bicycle", "bus", "train"]


def test_a_file_given_as_the_data_folder_is_named_a_file(tmp_path, capsys):
    file = tmp_path / "data.txt"
    file.write_text("not a folder\n")
    for opening in (lambda: find_split(file, "train"), lambda: ImageFolder(file, None),
                    lambda: ILSVRCValFolder(file, None), lambda: open_image_set(file)):
        with pytest.raises(UserError, match=f"data folder {file} is a file, not a folder"):
            opening()
    assert main(["data", "stats", str(file), "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"data folder {file} is a file, not a folder")
    make_tree(tmp_path / "val", {"a": [(8, 8)]})
    (tmp_path / "val" / "LOC_val_solution.csv").mkdir()
    with pytest.raises(UserError, match="LOC_val_solution.csv is a folder, not a file"):
        ILSVRCValFolder(tmp_path / "val", None, labels=tmp_path / "val" / "LOC_val_solution.csv")
    assert file.read_text() == "not a folder\n"


def test_image_folder_classes_names_and_samples(tmp_path):
    make_tree(tmp_path / "train", {"n2": [(8, 8)], "n1": [(8, 8), (8, 8)], ".hidden": [(8, 8)]})
    (tmp_path / "classes.txt").write_text("n1\tfirst class\nn2\tsecond\n")
    (tmp_path / "train" / "n1" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path / "train", RescaleTransform(8))
    assert ds.classes == ["n1", "n2"] and ds.class_names == ["first class", "second"]
    assert ds.targets == [0, 0, 1] and len(ds) == 3
    image, label, path = ds[2]
    assert image.shape == (3, 8, 8) and label == 1 and path.endswith("n2/0.jpg")


def test_a_class_folder_without_images_is_refused_for_training_kept_for_validation(tmp_path, capsys):
    for split in ("train", "val"):
        make_tree(tmp_path / split, {"ant": [(8, 8)], "bee": [(8, 8)]})
        (tmp_path / split / "zebra" / "notes").mkdir(parents=True)
        (tmp_path / split / "zebra" / "notes.txt").write_text("not an image")
    zebra = tmp_path / "train" / "zebra"
    with pytest.raises(UserError, match=f"class folder {zebra} holds no image files"):
        ImageFolder(tmp_path / "train", None)
    with pytest.raises(UserError, match=f"class folder {zebra} holds no image files"):
        open_image_set(tmp_path)
    run = tmp_path.with_name(f"{tmp_path.name}-run")  # beside the data: an output in it is refused first
    assert main(["train", "--data", str(tmp_path), "--out", str(run), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"class folder {zebra} holds no image files "
                                                    f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images")
    val = open_split(tmp_path / "val", None)  # a validation split may lack some classes' images
    assert val.classes == ["ant", "bee", "zebra"] and val.targets == [0, 1]
    assert ImageFolder(tmp_path / "train", None, allow_empty=True).classes == val.classes


def test_load_passes_the_generator_to_the_transform(tmp_path):
    make_tree(tmp_path, {"a": [(50, 40)], "b": [(40, 60)]})
    ds = ImageFolder(tmp_path, TrainTransform(crop=24, scale=(28, 40)))
    image, label, path = ds.load(1, seeded(3))
    assert label == 1 and torch.equal(image, ds.transform(path, seeded(3)))
    assert torch.equal(ds.load(1, seeded(3))[0], image)


@pytest.mark.parametrize("text, message", [
    (b"n1\tfirst\nn2\tsecond\nn1\tother\n",
     r"classes\.txt:3: a second name for n1, 'other' \(the first, 'first', on line 1\)"),
    (b"n1\tfirst\n\xff\xfe bad\n", r"classes\.txt: class names that are not UTF-8 text \(at byte 9\)"),
])
def test_a_class_names_file_with_two_names_for_a_class_or_not_text_is_one_line_naming_it(tmp_path, text, message):
    make_tree(tmp_path / "train", {"n2": [(8, 8)], "n1": [(8, 8)]})
    (tmp_path / "classes.txt").write_bytes(text)
    with pytest.raises(UserError, match=message) as error:
        ImageFolder(tmp_path / "train", None)
    assert "\n" not in str(error.value)
    (tmp_path / "classes.txt").write_bytes(b"n1\tfirst\nn2\tsecond\nn1\tfirst\n")  # the same name twice is one name
    assert ImageFolder(tmp_path / "train", None).class_names == ["first", "second"]


def test_ilsvrc_validation_layout(tmp_path):
    val = tmp_path / "val"
    for i in range(3):
        save(photo(8, 8, i), val / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca\nn02 goldfish\nn03 shark\n")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n03 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n01 1 2 3 4 n01 5 6 7 8\nILSVRC2012_val_00000003,n02 0 0 1 1\n"
    )
    ds = ILSVRCValFolder(val, RescaleTransform(8))
    assert ds.classes == ["n01", "n02", "n03"] and ds.class_names[0] == "tench, Tinca"
    assert ds.targets == [2, 0, 1]
    (tmp_path / "caffe.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG 0\nILSVRC2012_val_00000003.JPEG 1\n"
    )
    assert ILSVRCValFolder(val, RescaleTransform(8), labels=tmp_path / "caffe.txt").targets == [2, 0, 1]
    (tmp_path / "bad.csv").write_text("Image,Label\nILSVRC2012_val_00000001,n03\n")
    with pytest.raises(UserError, match="bad.csv: bad ground-truth file"):
        ILSVRCValFolder(val, RescaleTransform(8), labels=tmp_path / "bad.csv")
    with pytest.raises(MissingFileError, match="nothing.txt"):
        ILSVRCValFolder(val, RescaleTransform(8), labels=tmp_path / "nothing.txt")


def test_kaggles_download_as_unpacked_finds_its_ground_truth_and_names_at_its_top(tmp_path):
    top = tmp_path / "imagenet-object-localization-challenge"
    split = top / "ILSVRC" / "Data" / "CLS-LOC"
    make_tree(split / "train", {"n01": [(8, 8)], "n02": [(8, 8)]})
    for i in range(2):
        save(photo(8, 8, i), split / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    (top / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca\nn02 goldfish\n")
    (top / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n02 1 2 3 4\nILSVRC2012_val_00000002,n01 1 2 3 4\n")
    val = open_split(find_split(split, "val"), None)
    assert val.targets == [1, 0] and val.class_names == ["tench, Tinca", "goldfish"]
    assert ImageFolder(find_split(split, "train"), None).class_names == ["tench, Tinca", "goldfish"]
    assert kaggle_download(split) == kaggle_download(split / "val") == [top]  # CLS-LOC itself too
    (top / "LOC_val_solution.csv").rename(tmp_path / "elsewhere.csv")  # no download's top: as before
    with pytest.raises(MissingFileError, match="no ground-truth file"):
        open_split(find_split(split, "val"), None)


def flat_val(root: Path) -> Path:
    """A flat validation folder of two tiny images, a.jpg and b.jpg, with a two-class synset list beside it."""
    for i, name in enumerate(("a.jpg", "b.jpg")):
        save(photo(8, 8, i), root / "val" / name)
    (root / "LOC_synset_mapping.txt").write_text("n01 tench\nn02 goldfish\n")
    return root / "val"


def test_a_label_of_a_class_the_class_list_lacks_names_the_ground_truth_file_and_line(tmp_path):
    val = flat_val(tmp_path)
    (tmp_path / "val.txt").write_text("a.jpg n02\nb.jpg n99\n")
    with pytest.raises(UserError, match=r"val.txt:2: class n99 is not in the dataset's class list"):
        ILSVRCValFolder(val, None, labels=tmp_path / "val.txt")
    (tmp_path / "gt.csv").write_text("ImageId,PredictionString\na,n02 1 2 3 4\nb,n99 1 2 3 4\n")
    with pytest.raises(UserError, match=r"gt.csv:3: class n99 is not in"):
        ILSVRCValFolder(val, None, labels=tmp_path / "gt.csv")


def test_caffe_class_indices_of_a_synset_list_out_of_sorted_order_are_refused_not_guessed(tmp_path):
    """ILSVRC's synset list is sorted, so an index means the same in its order and among the sorted classes; in a
    list out of order it could mean either, and one guess would silently relabel images."""
    val, labels = flat_val(tmp_path), tmp_path / "val.txt"

    def targets(lines: str) -> list[int]:
        labels.write_text(lines)
        return ILSVRCValFolder(val, None, labels=labels).targets

    assert targets("a.jpg 1\nb.jpg 0\n") == [1, 0]
    (tmp_path / "LOC_synset_mapping.txt").write_text("n02 goldfish\nn01 tench\n")
    with pytest.raises(UserError, match=r"val.txt:1: class index 1 of a synset list .* not in sorted order"):
        targets("a.jpg 1\nb.jpg 0\n")
    assert targets("a.jpg n02\nb.jpg n01\n") == [1, 0]  # synset ids mean one thing in any list


def test_a_ground_truth_path_labels_only_the_image_at_that_path(tmp_path):
    val = flat_val(tmp_path)
    (tmp_path / "val.txt").write_text("./a.jpg 1\nb.jpg 0\n")
    assert ILSVRCValFolder(val, None, labels=tmp_path / "val.txt").targets == [1, 0]
    (tmp_path / "val.txt").write_text("elsewhere/a.jpg 1\nb.jpg 0\n")
    with pytest.raises(UserError, match=r"val.txt: no label for 1 images, e.g. a.jpg \(labels name an image by its"):
        ILSVRCValFolder(val, None, labels=tmp_path / "val.txt")
    (tmp_path / "gt.csv").write_text("ImageId,PredictionString\nelsewhere/a,n02 1 2 3 4\nb,n01 1 2 3 4\n")
    with pytest.raises(UserError, match="gt.csv: no label for 1 images, e.g. a.jpg"):
        ILSVRCValFolder(val, None, labels=tmp_path / "gt.csv")


@pytest.mark.parametrize(("lines", "message"), [
    ("a.jpg 0\na.jpg 1\nb.jpg 0\n", r"val.txt:2: a second label for a.jpg \(the first on line 1\)"),
    ("a.jpg 0\n\n./a.jpg 1\nb.jpg 0\n", r"val.txt:3: a second label for ./a.jpg \(the first on line 1\)"),
    ("a.jpg 0 junk\nb.jpg 0\n", r"val.txt:1: expected '<file> <class index>', got 'a.jpg 0 junk'"),
    ("b.jpg 0\na.jpg\n", r"val.txt:2: expected '<file> <class index>', got 'a.jpg'"),
    *[(f"b.jpg 0\na.jpg {index}\n", f"val.txt:2: a class index must be a whole number from 0, got '{re.escape(index)}'")
      for index in ("-1", "+1", "nan", "inf", "1.0", "1_0", "1e0")],
    ("b.jpg 0\na.jpg 2\n", r"val.txt:2: class index 2 is beyond the 2 classes of the synset list \(0..1\)"),
])
def test_a_caffe_val_list_line_at_fault_is_named(tmp_path, lines, message):
    val = flat_val(tmp_path)
    (tmp_path / "val.txt").write_text(lines)
    with pytest.raises(UserError, match=message):
        ILSVRCValFolder(val, None, labels=tmp_path / "val.txt")


@pytest.mark.parametrize(("rows", "message"), [
    ("a,n01 1 2 3 4\nb,n02 1 2 3 4\na,n02 1 2 3 4\n", r"gt.csv:4: a second label for a \(the first on line 2\)"),
    ("a,n01 1 2 3 4,junk\nb,n02 1 2 3 4\n", r"gt.csv:2: expected 2 fields \(ImageId,PredictionString\), got 3"),
    ("a\nb,n02 1 2 3 4\n", r"gt.csv:2: expected 2 fields \(ImageId,PredictionString\), got 1"),
    ("a,\nb,n02 1 2 3 4\n", "gt.csv:2: PredictionString must start with a synset id, got ''"),
    ("a,n01 1 2 3 4\nb,nan 1 2 3 4\n", "gt.csv:3: PredictionString must start with a synset id, got 'nan 1 2 3 4'"),
    ("a,-1 1 2 3 4\nb,n02\n", "gt.csv:2: PredictionString must start with a synset id, got '-1 1 2 3 4'"),
    ("a," + "n" * 200_000 + "\n", r"gt.csv: bad ground-truth file \(Error: field larger than field limit"),
])
def test_a_kaggle_csv_row_at_fault_is_named(tmp_path, rows, message):
    val = flat_val(tmp_path)
    (tmp_path / "gt.csv").write_text("ImageId,PredictionString\n" + rows)
    with pytest.raises(UserError, match=message):
        ILSVRCValFolder(val, None, labels=tmp_path / "gt.csv")


def test_a_kaggle_image_id_two_images_share_is_refused(tmp_path):
    """The CSV names images without their extension: an unlisted a.png must not take a.jpg's label."""
    val = flat_val(tmp_path)
    (tmp_path / "gt.csv").write_text("ImageId,PredictionString\na,n01 1 2 3 4\nb,n02 1 2 3 4\n")
    assert ILSVRCValFolder(val, None, labels=tmp_path / "gt.csv").targets == [0, 1]
    save(photo(8, 8, 5), val / "a.png")
    with pytest.raises(UserError, match="gt.csv: names images without their extension, which a.jpg and a.png share"):
        ILSVRCValFolder(val, None, labels=tmp_path / "gt.csv")


def devkit(root: Path, ids: str) -> Path:
    """A devkit ground-truth file of ``ids`` beside a ``meta.mat`` of two leaf classes (ids 1, 2) and a
    parent (id 3)."""
    from scipy.io import savemat

    synsets = np.array([(1, "n02", 0), (2, "n01", 0), (3, "n00", 2)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    savemat(root / "meta.mat", {"synsets": synsets})
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text(ids)
    return root / "ILSVRC2012_validation_ground_truth.txt"


@pytest.mark.parametrize("bad", ["0", "3", "-1", "1.0", "nan", "+2"])
def test_the_devkit_ground_truth_reads_ids_in_file_order_and_names_a_bad_line(tmp_path, bad):
    val = flat_val(tmp_path)
    assert ILSVRCValFolder(val, None, labels=devkit(tmp_path, "1\n2\n")).targets == [1, 0]  # n02, then n01
    with pytest.raises(UserError, match=f"ground_truth.txt:2: expected an ILSVRC2012_ID of .*meta.mat's 2 classes, "
                                        f"got '{re.escape(bad)}'"):
        ILSVRCValFolder(val, None, labels=devkit(tmp_path, f"1\n{bad}\n"))


@pytest.mark.parametrize("damage", ["garbage", "empty", "no synsets"])
def test_a_damaged_devkit_synset_table_is_one_line_naming_it(tmp_path, damage):
    from scipy.io import savemat

    val = flat_val(tmp_path)
    labels = devkit(tmp_path, "1\n2\n")
    if damage == "no synsets":
        savemat(tmp_path / "meta.mat", {"other": np.zeros(2)})
    else:
        (tmp_path / "meta.mat").write_bytes(b"garbage\n" if damage == "garbage" else b"")
    meta = re.escape(str(tmp_path / "meta.mat"))
    with pytest.raises(UserError, match=f"^{meta}: not the devkit's synset table") as error:
        ILSVRCValFolder(val, None, labels=labels)
    assert "\n" not in str(error.value)


def test_label_and_class_name_files_may_start_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" and Notepad write a UTF-8 byte-order mark first: no part of a header, synset or name."""
    val = flat_val(tmp_path)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 tench\nn02 goldfish\n", encoding="utf-8-sig")
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\na,n02 1 2 3 4\nb,n01 1 2 3 4\n",
                                                   encoding="utf-8-sig")
    ds = ILSVRCValFolder(val, None)
    assert ds.classes == ["n01", "n02"] and ds.class_names == ["tench", "goldfish"] and ds.targets == [1, 0]
    (tmp_path / "val.txt").write_text("a.jpg 1\nb.jpg n01\n", encoding="utf-8-sig")
    assert ILSVRCValFolder(val, None, labels=tmp_path / "val.txt").targets == [1, 0]
    ground_truth = devkit(tmp_path, "1\n2\n")
    ground_truth.write_bytes(b"\xef\xbb\xbf" + ground_truth.read_bytes())
    assert ILSVRCValFolder(val, None, labels=ground_truth).targets == [1, 0]
    make_tree(tmp_path / "train", {"n01": [(8, 8)], "n02": [(8, 8)]})
    for name in ("classes.txt", "words.txt", "synset_words.txt", "LOC_synset_mapping.txt"):
        (tmp_path / "train" / name).write_text("n01\ttench\nn02\tgoldfish\n", encoding="utf-8-sig")
        assert ImageFolder(tmp_path / "train", None).class_names == ["tench", "goldfish"], name
        (tmp_path / "train" / name).unlink()


def test_a_flat_validation_folder_beside_folders_without_images_is_read_flat(tmp_path):
    """Stray folders (macOS's __MACOSX/ of hidden ._x files, an empty one) do not make a flat folder class folders."""
    val = flat_val(tmp_path)
    (tmp_path / "val.txt").write_text("a.jpg 1\nb.jpg 0\n")
    (val / "__MACOSX").mkdir()
    (val / "__MACOSX" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")
    (val / "empty").mkdir()
    assert find_split(tmp_path, "val") == val
    ds = open_split(val, None)
    assert isinstance(ds, ILSVRCValFolder) and ds.targets == [1, 0]
    save(photo(8, 8), val / "n01" / "c.jpg")  # one folder that holds an image: class folders, and a.jpg, b.jpg?
    with pytest.raises(UserError, match=f"data folder {val} holds class folders .* and images of its own "
                                        r"\(a.jpg, b.jpg\), which no class would read"):
        open_split(val, None)  # they would be left out without a word
    for name in ("a.jpg", "b.jpg"):
        (val / name).rename(val / "n01" / name)
    ds = open_split(val, None)
    assert isinstance(ds, ImageFolder) and ds.classes == ["__MACOSX", "empty", "n01"] and ds.targets == [2, 2, 2]

def test_size_grouped_batches_hold_equal_sizes(tmp_path):
    dims = [(40, 30), (30, 40), (80, 60), (40, 30), (41, 30), (30, 40), (40, 30)]
    make_tree(tmp_path, {"a": dims[:4], "b": dims[4:]})
    ds = ImageFolder(tmp_path, RescaleTransform(15))
    sampler = SizeGroupedBatchSampler(ds, q=15, batch_size=2)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert batches == list(SizeGroupedBatchSampler(ds, q=15, batch_size=2))
    assert batches[0] == [0, 2]  # 40x30 and 80x60 both become 20x15
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    for batch in loader:
        assert batch.images.shape[0] == batch.labels.shape[0] and not batch.skipped
        assert batch.images.shape[2] == 15 or batch.images.shape[3] == 15


def test_an_image_too_large_at_q_is_refused_naming_it_not_skipped_as_unreadable(tmp_path):
    """Skipped, a long strip readable at every other Q would leave their rows too: refused, with the image and Q."""
    make_tree(tmp_path, {"a": [(40, 30), (30, 40)], "b": [(20, 90)]})
    ds = ImageFolder(tmp_path, RescaleTransform(15))
    assert len(SizeGroupedBatchSampler(ds, q=900, batch_size=2)) == 3  # 900 x 4050 pixels: within the bound
    with pytest.raises(UserError, match=r"^\S+b/0\.jpg: rescaled to Q = 1000 it would be 1000 x 4500 pixels, above "
                                        r"the 4\.2 M pixels a test image may have; give a smaller test scale, or leave "
                                        r"the image out$"):
        SizeGroupedBatchSampler(ds, q=1000, batch_size=2)


def test_collate_drops_bad_samples_and_names_them():
    good = torch.zeros(3, 4, 4, dtype=torch.uint8)
    batch = collate([(good, 1, "a.jpg"), (None, 2, "bad.jpg"), (good + 1, 3, "c.jpg")])
    assert batch.images.shape == (2, 3, 4, 4) and batch.labels.tolist() == [1, 3]
    assert batch.skipped == ["bad.jpg"] and batch.images.is_contiguous(memory_format=torch.channels_last)
    empty = collate([(None, 0, "x.jpg")])
    assert empty.images.shape[0] == 0 and empty.skipped == ["x.jpg"]
    with pytest.raises(ValueError, match="sizes"):
        collate([(good, 0, "a"), (torch.zeros(3, 5, 4, dtype=torch.uint8), 0, "b")])


def test_train_loader_with_workers_is_reproducible(tmp_path):
    make_tree(tmp_path, {"a": [(50, 40)] * 4, "b": [(40, 60)] * 4})
    ds = ImageFolder(tmp_path, TrainTransform(crop=32, scale=(36, 48)))

    def epoch() -> list[torch.Tensor]:
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate,
                            generator=torch.Generator().manual_seed(0))
        return [b.images for b in loader]

    first, second = epoch(), epoch()
    assert [b.shape for b in first] == [(4, 3, 32, 32)] * 2
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.real_data("imagenette")
def test_real_imagenette_split():
    ds = ImageFolder(find_split(SHARED / "imagenette", "val"), TrainTransform(crop=224, scale=(256, 256)))
    assert len(ds.classes) == 10 and ds.class_names[0] == "tench"
    image, label, _ = ds[0]
    assert image.shape == (3, 224, 224) and label == 0


def test_jpegs_saved_as_jfif_or_jpe_are_images_and_other_files_are_not(tmp_path):
    """Windows browsers save JPEGs as .jfif; a file without an image's ending (a readme, notes) is not read."""
    for name in ("a.jfif", "b.JPE", "c.jpg"):
        save(photo(8, 8), tmp_path / "data" / "cat" / name)
    (tmp_path / "data" / "cat" / "README").write_text("not an image")
    assert sorted(Path(p).name for p, _ in ImageFolder(tmp_path / "data", None).samples) == ["a.jfif", "b.JPE",
                                                                                               "c.jpg"]


def test_the_data_api_refuses_a_nan_colour_shift_and_a_crop_of_no_pixels():
    with pytest.raises(UserError, match="alpha_std is the standard deviation .* got nan"):
        pca_shift(2, IMAGENET, float("nan"))
    with pytest.raises(UserError, match="alpha_std .* got -0.1"):
        pca_shift(2, IMAGENET, -0.1)
    assert pca_shift(2, IMAGENET, 0.0).eq(0).all()
    with pytest.raises(UserError, match="crop must be a whole number of pixels, at least 1; got 0"):
        TrainTransform(crop=0, scale=(36, 36))
