"""Object boxes for localisation (Appendix A): readers, and boxes that follow the image's crop.

Boxes are read from a text file of ``relpath xmin ymin xmax ymax`` lines (paths relative to the
dataset root, 0-based inclusive pixels, one file for all splits: ``boxes.txt``), Tiny ImageNet's own
files (``train/<wnid>/<wnid>_boxes.txt``, ``val/val_annotations.txt``), PASCAL VOC / ILSVRC XML
annotations (``Annotations/**/<image>.xml``, any number of boxes per image, each with its class) or
Kaggle's ``LOC_*_solution.csv``. In memory a box is four floats
of continuous coordinates ``(x0, y0, x1, y1)``: the inclusive pixel box ``xmin..xmax`` covers
``[xmin, xmax + 1)``. A coordinate is a plain decimal number (no ``1_0``, no hexadecimal), finite.
Each box remembers where it was read (file and line, the ``<bndbox>``'s line in XML), so that a box
that does not fit its image is refused naming both.

Annotations reach images by path (:func:`match_boxes`): an annotation's path (relative to the boxes
file's root or the XML folder, without its suffix) is the image's path relative to the data root
(without its suffix), or an id: the image's file name alone (Kaggle's CSV, VOC's flat
``Annotations/``) or under its leading folders only (ILSVRC's flat ``val/`` annotations for images
sorted into class folders). An annotation that names an image suffix (``boxes.txt``'s ``a.jpg``) reaches
only an image of that suffix; an id, or a path without a suffix, that more than one image could carry is
an error naming two; an image reached both by its path and by an id takes its path's boxes.

A box follows its image through the crop plan of :mod:`verydeep.data.transforms` (the same draws:
rescale, crop, flip) with :func:`to_crop`, and back with :func:`from_crop`; the net regresses
:func:`encode`'s (centre x, centre y, width, height) in units of the crop side.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from verydeep.data.batches import Boxed
from verydeep.data.datasets import IMAGE_EXTENSIONS, LabelledImages
from verydeep.data.decode import ImageFile
from verydeep.data.jpeg import Size, decoded_size
from verydeep.data.transforms import CropPlan, PlannedTransform, render
from verydeep.data.voc import parse_with_lines
from verydeep.errors import MissingFileError, UserError
from verydeep.runtime.processes import Processes

log = logging.getLogger("verydeep.data")


class Box(NamedTuple):
    """One object box: its class (a synset id, or None when the file names none) and continuous
    corners ``(x0, y0, x1, y1)`` in pixels of the full image."""

    label: str | None
    x0: float
    y0: float
    x1: float
    y1: float
    where: str = ""  # the file (and line) it was read from

    @property
    def corners(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.x1, self.y1


#: Boxes per annotated image, keyed by the annotation's path (POSIX, relative to the dataset root for a
#: text file, to the folder for XML annotations) or the image id the format carries (Kaggle's CSV).
BoxTable = dict[str, list[Box]]


#: A plain decimal number as a box file writes one (``nan`` and ``inf`` pass, to be refused as not finite);
#: not Python's wider syntax (``1_0``, non-ASCII digits).
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE | re.ASCII)


def pixel_box(label: str | None, values: Iterable[str], where: str) -> Box:
    """The continuous box of an inclusive 0-based pixel box ``xmin ymin xmax ymax``: four finite plain
    decimal numbers."""
    texts = [value.strip() for value in values]
    if len(texts) != 4 or not all(_NUMBER.fullmatch(text) for text in texts):
        shown = " ".join(map(repr, texts)) if len(texts) == 4 else repr(" ".join(texts))  # an empty one shows as ''
        raise UserError(f"{where}: a box is four numbers xmin ymin xmax ymax (plain decimals), got {shown}")
    xmin, ymin, xmax, ymax = (float(text) for text in texts)
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        raise UserError(f"{where}: box {xmin:g} {ymin:g} {xmax:g} {ymax:g} has a coordinate that is not a finite "
                        "number")
    if xmin < 0 or ymin < 0 or xmax < xmin or ymax < ymin:
        raise UserError(f"{where}: bad box {xmin:g} {ymin:g} {xmax:g} {ymax:g} (needs 0 <= min <= max)")
    return Box(label, xmin, ymin, xmax + 1, ymax + 1, where)


def _text(path: Path) -> str:
    """The text of a boxes file, without the byte-order mark some editors write first (else it would join the
    first line's path); a file that is not UTF-8 text is a :class:`UserError` naming it."""
    data = path.read_bytes()
    text = data.removeprefix(codecs.BOM_UTF8)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as error:
        at = error.start + len(data) - len(text)  # counted in the file, mark included
        raise UserError(f"{path}: not a text file of boxes (byte {at} is not UTF-8)") from None


#: A line of a boxes file: the image's path (spaces and ``#`` allowed: the box is the line's last four fields),
#: the box, and an optional ``# comment`` after it.
_BOX_LINE = re.compile(r"\s*(?P<path>\S.*?)\s+(?P<box>\S+\s+\S+\s+\S+\s+\S+)\s*(?:#.*)?")


def read_box_text(path: Path) -> BoxTable:
    """``relpath xmin ymin xmax ymax`` lines; an image may have several lines. A line that starts with ``#`` is a
    comment, as is ``# ...`` after a box; the path is all before the box's four numbers, so it may hold spaces
    (a class folder ``red car/``) and ``#``."""
    table: BoxTable = {}
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _BOX_LINE.fullmatch(line)
        if match is None or _NUMBER.fullmatch(match["path"].split()[-1]):  # a number before the box: a fifth one
            raise UserError(f"{path}:{number}: expected 'relpath xmin ymin xmax ymax', got {line.strip()!r}")
        table.setdefault(_image_key(match["path"], f"{path}:{number}"), []).append(
            pixel_box(None, match["box"].split(), f"{path}:{number}"))
    return table


def _image_key(name: str, where: str) -> str:
    """An annotation's image path as the tables key it; one that names no file (``.``, ``./``, empty) is a
    :class:`UserError` naming ``where``."""
    if not _parts(name):
        raise UserError(f"{where}: {name!r} names no image")
    return Path(name).as_posix()


def bndbox_values(obj: ET.Element) -> tuple[str, str, str, str] | None:
    """The texts of an annotation ``<object>``'s ``bndbox`` (xmin, ymin, xmax, ymax); None when it has none,
    or one without all four."""
    box = obj.find("bndbox")
    if box is None:
        return None
    xmin, ymin, xmax, ymax = (box.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax"))
    if xmin is None or ymin is None or xmax is None or ymax is None:
        return None
    return xmin, ymin, xmax, ymax


def read_voc_xml(path: Path) -> list[Box]:
    """The boxes of one PASCAL VOC / ILSVRC annotation file (``object/name``, ``object/bndbox``).

    VOC's pixels are 1-based, ILSVRC's 0-based; both are read as given, inclusive. A box's ``where`` is
    the file and the line of its ``<bndbox>``."""
    try:
        root, lines = parse_with_lines(path)
    except ET.ParseError as error:
        raise UserError(f"{path}: not a valid annotation file ({error})") from None
    boxes = []
    for obj in root.iter("object"):
        values = bndbox_values(obj)
        if values is None:
            raise UserError(f"{path}:{lines[obj]}: an object without a complete bndbox")
        name = obj.findtext("name")  # a pretty-printer puts it on its own line: spaces around it are not its
        boxes.append(pixel_box(name and name.strip(), list(values), f"{path}:{lines[obj.find('bndbox')]}"))
    return boxes


def read_voc_folder(folder: Path) -> BoxTable:
    """Every ``*.xml`` under ``folder``, keyed by its path relative to ``folder`` without the suffix."""
    return {xml.relative_to(folder).with_suffix("").as_posix(): read_voc_xml(xml)
            for xml in sorted(folder.rglob("*.xml"))}


def read_loc_csv(path: Path) -> BoxTable:
    """Kaggle's ``LOC_*_solution.csv``: ``ImageId,PredictionString`` of ``synset xmin ymin xmax ymax``
    groups, keyed by the image's stem."""
    table: BoxTable = {}
    with io.StringIO(_text(path), newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise UserError(f"{path}: not a LOC solution file (columns ImageId,PredictionString)")
        for number, row in enumerate(reader, start=2):
            parts = (row["PredictionString"] or "").split()  # None: a row cut off after its id
            if not parts or len(parts) % 5:
                raise UserError(f"{path}:{number}: expected groups of 'synset xmin ymin xmax ymax'")
            key = _image_key(row["ImageId"], f"{path}:{number}")
            if key in table:
                raise UserError(f"{path}:{number}: image {row['ImageId']} is listed twice")
            table[key] = [pixel_box(parts[i], parts[i + 1:i + 5], f"{path}:{number}") for i in range(0, len(parts), 5)]
    return table


def tiny_imagenet_box_files(root: Path) -> list[Path]:
    """Tiny ImageNet's own box files under its root as downloaded: ``train/<wnid>/<wnid>_boxes.txt`` and
    ``val/val_annotations.txt``."""
    val = root / "val" / "val_annotations.txt"
    return sorted(root.glob("train/*/*_boxes.txt")) + ([val] if val.is_file() else [])


def read_tiny_imagenet(root: Path) -> BoxTable:
    """The boxes of Tiny ImageNet's own files (:func:`tiny_imagenet_box_files`), keyed by the image's path
    relative to ``root``: ``<file> xmin ymin xmax ymax`` lines of ``train/<wnid>/images/<file>``, and
    ``<file> <wnid> xmin ymin xmax ymax`` lines of ``val/images/<file>`` (0-based inclusive pixels)."""
    table: BoxTable = {}
    for path in tiny_imagenet_box_files(root):
        validation = path.name == "val_annotations.txt"
        folder = "val/images" if validation else f"train/{path.parent.name}/images"
        for number, line in enumerate(_text(path).splitlines(), start=1):
            where = f"{path}:{number}"  # tab-separated, as downloaded: a file name may then hold spaces
            fields = [field.strip() for field in line.split("\t") if field.strip()] if "\t" in line else line.split()
            if not fields:
                continue
            if len(fields) != 4 + (1 if validation else 0) + 1:
                shape = "file wnid xmin ymin xmax ymax" if validation else "file xmin ymin xmax ymax"
                raise UserError(f"{where}: expected '{shape}', got {line.strip()!r}")
            key = _image_key(f"{folder}/{fields[0]}", where)
            table.setdefault(key, []).append(pixel_box(fields[1] if validation else None, fields[-4:], where))
    return table


def default_boxes(data: str | Path) -> Path:
    """The boxes of a dataset when ``--boxes`` is not given: ``DATA/boxes.txt``, else Tiny ImageNet's own files
    when ``DATA`` is its root as downloaded (the folder ``DATA`` itself, which :func:`read_boxes` reads so)."""
    own = Path(data) / "boxes.txt"
    return Path(data) if not own.exists() and tiny_imagenet_box_files(Path(data)) else own


def read_boxes(source: str | Path) -> BoxTable:
    """The boxes of a text file, a ``.csv`` solution file, a folder of XML annotations or Tiny ImageNet's root;
    an empty source is a :class:`UserError` naming it."""
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"--boxes {path} does not exist")
    if path.is_dir() and tiny_imagenet_box_files(path):
        table = read_tiny_imagenet(path)
    elif path.is_dir():
        table = read_voc_folder(path)
    elif path.suffix.lower() == ".csv":
        table = read_loc_csv(path)
    elif path.suffix.lower() == ".xml":
        table = {path.stem: read_voc_xml(path)}
    else:
        table = read_box_text(path)
    if not any(table.values()):
        raise UserError(f"--boxes {path}: holds no boxes")
    return table


def _parts(key: str | Path) -> tuple[str, ...]:
    """A path's components with an image suffix dropped from the last: what annotation and image share."""
    path = Path(key)
    return (path.with_suffix("") if path.suffix.lower() in IMAGE_EXTENSIONS else path).parts


def _image_suffix(key: str | Path) -> str | None:
    """The image suffix an annotation's path names (lower case), None where it names none (an XML's, an id)."""
    suffix = Path(key).suffix.lower()
    return suffix if suffix in IMAGE_EXTENSIONS else None


def _reaches(key: tuple[str, ...], image: tuple[str, ...]) -> bool:
    """Whether an annotation's path names an image's: the same file name, and the annotation's folders
    the image's leading folders (all of them: the same path; some or none: an id)."""
    *folders, name = key
    return name == image[-1] and image[:-1][:len(folders)] == tuple(folders)


def match_boxes(table: BoxTable, paths: Iterable[Path], root: Path) -> dict[str, list[Box]]:
    """The boxes of each image of ``paths`` (keyed ``str(path)``; empty when none is annotated), matched
    by path as the module says. An id that more than one image could carry, or two annotations of one
    path (suffix aside), are a :class:`UserError` naming both."""
    images: dict[str, list[tuple[Path, tuple[str, ...]]]] = {}
    for path in paths:
        parts = _parts(path.relative_to(root) if path.is_relative_to(root) else path.name)
        images.setdefault(parts[-1], []).append((path, parts))
    chosen: dict[Path, str] = {}  # each image's annotation: its path, else its longest id
    for key in table:
        key_parts, suffix = _parts(key), _image_suffix(key)
        reached = [(path, parts) for path, parts in images.get(key_parts[-1], [])
                   if _reaches(key_parts, parts) and suffix in (None, path.suffix.lower())]
        exact = [path for path, parts in reached if parts == key_parts]
        if len(exact) > 1:  # a path without its suffix: a.jpg and a.png alike
            raise UserError(f"{key}: matches {exact[0]} and {exact[1]}, which differ only by their suffix; name the "
                            "annotation's image with its suffix, or keep one image of each name")
        if not exact and len(reached) > 1:
            under = f"under {'/'.join(key_parts[:-1])}/" if len(key_parts) > 1 else "alone"
            raise UserError(f"{key}: matches {reached[0][0]} and {reached[1][0]} by file name {under}; name the "
                            "annotation by its path relative to the data root")
        for path in exact or [path for path, _ in reached]:
            held = _parts(chosen[path]) if path in chosen else ()
            if len(held) == len(key_parts):
                raise UserError(f"{path}: annotated twice, by {chosen[path]} and {key}")
            if len(key_parts) > len(held):
                chosen[path] = key
    return {str(path): table[chosen[path]] if path in chosen else [] for named in images.values() for path, _ in named}


def fitted(box: Box, size: Size, image: str | Path) -> Box:
    """``box`` clipped to its image of ``size`` (w, h); a box that is not inside or on the image's border
    (inclusive pixels up to ``w``, as 1-based VOC boxes reach) is a :class:`UserError` naming both files."""
    w, h = size
    if box.x0 >= w or box.y0 >= h or box.x1 > w + 1 or box.y1 > h + 1:
        raise UserError(f"{box.where}: box {box.x0:g} {box.y0:g} {box.x1 - 1:g} {box.y1 - 1:g} is outside the "
                        f"{w}x{h} image {image}")
    return box._replace(x1=min(box.x1, w), y1=min(box.y1, h))


# ---- boxes through the crop plan -------------------------------------------------------------


def _plan_affine(size: Size, plan: CropPlan) -> tuple[float, float, float, float]:
    """``(sx, sy, ox, oy)``: a full-image point ``p`` lands at ``(p - o) * s`` in the (unflipped) crop."""
    w, h = size
    dw, dh = decoded_size(size, plan.k)
    left, top, right, bottom = plan.box
    sx, sy = plan.out[0] / (right - left), plan.out[1] / (bottom - top)
    return sx * dw / w, sy * dh / h, left * w / dw, top * h / dh


def _cut_origin(plan: CropPlan) -> Tensor:
    """The corner offset of the plan's cut of its resampled image (zero without a cut)."""
    left, top = plan.cut[:2] if plan.cut is not None else (0, 0)
    return torch.tensor([left, top, left, top], dtype=torch.float64)


def _pair(x: float, y: float) -> Tensor:
    """``[x, y, x, y]``, the factors of a box's corners, in float64: a crop's geometry rounded to float32 would move
    an IoU of exactly 0.5 (the whole image against a box of half its width) by some 1e-7, to either side."""
    return torch.tensor([x, y, x, y], dtype=torch.float64)


def to_crop(boxes: Tensor, size: Size, plan: CropPlan) -> Tensor:
    """Boxes ``(n, 4)`` in full-image pixels -> pixels of the crop ``plan`` makes of an image of ``size``, in
    ``boxes``' dtype (computed in float64)."""
    sx, sy, ox, oy = _plan_affine(size, plan)
    out = (boxes.double() - _pair(ox, oy)) * _pair(sx, sy) - _cut_origin(plan)
    if plan.flip:
        width = plan.size[0]
        out = torch.stack([width - out[:, 2], out[:, 1], width - out[:, 0], out[:, 3]], dim=1)
    return out.to(boxes.dtype)


def from_crop(boxes: Tensor, size: Size, plan: CropPlan) -> Tensor:
    """The inverse of :func:`to_crop`: crop pixels -> full-image pixels, in ``boxes``' dtype."""
    sx, sy, ox, oy = _plan_affine(size, plan)
    out = boxes.double()
    if plan.flip:
        width = plan.size[0]
        out = torch.stack([width - out[:, 2], out[:, 1], width - out[:, 0], out[:, 3]], dim=1)
    return ((out + _cut_origin(plan)) / _pair(sx, sy) + _pair(ox, oy)).to(boxes.dtype)


def encode(boxes: Tensor, side: float) -> Tensor:
    """Corners ``(..., 4)`` in crop pixels -> (centre x, centre y, width, height) in crop sides (Appendix A)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1) / side


def decode(codes: Tensor, side: float) -> Tensor:
    """The inverse of :func:`encode`; negative widths and heights are taken as zero."""
    cx, cy, w, h = (codes * side).unbind(-1)
    w, h = w.clamp(min=0), h.clamp(min=0)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def clipped(boxes: Tensor, frames: Tensor) -> Tensor:
    """Boxes ``(N, 4)`` clipped to their images, whose frames ``(N, 4)`` are in the same units."""
    low, high = frames[:, :2].repeat(1, 2), frames[:, 2:].repeat(1, 2)
    return torch.maximum(torch.minimum(boxes, high), low)


def iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of every box of ``a`` (n, 4) with every box of ``b`` (m, 4): (n, m)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


# ---- images with their boxes -----------------------------------------------------------------


@dataclass(frozen=True)
class BoxedTransform:
    """``transform``'s crop of an image, with the image's boxes (looked up by path) carried through
    the same plan: a :class:`~verydeep.data.batches.Boxed` item."""

    transform: PlannedTransform
    boxes: dict[str, list[Box]]

    def __call__(self, path: str | Path, generator: torch.Generator | None = None) -> Boxed:
        file = ImageFile(path)
        plan = self.transform.plan(file.size, self.transform.fast and file.reducible, generator)
        image = render(file, plan, self.transform.fast)
        boxes = self.boxes[str(path)]
        # in float64, as protocol 1 scores them: an IoU of exactly 0.5 stays 0.5 in the crop's pixels
        corners = torch.tensor([box.corners for box in boxes], dtype=torch.float64)
        frame = torch.tensor([[0.0, 0.0, *file.size]], dtype=torch.float64)
        return Boxed(image, to_crop(corners, file.size, plan), to_crop(frame, file.size, plan)[0])


def with_boxes(images: LabelledImages, matched: dict[str, list[Box]], transform: PlannedTransform,
               unreadable: Callable[[Path], Exception] | None = None) -> LabelledImages:
    """``images`` keeping the readable ones with a box of their class (or of no named class) among
    ``matched`` (:func:`match_boxes`), their items :class:`~verydeep.data.batches.Boxed`, each box
    clipped to its image (:func:`fitted`); the others are skipped with one warning naming one, but for an
    unreadable image with a box where ``unreadable`` gives the error to raise (an evaluation leaving none out)."""
    if not isinstance(transform, PlannedTransform):
        raise UserError("localisation reads images on the CPU: use --decode cpu")
    kept, boxes, missing = [], {}, []
    for index, ((path, label), size) in enumerate(zip(images.samples, images.image_sizes(), strict=True)):
        found = [box for box in matched.get(str(path), []) if box.label in (None, images.classes[label])]
        if found and size is None and unreadable is not None:
            raise unreadable(path)
        if found and size is not None:
            kept.append(index)
            boxes[str(path)] = [fitted(box, size, path) for box in found]
        else:
            missing.append(path)
    folder = getattr(images, "root", "the data")
    if not kept:
        raise UserError(f"{folder}: no readable image has a box of its class")
    if missing and Processes.from_env().main:  # every process reads the whole list: one says it
        log.warning("skipped %d images of %s without a box of their class (or unreadable), e.g. %s", len(missing),
                    folder, missing[0])
    images.keep(kept)
    images.transform = BoxedTransform(transform, boxes)
    return images
