"""Very deep features of persons for action classification (Appendix B, Table 12).

Each (image, person) of a VOC action root (:mod:`verydeep.data.voc_action`) is one row. Two
settings, ``--regions``: ``image``, the descriptor of the whole image (the same for every person
in it), and ``image+box``, that descriptor stacked with the descriptor of the person's box. The box
region is described as a whole image is (:mod:`verydeep.eval.descriptors`): rescaled isotropically so its
smallest side is Q, the dense net's FC7 map global-average pooled and averaged with the mirrored
region's, stacked or averaged over Q, L2-normalised; the image's and the box's descriptors (of each
net) are stacked and normalised again, so that each weighs the same.

Whole images and boxes are described in the same passes, batched by their size after the rescale,
saved to ``OUT.partial`` and continued as :func:`verydeep.eval.features.extract_features` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from verydeep.data.datasets import DECODE_ERRORS, IndexedImages, report_skip
from verydeep.data.jpeg import Size, decoded_size
from verydeep.data.transforms import CropPlan, PlannedTransform, reduction, resized_size
from verydeep.data.voc_action import VOCActionData, open_voc_action
from verydeep.errors import UserError
from verydeep.eval.descriptors import TAP, aggregate, check_scales_cover_crops, combine, load_feature_nets
from verydeep.eval.feature_passes import Settings, run_passes
from verydeep.eval.feature_store import Features, Partial, extraction_key
from verydeep.eval.image_sets import ImageSet
from verydeep.io.atomic import remove_written
from verydeep.runtime.limits import MAX_TEST_PIXELS
from verydeep.runtime.processes import Processes

#: Table 12's settings: the whole image alone, or stacked with the person's box.
REGIONS = ("image", "image+box")

#: A box in whole pixels of the full image: left, top, right, bottom (right and bottom excluded).
PixelBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class RegionTransform(PlannedTransform):
    """Sec. 3.2's test rescale applied to a box: the region ``box`` of the image, rescaled isotropically
    so its smallest side is ``q`` (a JPEG decoded reduced where that still gives the resolution)."""

    q: int
    box: PixelBox
    fast: bool = True

    def plan(self, size: Size, reducible: bool, generator: torch.Generator | None = None) -> CropPlan:
        left, top, right, bottom = self.box
        region = (right - left, bottom - top)
        out = resized_size(region, self.q)
        k = reduction(region, out, reducible)
        w, h = decoded_size(size, k)
        return CropPlan(k, (left // k, top // k, min(-(-right // k), w), min(-(-bottom // k), h)), out, False)


class RegionImages(IndexedImages):
    """Whole images followed by box regions of them, as one dataset for the passes of
    :func:`verydeep.eval.feature_passes.run_passes`: item ``i`` is image ``paths[i]`` rescaled by the pass's
    transform (a :class:`~verydeep.data.transforms.RescaleTransform` to Q), or, past the images, a box
    region rescaled to the same Q. ``sizes`` are the images' and the regions' (w, h), which group batches."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[Size], boxes: Sequence[tuple[Path, PixelBox]]) -> None:
        super().__init__([*paths, *(path for path, _ in boxes)])
        self.images = len(paths)
        self.boxes = [box for _, box in boxes]
        self._sizes = [*sizes, *((r - x, b - y) for x, y, r, b in self.boxes)]

    def load(self, index: int, generator: torch.Generator | None = None) -> tuple[Tensor | None, int, str]:
        """Item ``index`` at the Q of the pass's transform: a whole image, or past the images a box region."""
        if index < self.images:
            return super().load(index, generator)
        path, label = self.samples[index]
        try:
            image = RegionTransform(self.transform.q, self.boxes[index - self.images])(path)
        except DECODE_ERRORS as error:
            report_skip(path, error)
            return None, label, str(path)
        return image, label, str(path)


def whole_pixels(sample_box: tuple[float, float, float, float]) -> PixelBox:
    """A continuous box as whole pixels, rounded outwards."""
    x0, y0, x1, y1 = sample_box
    return int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))


def check_box_sizes(data: VOCActionData, scales: Sequence[int]) -> None:
    """Refuse a box so thin that its rescale to the largest Q exceeds the test-size bound."""
    q = max(scales)
    for sample in data.samples:
        x0, y0, x1, y1 = whole_pixels(sample.box.corners)
        w, h = resized_size((x1 - x0, y1 - y0), q)
        if w * h > MAX_TEST_PIXELS:
            raise UserError(f"{sample.box.where}: the {x1 - x0}x{y1 - y0} box rescaled to Q={q} is {w}x{h}, over "
                            f"the {MAX_TEST_PIXELS / 1e6:.1f} M pixels a test image may have; give smaller --scales")


def action_units(data: VOCActionData, regions: str) -> tuple[list[Path], list[int], RegionImages, ImageSet]:
    """What the passes describe: the distinct images (each person's index into them) and, for ``image+box``,
    every person's box; the dataset of them, and an :class:`ImageSet` naming each (for the partial key)."""
    if regions not in REGIONS:
        raise UserError(f"--regions must be one of {', '.join(REGIONS)}; got {regions!r}")
    first: dict[Path, int] = {}
    for sample in data.samples:
        first.setdefault(sample.path, len(first))
    images = list(first)
    sizes = {s.path: s.size for s in data.samples}
    boxes = [(s.path, whole_pixels(s.box.corners)) for s in data.samples] if regions == "image+box" else []
    dataset = RegionImages(images, [sizes[p] for p in images], boxes)
    names = [str(p) for p in images] + [f"{p} box {' '.join(map(str, b))}" for p, b in boxes]
    units = ImageSet(names, np.zeros(len(names), dtype=np.int64), [""] * len(names), [], [])
    return images, [first[s.path] for s in data.samples], dataset, units


def extract_action_features(sources: Sequence[str | Path], data: str | Path, regions: str,
                            out: str | Path | None = None, settings: Settings | None = None,
                            weights_dir: str | Path | None = None) -> Features:
    """Table 12's descriptors of every person of the VOC action root ``data``: the image's alone
    (``regions="image"``) or stacked with the box's (``"image+box"``), by the nets of ``sources``
    (several stack theirs). ``out``: written there, the work saved to ``OUT.partial`` on the way."""
    settings = settings or Settings.create()
    action = open_voc_action(data)
    check_box_sizes(action, settings.scales)
    images, image_of, dataset, units = action_units(action, regions)
    nets = load_feature_nets(sources, data, settings.device, weights_dir, settings.dtype)
    check_scales_cover_crops(nets, settings.scales)
    key = extraction_key(nets, units, settings.scales, settings.dtype)
    partial_path = Path(f"{out}.partial") if out is not None else None
    state = Partial.start(key, nets, settings.scales, len(units.paths))
    if partial_path is not None:
        state = Partial.resume(partial_path, state)
    run_passes(nets, units, state, settings, partial_path, dataset)
    keep = np.array([str(s.path) not in state.skipped for s in action.samples])
    if not keep.any():
        raise UserError(f"{data}: no image of a listed person could be read")
    rows = np.flatnonzero(keep)
    unit_rows = [np.array(image_of)[rows]] + ([len(images) + rows] if regions == "image+box" else [])
    parts = []
    for i, net in enumerate(nets):
        per_q = [state.arrays[f"net{i}_Q{q}"] for q in settings.scales]
        for chosen in unit_rows:
            parts.append(aggregate([a[chosen] for a in per_q], settings.aggregate))
            if not np.isfinite(parts[-1]).all():
                raise UserError(f"{net.source}: the net's features are not finite (NaN or inf)")
    description = {"kind": "vgg", "tap": TAP, "flip": True, "nets": [net.describe() for net in nets],
                   "scales": list(settings.scales), "aggregate": settings.aggregate, "data": str(data),
                   "regions": regions, "persons": [action.samples[r].person for r in rows]}
    result = Features(combine(parts), action.labels[keep], [str(action.samples[r].path) for r in rows],
                      [action.splits[r] for r in rows], action.actions, action.actions, description,
                      sorted(set(action.skipped) | state.skipped))
    if out is not None and Processes.from_env().main:
        result.save(out)
        remove_written(partial_path)  # its saves' leftovers too
    return result

