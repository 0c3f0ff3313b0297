"""A stand-in for VOC-2012 action classification (Table 12) on real images: Tiny ImageNet's object boxes
written in the VOC-2012 action layout, each object's class as its "action".

No VOC action data is at hand. This writes under OUT:

- ``VOC2012/``: ``--classes`` Tiny ImageNet classes drawn with ``--seed``, ``--train-per-class`` images
  of each from ``train/`` and all of ``val/``, as VOC's action layout: ``JPEGImages/<id>.jpg`` (the
  files' bytes), ``Annotations/<id>.xml`` (the image's one box of ``boxes.txt``, matched by path, in
  VOC's 1-based pixels, its ``<actions>`` flagging its class), ``ImageSets/Action/{train,val}.txt``
  and ``<wnid>_{train,val}.txt``;
- ``pretrain/{train,val}/<wnid>/``: links to the images of ``--pretrain-classes`` other classes, to
  train the net whose features are used, so that it has never seen the stand-in's classes.

Then, as docs/transfer.md shows: ``verydeep train`` on ``pretrain/``, ``verydeep features --regions
image`` and ``--regions image+box`` on ``VOC2012/``, ``verydeep transfer --protocol voc-action``.

    python benchmarks/voc_action_standin.py --out /tmp/standin
"""

from __future__ import annotations

import argparse
import random
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from verydeep.data import ImageFolder
from verydeep.data.boxes import Box, match_boxes, read_boxes
from verydeep.data.decode import image_size

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet"


def annotation(image: str, size: tuple[int, int], box: Box, action: str, actions: list[str]) -> ET.ElementTree:
    """A VOC action annotation of one object: its box as VOC's 1-based inclusive pixels, its action flags."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = image
    dims = ET.SubElement(root, "size")
    for tag, value in (("width", size[0]), ("height", size[1]), ("depth", 3)):
        ET.SubElement(dims, tag).text = str(value)
    obj = ET.SubElement(root, "object")
    ET.SubElement(obj, "name").text = "person"  # the layout's name; the object is of the class its flags say
    corners = ET.SubElement(obj, "bndbox")
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (box.x0 + 1, box.y0 + 1, box.x1, box.y1), strict=True):
        ET.SubElement(corners, tag).text = f"{value:g}"  # [x0, x1) continuous -> 1-based inclusive x0 + 1 .. x1
    flags = ET.SubElement(obj, "actions")
    for name in [*actions, "other"]:
        ET.SubElement(flags, name).text = str(int(name == action))
    return ET.ElementTree(root)


def write_part(data: Path, out: Path, part: str, classes: list[str], per_class: int | None) -> list[str]:
    """Copy ``per_class`` images (all when None) of each class of ``data/<part>`` into the VOC root ``out``
    with their annotations; the image ids written."""
    folder = ImageFolder(data / part, None)
    chosen = [(path, folder.classes[label]) for path, label in folder.samples if folder.classes[label] in classes]
    by_class = {c: [p for p, label in chosen if label == c][:per_class] for c in classes}
    paths = [p for c in classes for p in by_class[c]]
    boxes = match_boxes(read_boxes(data / "boxes.txt"), paths, data)
    ids = []
    for c in classes:
        for path in by_class[c]:
            image_id = f"{part}_{path.stem}"
            shutil.copyfile(path, out / "JPEGImages" / f"{image_id}.jpg")
            (box,) = boxes[str(path)]
            annotation(f"{image_id}.jpg", image_size(path), box, c, classes).write(
                out / "Annotations" / f"{image_id}.xml")
            ids.append((image_id, c))
    lists = out / "ImageSets" / "Action"
    (lists / f"{part}.txt").write_text("".join(f"{i} 1\n" for i, _ in ids))
    for c in classes:
        (lists / f"{c}_{part}.txt").write_text("".join(f"{i} 1 {1 if a == c else -1}\n" for i, a in ids))
    return [i for i, _ in ids]


def link_pretraining(data: Path, out: Path, classes: list[str]) -> None:
    """``out/{train,val}/<wnid>``: links to Tiny ImageNet's class folders of ``classes``."""
    for part in ("train", "val"):
        (out / part).mkdir(parents=True, exist_ok=True)
        for c in classes:
            (out / part / c).symlink_to((data / part / c).resolve(), target_is_directory=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="Tiny ImageNet (train/, val/, boxes.txt)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for VOC2012/ and pretrain/")
    parser.add_argument("--classes", type=int, default=5, help="stand-in classes, the actions (default 5)")
    parser.add_argument("--train-per-class", type=int, default=60, help="training images of each (default 60)")
    parser.add_argument("--pretrain-classes", type=int, default=100, help="other classes, to train the net on")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of the classes")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists; give a new folder")
    wnids = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    drawn = random.Random(args.seed).sample(wnids, args.classes + args.pretrain_classes)
    classes, others = sorted(drawn[: args.classes]), sorted(drawn[args.classes:])
    voc = args.out / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Action"):
        (voc / sub).mkdir(parents=True)
    train = write_part(args.data, voc, "train", classes, args.train_per_class)
    val = write_part(args.data, voc, "val", classes, None)
    link_pretraining(args.data, args.out / "pretrain", others)
    print(f"{voc}: {len(train)} training and {len(val)} val persons, actions {' '.join(classes)}")
    print(f"{args.out / 'pretrain'}: {len(others)} other classes to train the net on")


if __name__ == "__main__":
    main()
