"""PASCAL VOC-2012 action classification data (Appendix B, Table 12): persons, their boxes and actions.

A VOC root holds ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and ``ImageSets/Action/``:
``<part>.txt`` (an image id and a person index a line) and ``<action>_<part>.txt`` (image id,
person index, label) for the ``train`` and ``val`` parts (VOC-2012's test labels are not public).
The person index counts the annotation's ``<object>`` elements from 1, as the devkit's
``rec.objects(objid)`` does; that object's ``<bndbox>`` (1-based inclusive pixels) is the person
box, its ``<actions>`` flags (``<jumping>1</jumping>`` ..., and ``<other>``) say what it does.

A sample is one (image, person) with a label per action as the ``<action>_<part>.txt`` files give
it, as :mod:`verydeep.data.voc` labels images: 1 (does it), -1 (does not), 0 (left out of that
action's training and scoring); a person marked ``<difficult>1</difficult>`` is 0 for every action.
The actions are those with a list for both parts, sorted (VOC-2012's ten); ``other`` is a flag of
the person (none of the ten), not an action scored. Lists that disagree with each other or with
the annotations, a damaged annotation, a box that is not a box inside its image: one line naming
the file (and line), nothing read. An image whose header cannot be read is skipped and named.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from verydeep.data.boxes import Box, bndbox_values, pixel_box
from verydeep.data.datasets import DECODE_ERRORS, report_skip
from verydeep.data.decode import image_size
from verydeep.data.voc import IGNORED, NEGATIVE, POSITIVE, parse_annotation
from verydeep.errors import MissingFileError, UserError
from verydeep.runtime.limits import whole_number
from verydeep.runtime.processes import Processes

log = logging.getLogger("verydeep.data")

#: VOC-2012's parts with public labels: the training part and the one scored.
PARTS = ("train", "val")
#: The flag of a person doing none of the actions.
OTHER = "other"
#: An image id: a file name without folders (it names ``JPEGImages/<id>.jpg`` and ``Annotations/<id>.xml``).
IMAGE_ID = re.compile(r"[\w.-]+")


@dataclass(frozen=True)
class Person:
    """One annotated object of an action annotation: its box values as written (VOC's 1-based inclusive
    ``xmin ymin xmax ymax``, None when incomplete), difficult flag, action flags (name -> 0 or 1; None without
    an ``<actions>`` element) and its ``<name>`` (None when it has none)."""

    box: tuple[str, str, str, str] | None
    difficult: bool
    actions: dict[str, int] | None
    name: str | None = None


@dataclass(frozen=True)
class ActionSample:
    """One (image, person): the image, the person's index among the annotation's objects (from 1), its box
    in continuous pixels of the image (``Box.where``: the annotation), the image's size, and ``other``."""

    image_id: str
    person: int
    path: Path
    box: Box
    size: tuple[int, int]
    other: bool


@dataclass
class VOCActionData:
    """The persons of the training and the scored part: ``labels`` (persons x actions, int8 in {1, 0, -1}),
    the part of each (``train``, or ``test`` for VOC's ``val``), the actions, and the images skipped."""

    samples: list[ActionSample]
    labels: np.ndarray
    splits: list[str]
    actions: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]


def is_voc_action(root: str | Path) -> bool:
    """True when ``root`` has VOC's ``Annotations``, ``JPEGImages`` and ``ImageSets/Action`` folders."""
    root = Path(root)
    return all((root / sub).is_dir() for sub in ("Annotations", "JPEGImages", "ImageSets/Action"))


# ---- lists and annotations ------------------------------------------------------------------


def read_action_list(path: Path, labelled: bool) -> dict[tuple[str, int], tuple[int, str]]:
    """``(image id, person) -> (label, "file:line")`` of an ``ImageSets/Action`` list: lines of an image id
    and a person index from 1, and a label in {1, 0, -1} when ``labelled`` (else 1); a pair listed twice,
    a bad id or number is a one-line error naming the file and line."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such VOC action list")
    try:
        text = path.read_text(encoding="utf-8-sig")  # without the byte-order mark some editors write first
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None
    pairs: dict[tuple[str, int], tuple[int, str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts, where = line.split(), f"{path}:{number}"
        if not parts:
            continue
        if len(parts) != 2 + labelled:
            raise UserError(f"{where}: expected '{'image person label' if labelled else 'image person'}', "
                            f"got {line.strip()!r}")
        person, label = _integer(parts[1], where), _integer(parts[2], where) if labelled else POSITIVE
        if not IMAGE_ID.fullmatch(parts[0]) or person < 1 or label not in (POSITIVE, IGNORED, NEGATIVE):
            raise UserError(f"{where}: expected an image id, a person index from 1 and a label of 1, 0 or -1; "
                            f"got {line.strip()!r}")
        if (parts[0], person) in pairs:
            raise UserError(f"{where}: person {person} of {parts[0]} listed twice (also {pairs[parts[0], person][1]})")
        pairs[parts[0], person] = (label, where)
    return pairs


def _integer(text: str, where: str) -> int:
    try:
        return whole_number(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a whole number") from None


def read_persons(path: Path) -> tuple[list[Person], tuple[int, int] | None]:
    """The objects of an action annotation, in order, and the image size it states (None when it states
    none); an unreadable file or a flag that is not 0 or 1 is a one-line error naming it."""
    root = parse_annotation(path)
    persons = []
    for obj in root.iter("object"):
        flags = {"difficult": (obj.findtext("difficult") or "0").strip()}
        actions = obj.find("actions")
        flags |= {a.tag: (a.text or "").strip() for a in (actions if actions is not None else [])}
        odd = next(((tag, value) for tag, value in flags.items() if value not in ("0", "1")), None)
        if odd is not None:
            raise UserError(f"{path}: <{odd[0]}> must be 0 or 1; got {odd[1]!r}")
        name = obj.findtext("name")
        persons.append(Person(bndbox_values(obj), flags.pop("difficult") == "1",
                              None if actions is None else {tag: int(v) for tag, v in flags.items()},
                              None if name is None else name.strip()))
    return persons, _stated_size(root, path)


def _stated_size(root: ET.Element, path: Path) -> tuple[int, int] | None:
    """``<size><width>`` and ``<height>`` when given, checked to be positive whole numbers."""
    width, height = root.findtext("size/width"), root.findtext("size/height")
    if width is None or height is None:
        return None
    try:
        size = whole_number(width), whole_number(height)
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise UserError(f"{path}: <size> must give a positive whole width and height; got {width!r} x {height!r}")
    return size


def person_box(values: tuple[str, str, str, str] | None, size: tuple[int, int], where: str, image: Path) -> Box:
    """VOC's 1-based inclusive ``xmin ymin xmax ymax`` as continuous pixels ``[xmin - 1, xmax)`` of the image
    of ``size`` (w, h), in whole pixels (rounded outwards): finite numbers with 0 <= min <= max, inside the
    image (a box up to one pixel over its border is clipped to it); else a one-line error naming the
    annotation and the image."""
    if values is None:
        raise UserError(f"{where}: no complete <bndbox> (xmin, ymin, xmax, ymax)")
    box = pixel_box("person", values, where)  # finite, 0 <= min <= max; x1 = xmax + 1
    xmin, ymin, xmax, ymax = box.x0, box.y0, box.x1 - 1, box.y1 - 1
    w, h = size
    if xmax < 1 or ymax < 1 or xmin > w or ymin > h or xmax > w + 1 or ymax > h + 1:
        raise UserError(f"{where}: box {xmin:g} {ymin:g} {xmax:g} {ymax:g} is not inside the {w}x{h} image {image} "
                        "(VOC's pixels run from 1 to the width and height)")
    return box._replace(x0=float(max(math.floor(xmin - 1), 0)), y0=float(max(math.floor(ymin - 1), 0)),
                        x1=float(min(math.ceil(xmax), w)), y1=float(min(math.ceil(ymax), h)))


# ---- the data -------------------------------------------------------------------------------


def find_actions(folder: Path) -> list[str]:
    """The actions with an ``<action>_<part>.txt`` list for every part, sorted; one listed for some parts
    only is an error naming the missing list."""
    found = {part: {p.name[: -len(f"_{part}.txt")] for p in folder.glob(f"*_{part}.txt")} for part in PARTS}
    every = set.union(*found.values())
    for part in PARTS:
        missing = sorted(every - found[part])
        if missing:
            raise MissingFileError(f"{folder / f'{missing[0]}_{part}.txt'}: no such VOC action list (the action has "
                                   "lists for other parts)")
    if not every:
        raise UserError(f"{folder}: no <action>_{PARTS[0]}.txt lists")
    return sorted(every)


def part_labels(folder: Path, part: str, actions: list[str]) -> dict[tuple[str, int], list[tuple[int, str]]]:
    """``(image id, person) -> [(label, "file:line") per action]`` of one part; every list must name the
    persons of ``<part>.txt`` (when there is one, else the first action's), no more, no fewer."""
    lists = {a: read_action_list(folder / f"{a}_{part}.txt", labelled=True) for a in actions}
    given = folder / f"{part}.txt"
    persons = read_action_list(given, labelled=False) if given.is_file() else lists[actions[0]]
    source = given if given.is_file() else folder / f"{actions[0]}_{part}.txt"
    for action, pairs in lists.items():
        extra = next((where for pair, (_, where) in pairs.items() if pair not in persons), None)
        if extra is not None:
            raise UserError(f"{extra}: a person that {source} does not list")
        absent = next((pair for pair in persons if pair not in pairs), None)
        if absent is not None:
            raise UserError(f"{folder / f'{action}_{part}.txt'}: no label for person {absent[1]} of {absent[0]} "
                            f"(listed in {source})")
    return {pair: [lists[a][pair] for a in actions] for pair in persons}


def checked_person(person: Person, where: str, index: int, xml: Path) -> Person:
    """The object a list line (``where``) names: a person with action flags, else a :class:`UserError`."""
    if person.name not in (None, "person"):
        raise UserError(f"{where}: object {index} of {xml} is a {person.name!r}, not a person")
    if person.actions is None:
        raise UserError(f"{where}: person {index} of {xml} has no <actions> to check the lists' labels against")
    return person


def person_labels(person: Person, labels: list[tuple[int, str]], actions: list[str], xml: Path) -> np.ndarray:
    """A person's label per action: the lists', checked against the annotation's action flags where both
    say yes or no; 0 throughout for a difficult person."""
    for action, (label, where) in zip(actions, labels, strict=True):
        flag = person.actions.get(action)
        if flag is not None and label != IGNORED and (label == POSITIVE) != (flag == 1):
            raise UserError(f"{where}: label {label} disagrees with <{action}>{flag}</{action}> in {xml}")
    values = [IGNORED if person.difficult else label for label, _ in labels]
    return np.array(values, dtype=np.int8)


def refuse_shared_images(folder: Path, parts: dict[str, dict[tuple[str, int], list[tuple[int, str]]]]) -> None:
    """An image with persons in both parts is a :class:`UserError` naming it and the lists: its persons would be
    trained on and scored, and an image region is the same descriptor for every person of the image."""
    first, second = (parts[part] for part in PARTS)
    trained: dict[str, str] = {}
    for (image_id, _), listed in first.items():
        trained.setdefault(image_id, listed[0][1])
    shared = next(((image_id, listed[0][1]) for (image_id, _), listed in second.items() if image_id in trained), None)
    if shared is not None:
        image_id, where = shared
        raise UserError(f"{folder}: image {image_id} has persons in both {PARTS[0]} ({trained[image_id]}) and "
                        f"{PARTS[1]} ({where}): a test person must not train")


def open_voc_action(root: str | Path) -> VOCActionData:
    """The persons of a VOC action root's ``train`` and ``val`` parts (see the module's description)."""
    root = Path(root)
    if not is_voc_action(root):
        raise MissingFileError(f"{root}: not a VOC action root (no Annotations/, JPEGImages/ and ImageSets/Action/)")
    folder = root / "ImageSets" / "Action"
    actions = find_actions(folder)
    samples, labels, splits = [], [], []
    images = AnnotatedImages(root)
    parts = {part: part_labels(folder, part, actions) for part in PARTS}
    refuse_shared_images(folder, parts)
    for split, part in zip(("train", "test"), PARTS, strict=True):
        for (image_id, index), listed in parts[part].items():
            persons, size = images.read(image_id)
            xml, path = images.files(image_id)
            if index > len(persons):
                raise UserError(f"{listed[0][1]}: person {index} of {image_id}, whose annotation {xml} has "
                                f"{len(persons)} objects")
            if size is None:
                continue
            person = checked_person(persons[index - 1], listed[0][1], index, xml)
            box = person_box(person.box, size, f"{xml} (person {index})", path)
            samples.append(ActionSample(image_id, index, path, box, size, person.actions.get(OTHER) == 1))
            labels.append(person_labels(person, listed, actions, xml))
            splits.append(split)
    if not samples:
        raise UserError(f"{root}: its action lists name no person whose image can be read")
    if images.skipped and Processes.from_env().main:  # every process reads the whole list: one says it
        log.warning("skipped %d unreadable images of %s, e.g. %s", len(images.skipped), root, images.skipped[0])
    return VOCActionData(samples, np.stack(labels), splits, actions, images.skipped)


class AnnotatedImages:
    """The annotation and image size of each image id of a VOC root, each read once; an image whose header
    cannot be read is skipped and named (size None), one that is missing or disagrees with its annotation's
    stated size is an error."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.skipped: list[str] = []
        self._read: dict[str, tuple[list[Person], tuple[int, int] | None]] = {}

    def files(self, image_id: str) -> tuple[Path, Path]:
        """The annotation and the image of ``image_id``, by their paths."""
        return self.root / "Annotations" / f"{image_id}.xml", self.root / "JPEGImages" / f"{image_id}.jpg"

    def read(self, image_id: str) -> tuple[list[Person], tuple[int, int] | None]:
        if image_id not in self._read:
            xml, path = self.files(image_id)
            persons, stated = read_persons(xml)
            if not path.is_file():
                raise MissingFileError(f"{path}: no such image (annotated in {xml})")
            try:
                size = image_size(path)
            except DECODE_ERRORS as error:
                report_skip(path, error)
                self.skipped.append(str(path))
                size = None
            if size is not None and stated is not None and stated != size:
                raise UserError(f"{xml}: states a {stated[0]}x{stated[1]} image, but {path} is {size[0]}x{size[1]}")
            self._read[image_id] = persons, size
        return self._read[image_id]
