"""Bad data: every kind of broken or unusual file works or is skipped and named; stats."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from verydeep.cli import main
from verydeep.data import (
    IMAGENET,
    BadImageError,
    ImageFolder,
    RescaleTransform,
    TrainTransform,
    collate,
    compute_stats,
    load_preprocess,
)
from verydeep.errors import UserError


def jpeg_bytes(w: int = 64, h: int = 48) -> bytes:
    from io import BytesIO

    rng = np.random.default_rng(0)
    buffer = BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_zoo(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """A class folder of unusual-but-valid images and one of broken files."""
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    works = {
        "rgb": good / "rgb.jpg",
        "grey": good / "grey.jpg",
        "cmyk": good / "cmyk.jpg",
        "grey16": good / "grey16.png",
        "rgba": good / "rgba.png",
        "palette": good / "palette.gif",
        "tiny": good / "tiny.png",
        "rotated": good / "rotated.jpg",
    }
    works["rgb"].write_bytes(jpeg_bytes())
    Image.new("L", (50, 40), 90).save(works["grey"])
    Image.new("CMYK", (50, 40), (255, 0, 0, 0)).save(works["cmyk"])  # pure cyan
    Image.fromarray(np.full((40, 50), 32768, np.uint16)).save(works["grey16"])  # mid grey in 16 bits
    Image.new("RGBA", (50, 40), (10, 200, 30, 128)).save(works["rgba"])
    Image.new("P", (50, 40), 3).save(works["palette"], transparency=3)
    Image.new("RGB", (5, 4), (250, 0, 0)).save(works["tiny"])  # smaller than any crop
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (60, 40), (0, 0, 250)).save(works["rotated"], exif=exif)
    broken = {
        "truncated": bad / "truncated.jpg",
        "cut": bad / "cut.jpg",
        "corrupt": bad / "corrupt.jpg",
        "empty": bad / "empty.jpg",
        "text": bad / "notes.png",
    }
    broken["truncated"].write_bytes(jpeg_bytes()[:400])  # in the header
    broken["cut"].write_bytes(jpeg_bytes()[:-600])  # in the data
    broken["corrupt"].write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    broken["empty"].write_bytes(b"")
    broken["text"].write_text("this is not an image\n")
    return works, broken


def test_unusual_images_decode_correctly(tmp_path):
    works, _ = make_zoo(tmp_path)
    read = RescaleTransform(8)
    assert read(works["grey16"]).float().mean() == pytest.approx(128, abs=1)  # scaled, not clipped
    cyan = read(works["cmyk"]).float().mean((1, 2))
    assert cyan[0] < 10 and cyan[1] > 245 and cyan[2] > 245
    assert read(works["grey"]).float().mean((1, 2)).tolist() == [90, 90, 90]
    assert read(works["tiny"]).shape == (3, 8, 10)  # upsampled to the smallest side Q
    assert read(works["rotated"]).shape == (3, 12, 8)  # EXIF 8: displayed portrait


def test_a_float_image_is_scaled_and_one_holding_nan_is_unreadable_without_numpys_warning(tmp_path):
    """A floating-point TIFF of 0..1 is read as grey levels; NaN or infinity has none (numpy's cast of it would
    warn over two lines, and give what it gives)."""
    Image.fromarray(np.full((40, 50), 0.5, np.float32)).save(tmp_path / "half.tiff")
    assert RescaleTransform(8)(tmp_path / "half.tiff").float().mean() == pytest.approx(128, abs=1)
    for value in (float("nan"), float("inf")):
        Image.new("F", (50, 40), value).save(tmp_path / "odd.tiff")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"pixel values that are not finite \(NaN or infinity\)"):
                RescaleTransform(8)(tmp_path / "odd.tiff")


def test_broken_files_through_a_loader_are_skipped_named_and_counted(tmp_path):
    works, broken = make_zoo(tmp_path)
    dataset = ImageFolder(tmp_path, TrainTransform(crop=16, scale=(16, 24)))
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
    images, skipped, sizes = 0, [], []
    for batch in loader:
        assert batch.images.dtype == torch.uint8 and len(batch.labels) == batch.images.shape[0]
        sizes.append(tuple(batch.images.shape))
        images += batch.images.shape[0]
        skipped += batch.skipped
    # "bad" sorts first: its first batch is all broken and comes out empty, not as a crash
    assert sizes[0] == (0, 3, 0, 0) and all(s[1:] == (3, 16, 16) for s in sizes[1:])
    assert images == len(works)
    assert sorted(skipped) == sorted(str(p) for p in broken.values())


def test_a_jpeg_cut_short_is_skipped_whatever_the_crop(tmp_path):
    """A crop's box may end before the data does; the file is refused all the same."""
    _, broken = make_zoo(tmp_path)
    transform = TrainTransform(crop=16, scale=(16, 24))
    for seed in range(100):
        with pytest.raises(OSError, match="truncated"):
            transform(broken["cut"], torch.Generator().manual_seed(seed))


def test_a_bad_file_is_one_log_line_naming_it(tmp_path, caplog):
    _, broken = make_zoo(tmp_path)
    dataset = ImageFolder(tmp_path, RescaleTransform(8))
    index = [str(p) for p, _ in dataset.samples].index(str(broken["truncated"]))
    with caplog.at_level(logging.WARNING, logger="verydeep.data"):
        image, _, path = dataset[index]
    assert image is None and path == str(broken["truncated"])
    assert len(caplog.records) == 1 and str(broken["truncated"]) in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()


def test_a_file_name_with_a_line_break_is_named_on_one_line_that_cannot_pass_for_two(tmp_path, caplog):
    good = tmp_path / "a" / "0.jpg"
    good.parent.mkdir()
    good.write_bytes(jpeg_bytes())
    evil = tmp_path / "a" / "x\nskipped 0.jpg: unreadable image.jpg"
    evil.write_bytes(jpeg_bytes()[:300])
    dataset = ImageFolder(tmp_path, RescaleTransform(8))
    with caplog.at_level(logging.WARNING, logger="verydeep.data"):
        assert dataset[[Path(p) for p, _ in dataset.samples].index(evil)][0] is None
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"skipped {tmp_path / 'a'}/x\\nskipped 0.jpg: unreadable image.jpg: unreadable image (")
    assert "\n" not in message


def test_pipes_and_hidden_files_among_the_images_are_not_read_as_images(tmp_path):
    """A pipe named like an image would wait for ever for a writer; a hidden file (macOS's ._x.jpg) is no image."""
    import os

    from verydeep.data.datasets import images_in
    from verydeep.serve import example_images

    for folder in (tmp_path / "split" / "a", tmp_path / "split" / "b", tmp_path / "flat"):
        folder.mkdir(parents=True)
        (folder / "0.jpg").write_bytes(jpeg_bytes())
        os.mkfifo(folder / "pipe.jpg")
        (folder / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    (tmp_path / "split" / "b" / "link.jpg").symlink_to(tmp_path / "split" / "a" / "pipe.jpg")
    (tmp_path / "split" / "b" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # skipped as unreadable when read
    assert [Path(p) for p, _ in ImageFolder(tmp_path / "split", RescaleTransform(8)).samples] == [
        tmp_path / "split" / "a" / "0.jpg", tmp_path / "split" / "b" / "0.jpg", tmp_path / "split" / "b" / "gone.jpg"]
    assert images_in(tmp_path / "flat") == [tmp_path / "flat" / "0.jpg"]
    assert example_images(tmp_path / "split") == [tmp_path / "split" / "a" / "0.jpg",
                                                  tmp_path / "split" / "b" / "0.jpg"]

def test_pillow_s_warnings_naming_no_file_are_not_shown(tmp_path):
    """Pillow warns of a damaged EXIF block and of a large image in two lines naming no file: the first is read as
    far as it goes (upright), the size of the second bounded where the image is planned."""
    import io
    import warnings

    from verydeep.data.decode import ImageFile, decode

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(buffer, "JPEG", exif=exif)
    data = bytearray(buffer.getvalue())
    ifd = data.find(b"Exif\x00\x00MM\x00*") + 10  # big-endian TIFF header; then the first IFD's offset
    damaged = bytes(data[:ifd]) + (0xFFFF).to_bytes(4, "big") + bytes(data[ifd + 4 :])  # past the block's end
    assert damaged != bytes(data)
    (tmp_path / "exif.jpg").write_bytes(damaged)
    frame = data.find(b"\xff\xc0")
    data[frame + 5 : frame + 9] = (10_000).to_bytes(2, "big") * 2  # 100 M pixels: Pillow's warning, not its error
    (tmp_path / "large.jpg").write_bytes(data)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert ImageFile(tmp_path / "exif.jpg").size == (16, 16)
        assert decode(ImageFile(tmp_path / "exif.jpg").pillow()).getpixel((8, 8))[2] > 150
        assert ImageFile(tmp_path / "large.jpg").size == (10_000, 10_000)
    assert [str(w.message) for w in shown] == []

def test_a_bad_file_read_again_is_skipped_each_time_and_named_once(tmp_path, caplog):
    """Every epoch counts the skip; the log names the file once, by its path, not the stream Pillow read."""
    _, broken = make_zoo(tmp_path)
    corrupt = str(broken["corrupt"])  # Pillow's own message names the in-memory stream it was given
    index = [str(p) for p, _ in ImageFolder(tmp_path, RescaleTransform(8)).samples].index(corrupt)
    with caplog.at_level(logging.WARNING, logger="verydeep.data"):
        items = [ImageFolder(tmp_path, RescaleTransform(8))[index] for _ in range(3)]
    assert all(image is None and path == corrupt for image, _, path in items)
    assert [r.getMessage() for r in caplog.records] == [f"skipped {corrupt}: unreadable image "
                                                        "(UnidentifiedImageError: cannot identify image file)"]


def test_strict_mode_fails_fast_naming_the_file(tmp_path):
    _, broken = make_zoo(tmp_path)
    dataset = ImageFolder(tmp_path, RescaleTransform(8), strict=True)
    with pytest.raises(BadImageError, match="corrupt.jpg"):
        for _ in DataLoader(dataset, batch_size=4, collate_fn=collate):
            pass


# ---- verydeep data stats ------------------------------------------------------------------


def test_each_image_weighs_its_pixels_at_the_training_scale_however_its_jpeg_is_reduced(tmp_path):
    """A JPEG of smallest side 512 is decoded halved at side 256, one of 511 whole: counted as decoded, the first
    would weigh a quarter of the second, and the mean would follow file sizes in steps of four."""
    Image.fromarray(np.full((511, 511, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.jpg", quality=95)
    Image.fromarray(np.full((512, 512, 3), (0, 0, 255), np.uint8)).save(tmp_path / "blue.jpg", quality=95)
    for side in (256, 200):
        pre, _ = compute_stats(tmp_path, side=side, mean_only=True, progress=False)
        np.testing.assert_allclose(pre.mean, (0.5, 0.0, 0.5), atol=0.005)


def test_stats_match_the_pixels_and_are_stored_for_load_preprocess(tmp_path, capsys):
    rng = np.random.default_rng(0)
    mix = np.array([[1.0, 0.5, 0.2], [0.0, 0.6, 0.3], [0.0, 0.0, 0.2]])  # correlated channels
    arrays = []
    for i in range(6):
        noise = rng.normal(0, 40, (20 + i, 24, 3)) @ mix + [120, 100, 80]
        arrays.append(np.clip(noise, 0, 255).astype(np.uint8))
        (tmp_path / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arrays[-1]).save(tmp_path / "train" / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "train" / "c0" / "broken.png").write_bytes(b"\x89PNG junk")
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrays]).astype(np.float64) / 255
    # each image weighs the pixels it has at the training scale, smallest side 256 (torchvision's rounding)
    weights = np.concatenate([np.full(a.shape[0] * a.shape[1], (256 * int(256 * max(a.shape[:2]) / min(a.shape[:2])))
                                      / (a.shape[0] * a.shape[1])) for a in arrays])

    pre, summary = compute_stats(tmp_path / "train", sample=100, progress=False)
    assert summary["images"] == 6 and len(summary["skipped"]) == 1
    np.testing.assert_allclose(pre.mean, np.average(pixels, axis=0, weights=weights), rtol=1e-9)
    cov = np.cov(pixels.T, aweights=weights, bias=True)
    np.testing.assert_allclose(pre.std, np.sqrt(cov.diagonal()), rtol=1e-9)
    vec, val = np.array(pre.eigvec), np.array(pre.eigval)
    assert list(val) == sorted(val, reverse=True)
    np.testing.assert_allclose(vec @ np.diag(val) @ vec.T, cov, atol=1e-9)  # columns are eigenvectors

    assert main(["data", "stats", str(tmp_path), "--sample", "100", "--workers", "0", "--mean-only"]) == 0
    stored = load_preprocess(tmp_path)
    np.testing.assert_allclose(stored.mean, pre.mean)
    np.testing.assert_allclose(stored.eigval, pre.eigval)
    assert stored.std == (1 / 255,) * 3
    assert "skipped" in capsys.readouterr().out


def test_stats_of_a_flat_folder_of_unlabelled_images_are_those_of_its_images(tmp_path):
    """Statistics need no labels: a folder of images without a ground-truth file is read as it is."""
    (tmp_path / "flat").mkdir()
    for name, colour in (("a", (10, 200, 30)), ("b", (200, 10, 30))):
        (tmp_path / "classes" / name).mkdir(parents=True)
        Image.new("RGB", (36, 36), colour).save(tmp_path / "classes" / name / "0.png")
        Image.new("RGB", (36, 36), colour).save(tmp_path / "flat" / f"{name}.png")
    flat, _ = compute_stats(tmp_path / "flat", mean_only=True, progress=False)
    foldered, _ = compute_stats(tmp_path / "classes", mean_only=True, progress=False)
    assert flat.mean == pytest.approx(foldered.mean) and flat.mean == pytest.approx((105 / 255, 105 / 255, 30 / 255))
    for stray in (tmp_path / "val.txt", tmp_path / "flat" / "val.txt"):  # a label file beside them is not theirs
        stray.write_text("unrelated 3\n")
        beside, summary = compute_stats(tmp_path / "flat", mean_only=True, progress=False)
        assert beside.mean == pytest.approx(flat.mean) and summary["images"] == 2


def test_stats_on_a_missing_folder_is_one_clear_error(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nope"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err and "does not exist" in err


def test_stats_of_images_of_one_colour_say_what_to_do_instead(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (36, 36), (10, 200, 30)).save(tmp_path / "train" / name / f"{i}.png")
    assert main(["data", "stats", str(tmp_path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hardly vary in R (std" in err and "give --mean-only" in err
    assert not (tmp_path / "preprocess.json").exists()
    assert main(["data", "stats", str(tmp_path), "--workers", "0", "--mean-only"]) == 0
    assert load_preprocess(tmp_path).mean == pytest.approx((10 / 255, 200 / 255, 30 / 255))


def test_statistics_of_the_training_split_are_the_datasets(tmp_path):
    for name, colour in (("a", (10, 200, 30)), ("b", (200, 10, 30))):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (36, 36), colour).save(tmp_path / "train" / name / f"{i}.png")
    assert main(["data", "stats", str(tmp_path / "train"), "--workers", "0", "--mean-only"]) == 0
    assert (tmp_path / "train" / "preprocess.json").is_file()  # where train --data DIR finds it
    assert load_preprocess(tmp_path).mean == pytest.approx((105 / 255, 105 / 255, 30 / 255))
    (tmp_path / "train" / "preprocess.json").replace(tmp_path / "preprocess.json")
    assert load_preprocess(tmp_path / "val").mean == pytest.approx((105 / 255, 105 / 255, 30 / 255))  # its dataset's
    (tmp_path / "other" / "train").mkdir(parents=True)  # a dataset beside, in the folder that holds the file
    assert load_preprocess(tmp_path / "other") == IMAGENET  # not the neighbouring dataset's statistics


def test_a_link_back_into_the_data_is_refused_naming_it_and_other_links_are_followed(tmp_path, capsys):
    for name in ("cat", "dog", "more dogs"):
        (tmp_path / "store" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (36, 36), (10 * i, 200, 30)).save(tmp_path / "store" / name / f"{i}.png")
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    for name in ("cat", "dog"):  # class folders linked in from elsewhere, as a subset is often made
        (train / name).symlink_to(tmp_path / "store" / name)
    (tmp_path / "store" / "dog" / "more").symlink_to(tmp_path / "store" / "more dogs")  # and a subfolder
    dataset = ImageFolder(train, RescaleTransform(8))
    assert sorted(dataset.targets) == [0, 0, 1, 1, 1, 1]
    (tmp_path / "store" / "cat" / "loop").symlink_to(tmp_path / "store")  # cat/loop/dog/... would be cats, forever
    with pytest.raises(UserError, match=f"{train / 'cat' / 'loop'}: the folder {tmp_path / 'store'} is read as"):
        ImageFolder(train, RescaleTransform(8))
    assert main(["data", "stats", str(tmp_path / "data"), "--workers", "0", "--mean-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "so its images would be counted twice); remove the link" in err


@pytest.mark.parametrize("link_in", ["dog", "cat"])
def test_a_link_from_one_class_folder_to_another_is_refused_naming_it(tmp_path, link_in):
    train = tmp_path / "train"
    for name in ("cat", "dog"):
        (train / name).mkdir(parents=True)
        Image.new("RGB", (36, 36), (200, 30, 30)).save(train / name / "0.png")
    other = "cat" if link_in == "dog" else "dog"
    (train / link_in / "more").symlink_to(train / other)  # the other class's images under this class too
    with pytest.raises(UserError, match=r"the folder .* is read as .* too, or holds it"):
        ImageFolder(train, RescaleTransform(8))
