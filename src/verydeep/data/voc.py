"""PASCAL VOC classification data (Appendix B): images, their classes, and the difficult flags.

A VOC root (``VOCdevkit/VOC2007`` or ``VOC2012``) holds ``JPEGImages/<id>.jpg``,
``Annotations/<id>.xml`` (one ``<object>`` per instance, with its ``<name>`` and an optional
``<difficult>`` flag) and ``ImageSets/Main/{train,val,trainval,test}.txt`` (image ids, one a line).
An image is labelled per class as VOC's own ``<class>_<set>.txt`` files label it: 1 when it shows
a non-difficult instance of the class, 0 ("ignored") when its only instances are difficult, -1
when it shows none. Classes labelled 0 leave the image out of that class's training and scoring.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

import numpy as np

from verydeep.errors import MissingFileError, UserError

#: Label values per (image, class), as in VOC's ``<class>_<set>.txt`` files.
POSITIVE, IGNORED, NEGATIVE = 1, 0, -1


@dataclass(frozen=True)
class VOCObject:
    """One annotated instance: its class name and whether it is marked difficult."""

    name: str
    difficult: bool


@dataclass
class VOCData:
    """The images of a training and a test part: ids, paths, ``labels`` (images x classes, int8 in
    {1, 0, -1}), the part of each image (``train`` or ``test``) and the classes."""

    ids: list[str]
    paths: list[Path]
    labels: np.ndarray
    splits: list[str]
    classes: list[str]
    image_sets: tuple[str, str]  # the ImageSets/Main lists used as the training and test parts


def is_voc(root: str | Path) -> bool:
    """True when ``root`` has VOC's ``Annotations`` and ``JPEGImages`` folders."""
    root = Path(root)
    return (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir()


#: The line each element starts on, for errors that point into an XML file.
ElementLines = dict[ET.Element, int]


def parse_with_lines(path: Path) -> tuple[ET.Element, ElementLines]:
    """The root element of an XML file and the line each element starts on (ElementTree keeps none);
    malformed XML raises :class:`xml.etree.ElementTree.ParseError` as ``ET.parse`` does."""
    builder, lines = ET.TreeBuilder(), {}
    parser = expat.ParserCreate(namespace_separator="}")

    def start(tag: str, attributes: dict[str, str]) -> None:
        lines[builder.start(_qualified(tag), attributes)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: builder.end(_qualified(tag))
    parser.CharacterDataHandler = builder.data
    with path.open("rb") as file:
        try:
            parser.ParseFile(file)
        except expat.ExpatError as error:
            raise ET.ParseError(str(error)) from None
    return builder.close(), lines


def _qualified(tag: str) -> str:
    """expat's ``uri}name`` as ElementTree's ``{uri}name``."""
    return "{" + tag if "}" in tag else tag


def parse_annotation(path: Path) -> ET.Element:
    """The root element of a VOC annotation file; a missing or unreadable one is a one-line error naming it."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such VOC annotation")
    try:
        root, _ = parse_with_lines(path)
    except (ET.ParseError, OSError) as error:
        raise UserError(f"{path}: not a readable VOC annotation ({type(error).__name__}: {error})") from error
    return root


def read_annotation(path: Path) -> list[VOCObject]:
    """The objects of one annotation file; an unreadable or malformed file is a one-line error naming it."""
    root = parse_annotation(path)
    objects = []
    for element in root.iter("object"):
        name = (element.findtext("name") or "").strip()
        difficult = (element.findtext("difficult") or "0").strip()
        if not name or difficult not in ("0", "1"):
            raise UserError(f"{path}: an <object> without a <name>, or with <difficult> not 0 or 1 ({difficult!r})")
        objects.append(VOCObject(name, difficult == "1"))
    return objects


def image_labels(objects: list[VOCObject], classes: list[str]) -> np.ndarray:
    """One image's label per class: 1 (a non-difficult instance), 0 (difficult instances only), -1 (none)."""
    labels = np.full(len(classes), NEGATIVE, dtype=np.int8)
    index = {c: i for i, c in enumerate(classes)}
    for obj in objects:
        if obj.difficult:
            labels[index[obj.name]] = max(labels[index[obj.name]], IGNORED)
        else:
            labels[index[obj.name]] = POSITIVE
    return labels


def read_image_set(root: Path, name: str) -> list[str]:
    """The image ids of ``ImageSets/Main/<name>.txt``."""
    path = root / "ImageSets" / "Main" / f"{name}.txt"
    if not path.is_file():
        raise MissingFileError(f"{path}: no such VOC image set")
    try:
        text = path.read_text(encoding="utf-8-sig")  # without the byte-order mark some editors write first
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def image_sets(root: Path) -> tuple[str, str]:
    """The training and test parts: ``trainval`` (else ``train`` and ``val`` together, ``train+val``) and
    ``test`` where the test annotations are at hand (VOC-2007), else ``train`` and ``val`` (VOC-2012, whose
    test annotations are not public). A test list whose annotations are only partly there is an error."""
    main = root / "ImageSets" / "Main"
    if (main / "test.txt").is_file():
        test = read_image_set(root, "test")
        if not test:  # else the layout would be taken for VOC-2012's, and train.txt blamed
            raise UserError(f"{main / 'test.txt'}: lists no image; give the test part's ids, or remove the file "
                            "to train on train.txt and score val.txt (VOC-2012's layout)")
        annotated = [(root / "Annotations" / f"{i}.xml").is_file() for i in test]
        if test and all(annotated):
            if (main / "trainval.txt").is_file():
                return "trainval", "test"
            if (main / "train.txt").is_file() and (main / "val.txt").is_file():
                return "train+val", "test"
            raise MissingFileError(f"{main / 'trainval.txt'}: no such VOC image set (nor train.txt and val.txt)")
        if any(annotated):
            missing = test[annotated.index(False)]
            raise MissingFileError(f"{root / 'Annotations' / f'{missing}.xml'}: no such VOC annotation, though "
                                   f"{main / 'test.txt'} lists it beside annotated test images")
    return "train", "val"


def part_ids(root: Path, part: str) -> list[str]:
    """The image ids of a part (:func:`image_sets`), each once; an id listed twice is a :class:`UserError`."""
    ids = [i for name in part.split("+") for i in read_image_set(root, name)]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise UserError(f"{root / 'ImageSets' / 'Main'}: image {i} is listed twice in {part}")
        seen.add(i)
    return ids


def open_voc(root: str | Path) -> VOCData:
    """A VOC root's training and test images with their labels (see the module's description).

    The classes are the object names found, sorted: VOC's 20 in the devkit's (alphabetical) order.
    """
    root = Path(root)
    if not is_voc(root):
        raise MissingFileError(f"{root}: not a VOC root (no Annotations/ and JPEGImages/ folders)")
    parts = image_sets(root)
    ids = {part: part_ids(root, part) for part in parts}
    shared = next((i for i in ids[parts[1]] if i in set(ids[parts[0]])), None)
    if shared is not None:
        raise UserError(f"{root / 'ImageSets' / 'Main'}: image {shared} is in both {parts[0]} and {parts[1]}: a "
                        "test image must not train")
    objects = {i: read_annotation(root / "Annotations" / f"{i}.xml") for part in parts for i in ids[part]}
    classes = sorted({obj.name for found in objects.values() for obj in found})
    if not classes:
        raise UserError(f"{root}: its image sets {' and '.join(parts)} list no annotated objects")
    order = [(split, i) for split, part in zip(("train", "test"), parts, strict=True) for i in ids[part]]
    paths = [root / "JPEGImages" / f"{i}.jpg" for _, i in order]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(f"{missing[0]}: no such image ({len(missing)} listed images are missing)")
    labels = np.stack([image_labels(objects[i], classes) for _, i in order])
    return VOCData([i for _, i in order], paths, labels, [s for s, _ in order], classes, parts)
