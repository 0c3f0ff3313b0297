"""Object boxes (Appendix A): IoU, the encoding, boxes that follow the crop plan, the readers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save
from PIL import Image

from verydeep.data import CenterCropTransform, ImageFolder, RescaleTransform, TrainTransform, collate
from verydeep.data.batches import Boxed
from verydeep.data.boxes import (
    Box,
    decode,
    default_boxes,
    encode,
    from_crop,
    iou,
    match_boxes,
    read_boxes,
    to_crop,
    with_boxes,
)
from verydeep.data.transforms import CropPlan
from verydeep.errors import UserError


def test_iou_of_hand_made_boxes():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5], [3, 3, 3, 9]])
    assert iou(a, b)[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0, 0.25, 0.0])


def test_encoding_is_centre_and_size_in_crop_sides_and_decodes_back():
    corners = torch.tensor([[8.0, 4, 24, 32]])
    assert encode(corners, 32).tolist() == [[0.5, 0.5625, 0.5, 0.875]]
    assert torch.allclose(decode(encode(corners, 32), 32), corners)
    assert decode(torch.tensor([[0.5, 0.5, -0.2, 0.1]]), 10).tolist() == [[5.0, 4.5, 5.0, 5.5]]  # no negative width


@pytest.mark.parametrize("plan", [
    CropPlan(1, (10, 5, 42, 37), (32, 32), False),
    CropPlan(1, (10, 5, 42, 37), (32, 32), True),
    CropPlan(2, (3, 1, 19, 17), (64, 64), True),
    CropPlan(1, (0, 0, 80, 60), (40, 30), False),
])
def test_boxes_round_trip_through_rescale_crop_and_flip(plan):
    boxes = torch.tensor([[12.0, 9, 30, 40], [0, 0, 80, 60]])
    assert torch.allclose(from_crop(to_crop(boxes, (80, 60), plan), (80, 60), plan), boxes, atol=1e-4)


def test_flip_mirrors_the_box_in_the_crop():
    box = torch.tensor([[10.0, 5, 20, 15]])
    plain, flipped = (to_crop(box, (40, 40), CropPlan(1, (0, 0, 40, 40), (40, 40), flip)) for flip in (False, True))
    assert plain.tolist() == [[10, 5, 20, 15]] and flipped.tolist() == [[20, 5, 30, 15]]


def boxed_images(images, table, root, transform):
    """``images`` with the boxes of ``table`` matched to them by path."""
    return with_boxes(images, match_boxes(table, [p for p, _ in images.samples], root), transform)


def rectangle_image(path, size=(80, 60), box=(20, 10, 49, 39)):
    """A black image with a white rectangle at inclusive pixels ``box``."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1 + 1, x0:x1 + 1] = 255
    return save(Image.fromarray(pixels), path)


def bright_extent(image: torch.Tensor) -> list[float]:
    """The continuous box of an image's bright pixels."""
    ys, xs = torch.nonzero(image.float().mean(0) > 127, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


@pytest.mark.parametrize("transform", [TrainTransform(32, (40, 48)), CenterCropTransform(36, 32), RescaleTransform(30)])
def test_a_box_follows_its_image_through_the_same_draws(tmp_path, transform):
    path = rectangle_image(tmp_path / "a" / "x.png")
    boxed = boxed_images(ImageFolder(tmp_path, transform), {"a/x.png": [Box(None, 20, 10, 50, 40)]}, tmp_path,
                         transform)
    for seed in range(6):
        item, _, _ = boxed.load(0, torch.Generator().manual_seed(seed))
        assert isinstance(item, Boxed) and item.boxes.shape == (1, 4)
        h, w = item.image.shape[1:]
        visible = torch.minimum(item.boxes[0].clamp(min=0), torch.tensor([w, h, w, h]))  # the crop may cut the box
        assert visible.tolist() == pytest.approx(bright_extent(item.image), abs=1.0)
        assert from_crop(item.frame[None], (80, 60), transform.plan((80, 60), False)).shape == (1, 4)
    assert str(path).endswith("x.png")


@pytest.mark.parametrize("rank, said", [("0", 1), ("1", 0)])
def test_images_without_a_box_are_named_by_the_first_process_alone(tmp_path, caplog, monkeypatch, rank, said):
    """Under torchrun every process matches the whole list: the warning comes once, from the first."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    rectangle_image(tmp_path / "a" / "x.png")
    rectangle_image(tmp_path / "a" / "y.png")
    transform = CenterCropTransform(36, 32)
    with caplog.at_level("WARNING"):
        boxed = boxed_images(ImageFolder(tmp_path, transform), {"a/x.png": [Box(None, 20, 10, 50, 40)]}, tmp_path,
                             transform)
    assert len(boxed) == 1 and sum("without a box" in r.getMessage() for r in caplog.records) == said


def test_collate_pads_boxes_with_nan(tmp_path):
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    items = [(Boxed(image, torch.ones(1, 4), torch.zeros(4)), 0, "a"),
             (Boxed(image, torch.ones(2, 4), torch.zeros(4)), 1, "b"), (None, 0, "c")]
    batch = collate(items)
    assert batch.boxes.shape == (2, 2, 4) and batch.boxes[0, 1].isnan().all() and batch.skipped == ["c"]
    assert batch.frames.shape == (2, 4) and collate([(image, 0, "a")]).boxes is None


def test_the_text_file_reads_inclusive_pixels(tmp_path):
    path = tmp_path / "boxes.txt"
    path.write_text("# relpath xmin ymin xmax ymax\ntrain/a/x.png 0 10 63 58\ntrain/a/x.png 1 1 2 2\n")
    table = read_boxes(path)
    assert table["train/a/x.png"][0] == Box(None, 0, 10, 64, 59, f"{path}:2") and len(table["train/a/x.png"]) == 2



def test_a_text_files_path_may_hold_spaces_and_hashes_the_box_being_the_last_four_numbers(tmp_path):
    path = tmp_path / "boxes.txt"
    path.write_text("  # a comment line\ntrain/red car/0.jpg 5 5 30 30\ntrain/#1 boat/x.png 0 0 9 9  # a note\n"
                    "train/a/y.png\t1 2 3 4\n")
    table = read_boxes(path)
    assert table["train/red car/0.jpg"] == [Box(None, 5, 5, 31, 31, f"{path}:2")]
    assert table["train/#1 boat/x.png"] == [Box(None, 0, 0, 10, 10, f"{path}:3")]
    assert list(table) == ["train/red car/0.jpg", "train/#1 boat/x.png", "train/a/y.png"]

def test_voc_annotations_give_every_object_with_its_class(tmp_path):
    xml = tmp_path / "Annotations" / "img1.xml"
    xml.parent.mkdir()
    xml.write_text("<annotation><object><name>n01</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>20</xmax>"
                   "<ymax>30</ymax></bndbox></object><object><name>n02</name><bndbox><xmin>0</xmin><ymin>0</ymin>"
                   "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    table = read_boxes(tmp_path / "Annotations")
    assert table["img1"] == [Box("n01", 5, 6, 21, 31, f"{xml}:1"), Box("n02", 0, 0, 10, 10, f"{xml}:1")]


def test_a_class_name_on_its_own_line_is_the_name_without_the_spaces(tmp_path):
    """As a pretty-printer writes it, and as the VOC readers of ``transfer`` read it."""
    xml = tmp_path / "Annotations" / "img1.xml"
    xml.parent.mkdir()
    xml.write_text("<annotation>\n <object>\n  <name>\n   red\n  </name>\n  <bndbox><xmin>5</xmin><ymin>6</ymin>"
                   "<xmax>20</xmax><ymax>30</ymax></bndbox>\n </object>\n</annotation>\n")
    assert [box.label for box in read_boxes(tmp_path / "Annotations")["img1"]] == ["red"]


def test_the_kaggle_solution_file(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 10 20 30 40 n01751748 0 0 5 5 \n")
    boxes = read_boxes(path)["ILSVRC2012_val_00000001"]
    assert boxes == [Box("n01751748", 10, 20, 31, 41, f"{path}:2"), Box("n01751748", 0, 0, 6, 6, f"{path}:2")]


def test_tiny_imagenets_own_box_files_as_downloaded_are_its_roots_default_boxes(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for i, wnid in enumerate(("n01443537", "n01629819")):
        save(Image.new("RGB", (64, 64)), root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t{i}\t8\t55\t60\n")
    save(Image.new("RGB", (64, 64)), root / "val" / "images" / "val_0.JPEG")
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn01629819\t1\t2\t3\t4\n")
    assert default_boxes(root) == root and default_boxes(tmp_path) == tmp_path / "boxes.txt"
    table = read_boxes(default_boxes(root))
    assert table["val/images/val_0.JPEG"] == [Box("n01629819", 1, 2, 4, 5, f"{annotations}:1")]
    assert [box.corners for box in table["train/n01629819/images/n01629819_0.JPEG"]] == [(1, 8, 56, 61)]
    matched = match_boxes(table, [root / "val" / "images" / "val_0.JPEG"], root)
    assert matched[str(root / "val" / "images" / "val_0.JPEG")][0].label == "n01629819"
    (root / "boxes.txt").write_text("val/images/val_0.JPEG 0 0 9 9\n")  # a boxes.txt of its own comes first
    assert default_boxes(root) == root / "boxes.txt"
    annotations.write_text("val_0.JPEG\t1\t2\t3\t4\n")
    with pytest.raises(UserError, match=r"val_annotations.txt:1: expected 'file wnid xmin ymin xmax ymax'"):
        read_boxes(root)
    annotations.write_text("my photo.JPEG\tn01629819\t1\t2\t3\t4\t\r\n")  # tab-separated: spaces in a name
    assert read_boxes(root)["val/images/my photo.JPEG"][0].corners == (1, 2, 4, 5)


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_its_path(tmp_path):
    text, csv = tmp_path / "boxes.txt", tmp_path / "LOC_val_solution.csv"
    text.write_bytes(b"\xef\xbb\xbftrain/a/x.png 0 10 63 58\r\ntrain/a/y.png 1 1 2 2\r\n")
    csv.write_bytes(b"\xef\xbb\xbfImageId,PredictionString\r\nval_1,n01 10 20 30 40\r\n")
    assert read_boxes(text) == {"train/a/x.png": [Box(None, 0, 10, 64, 59, f"{text}:1")],
                                "train/a/y.png": [Box(None, 1, 1, 3, 3, f"{text}:2")]}
    assert read_boxes(csv) == {"val_1": [Box("n01", 10, 20, 31, 41, f"{csv}:2")]}
    text.write_bytes(b"\xef\xbb\xbftrain/a/x.png 0 10 63 58\ntrain/\xff 1 1 2 2\n")
    with pytest.raises(UserError, match=f"^{text}: not a text file of boxes \\(byte 34 is not UTF-8\\)$"):
        read_boxes(text)  # counted from the file's first byte, the mark's included


@pytest.mark.parametrize(("name", "text", "message"), [
    ("boxes.txt", "", "holds no boxes"),
    ("boxes.txt", "train/a/x.png 1 2 3\n", r"boxes.txt:1: expected"),
    ("boxes.txt", "train/a/x.png 1 2 3 4 5\n", r"boxes.txt:1: expected"),  # a fifth number, not a path
    ("boxes.txt", "train/a/x.png 5 2 3 4\n", "bad box"),
    ("boxes.txt", "train/a/x.png a b c d\n", "four numbers"),
    ("sol.csv", "ImageId,Other\n", "not a LOC solution"),
    ("sol.csv", "ImageId,PredictionString\nx,n01 1 2 3\n", "groups of"),
    ("sol.csv", "ImageId,PredictionString\nx,n01 1 2 3 4\nval_9\n", r"sol.csv:3: expected groups of"),  # cut off
    ("sol.csv", "ImageId,PredictionString\n.,n01 1 2 3 4\n", r"sol.csv:2: '.' names no image"),
    ("sol.csv", "ImageId,PredictionString\n,n01 1 2 3 4\n", r"sol.csv:2: '' names no image"),
    ("boxes.txt", "train/a/x.png 1 2 3 4\n./ 1 1 5 5\n", r"boxes.txt:2: './' names no image"),
    ("a.xml", "<annotation><object><name>n", "not a valid annotation"),
    ("a.xml", "<annotation><object><name>n</name></object></annotation>", "without a complete bndbox"),
])
def test_bad_box_files_are_one_line_errors_naming_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message) as error:
        read_boxes(tmp_path / name)
    assert name in str(error.value) and "\n" not in str(error.value)


def test_a_box_outside_its_image_is_refused_naming_the_annotation_and_the_image(tmp_path):
    rectangle_image(tmp_path / "a" / "x.png", size=(40, 40), box=(0, 0, 5, 5))
    transform = CenterCropTransform(32, 32)
    table = {"a/x.png": [Box(None, 10, 10, 50, 20, "boxes.txt:7")]}
    with pytest.raises(UserError, match=r"^boxes.txt:7: box 10 10 49 19 is outside the 40x40 image .*x.png$"):
        boxed_images(ImageFolder(tmp_path, transform), table, tmp_path, transform)


def test_a_box_on_the_border_is_clipped_to_the_image(tmp_path):
    rectangle_image(tmp_path / "a" / "x.png", size=(40, 40), box=(0, 0, 5, 5))
    transform = CenterCropTransform(32, 32)
    table = {"a/x.png": [Box(None, 10, 10, 41, 41, "ann/x.xml")]}  # 1-based VOC pixels reach the width
    boxed = boxed_images(ImageFolder(tmp_path, transform), table, tmp_path, transform)
    assert boxed.transform.boxes[str(tmp_path / "a" / "x.png")][0].corners == (10, 10, 40, 40)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_a_coordinate_that_is_not_a_finite_number_names_the_file_and_line(tmp_path, value):
    path = tmp_path / "boxes.txt"
    path.write_text(f"train/a/x.png 1 2 3 4\ntrain/a/y.png 1 2 {value} 4\n")
    with pytest.raises(UserError, match=rf"^{path}:2: box .* not a finite number$"):
        read_boxes(path)


def test_annotations_reach_images_by_path_not_by_file_name(tmp_path):
    """Class folders reuse file names (CIFAR-style): each image gets the box of its own annotation."""
    ann = tmp_path / "Annotations"
    for split, x in (("train", 3), ("val", 11)):
        for cls in ("red", "blue"):
            rectangle_image(tmp_path / split / cls / "002.png")
            (ann / split / cls).mkdir(parents=True, exist_ok=True)
            offset = x + (5 if cls == "blue" else 0)
            (ann / split / cls / "002.xml").write_text(
                f"<annotation><object><bndbox><xmin>{offset}</xmin><ymin>1</ymin><xmax>30</xmax><ymax>20</ymax>"
                "</bndbox></object></annotation>")
    paths = sorted(tmp_path.glob("*/*/002.png"))
    matched = match_boxes(read_boxes(ann), paths, tmp_path)
    firsts = {str(p.relative_to(tmp_path)): matched[str(p)][0].x0 for p in paths}
    assert firsts == {"train/blue/002.png": 8, "train/red/002.png": 3, "val/blue/002.png": 16, "val/red/002.png": 11}
    assert all(matched[str(p)][0].where.endswith(p.relative_to(tmp_path).with_suffix(".xml:1").as_posix())
               for p in paths)


def test_an_annotation_named_by_a_file_name_that_images_share_is_ambiguous(tmp_path):
    paths = [tmp_path / "train" / "red" / "002.png", tmp_path / "val" / "red" / "002.png"]
    with pytest.raises(UserError, match=r"002: matches .*002.png and .*002.png by file name alone"):
        match_boxes({"002": [Box(None, 0, 0, 4, 4)]}, paths, tmp_path)
    with pytest.raises(UserError, match=r"val/002: matches .*002.png and .*002.png by file name under val/"):
        match_boxes({"val/002": [Box(None, 0, 0, 4, 4)]}, [paths[1], tmp_path / "val" / "blue" / "002.png"], tmp_path)
    with pytest.raises(UserError, match=r"train/red/002.png: annotated twice, by train/red/002.png and "
                                        r"train/red/002$"):
        match_boxes({"train/red/002.png": [Box(None, 0, 0, 4, 4)], "train/red/002": [Box(None, 0, 0, 4, 4)]},
                    paths, tmp_path)
    # an id that only one image carries (ILSVRC's, VOC's) still reaches it from a flat folder
    only = [tmp_path / "val" / "n01" / "ILSVRC2012_val_00000001.JPEG"]
    assert match_boxes({"val/ILSVRC2012_val_00000001": [Box(None, 0, 0, 4, 4)]}, only, tmp_path)[str(only[0])]


def test_an_annotation_naming_a_suffix_reaches_only_the_image_of_that_suffix(tmp_path):
    """boxes.txt's val/cat/cat0.jpg is not val/cat/cat0.png's box; a path without a suffix (an XML's) that two
    images share but for theirs is refused."""
    box = [Box(None, 0, 0, 4, 4, "boxes.txt:9")]
    jpg, png = tmp_path / "val" / "cat" / "cat0.jpg", tmp_path / "val" / "cat" / "cat0.png"
    assert match_boxes({"val/cat/cat0.jpg": box}, [jpg, png], tmp_path) == {str(jpg): box, str(png): []}
    assert match_boxes({"val/cat/cat0.JPG": box}, [jpg], tmp_path) == {str(jpg): box}  # the suffix's case aside
    with pytest.raises(UserError, match=r"val/cat/cat0: matches .*cat0.jpg and .*cat0.png, which differ only by"):
        match_boxes({"val/cat/cat0": box}, [jpg, png], tmp_path)


def test_an_annotation_reaches_only_the_image_at_its_path_never_one_sharing_its_tail(tmp_path):
    """A test image's box never reaches the validation image of the same class and file name."""
    box = [Box(None, 0, 0, 4, 4, "boxes.txt:17")]
    val, train = tmp_path / "val" / "cat" / "same.jpg", tmp_path / "train" / "cat" / "cat0.jpg"
    assert match_boxes({"test/cat/same.jpg": box}, [train, val], tmp_path) == {str(train): [], str(val): []}
    # annotations under other folders than the image's, however much of their tail they share with it
    red = tmp_path / "red" / "002.png"
    assert match_boxes({"train/red/002": box, "val/red/002": box}, [red], tmp_path) == {str(red): []}
    assert match_boxes({"blue/002": box, "green/002": box}, [tmp_path / "train" / "red" / "002.png"],
                       tmp_path) == {str(tmp_path / "train" / "red" / "002.png"): []}


def test_an_image_takes_the_boxes_of_its_path_before_those_of_its_id(tmp_path):
    image = tmp_path / "val" / "n01" / "x.JPEG"
    by_path, by_id = [Box(None, 0, 0, 4, 4, "path")], [Box(None, 0, 0, 8, 8, "id")]
    for table in ({"val/n01/x": by_path, "x": by_id}, {"x": by_id, "val/n01/x": by_path, "val/x": by_id}):
        assert match_boxes(table, [image], tmp_path) == {str(image): by_path}
    assert match_boxes({"x": by_id, "val/x": by_path}, [image], tmp_path) == {str(image): by_path}  # the longer id


@pytest.mark.parametrize("value", ["1_0", "0x5", "\u0661\u0662"])
def test_a_coordinate_must_be_a_plain_decimal_number_named_by_file_and_line(tmp_path, value):
    path = tmp_path / "boxes.txt"
    path.write_text(f"train/a/x.png 1 2 3 4\ntrain/a/y.png {value} 2 30 4\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:2: a box is four numbers xmin ymin xmax ymax .*{value}"):
        read_boxes(path)


def test_xml_box_errors_name_the_line_of_the_offending_element(tmp_path):
    folder = tmp_path / "Annotations"
    (folder / "train" / "cat").mkdir(parents=True)
    xml = folder / "train" / "cat" / "cat0.xml"
    good = "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    bad = "<bndbox>\n<xmin>nan</xmin><ymin>6</ymin><xmax>30</xmax><ymax>25</ymax>\n</bndbox>"
    xml.write_text(f"<annotation>\n{good}\n<object>\n<name>cat</name>\n{bad}\n</object>\n</annotation>\n")
    with pytest.raises(UserError, match=rf"^{xml}:5: box nan 6 30 25 has a coordinate that is not a finite number$"):
        read_boxes(folder)
    empty = bad.replace("30", "")
    xml.write_text(f"<annotation>\n{good}\n<object>\n<name>cat</name>\n{empty}\n</object>\n</annotation>\n")
    with pytest.raises(UserError, match=rf"^{xml}:5: a box is four numbers .*, got 'nan' '6' '' '25'$"):  # empty: seen
        read_boxes(folder)
    xml.write_text(f"<annotation>\n{good}\n<object>\n<name>cat</name>\n</object>\n</annotation>\n")
    with pytest.raises(UserError, match=rf"^{xml}:3: an object without a complete bndbox$"):
        read_boxes(folder)
    xml.write_text(f"<annotation>\n{good}\n<object>\n</annotation>\n")
    with pytest.raises(UserError, match=rf"^{xml}: not a valid annotation file \(mismatched tag: line 4, column 2\)$"):
        read_boxes(folder)
    xml.write_text(f"<annotation>\n\n{good}\n</annotation>\n")
    assert read_boxes(folder)["train/cat/cat0"] == [Box("cat", 1, 1, 10, 10, f"{xml}:3")]


def test_images_without_a_box_of_their_class_are_skipped_by_name(tmp_path, caplog):
    for name in ("a/x.png", "a/y.png", "b/z.png"):
        rectangle_image(tmp_path / name)
    transform = CenterCropTransform(32, 32)
    table = {"a/x.png": [Box(None, 0, 0, 4, 4)], "z": [Box("a", 0, 0, 4, 4)]}  # z's box is of another class
    boxed = boxed_images(ImageFolder(tmp_path, transform), table, tmp_path, transform)
    assert [path.name for path, _ in boxed.samples] == ["x.png"]
    assert "skipped 2 images" in caplog.text and "y.png" in caplog.text
    with pytest.raises(UserError, match="has a box of its class"):
        boxed_images(ImageFolder(tmp_path, transform), {"q": [Box(None, 0, 0, 1, 1)]}, tmp_path, transform)
