"""An evaluation's rows and its result (Sec. 4.1-4.3, Tables 3 to 6): every reported row (single
scale, multi-scale, dense + multi-crop, fusion of several nets) is an average of the computed
posteriors, scored by its top-1 and top-5 errors beside the paper's figures for the same row where
the paper has them; :class:`EvalResult` holds the rows, the nets, the settings and the timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import Tensor

from verydeep.eval.metrics import topk_error
from verydeep.eval.nets import Net, NetInfo, center_resize
from verydeep.eval.sweep import PassTiming, PosteriorArrays, average
from verydeep.io.jsonable import to_json_dict
from verydeep.paper import figures
from verydeep.paper.figures import PaperNet

# ---- rows ---------------------------------------------------------------------------------

#: How tables and row names print each evaluation protocol (Sec. 3.2).
PROTOCOL_LABELS = {
    "dense": "dense",
    "multicrop": "multi-crop",
    "dense+multicrop": "multi-crop & dense",
    "center": "centre crop",
}


def scales_label(scales: Sequence[int]) -> str:
    """Test scales Q as rows name them: ``256``, or ``{256,384,512}`` for several."""
    return str(scales[0]) if len(scales) == 1 else "{" + ",".join(map(str, scales)) + "}"


@dataclass(frozen=True)
class PaperFigures:
    """The paper's errors for a row (fractions, like ours) and the table that reports them."""

    table: str
    top1_error: float
    top5_error: float

    @classmethod
    def lookup(cls, table: int, nets: Sequence[PaperNet], protocol: str = "dense") -> PaperFigures | None:
        """Table 3, 4, 5 or 6's errors for these nets under ``protocol``; None where it has none."""
        errors = figures.classification_errors(table, nets, protocol)
        return None if errors is None else cls(f"Table {table}", errors.top1 / 100, errors.top5 / 100)


@dataclass(frozen=True)
class RowSpec:
    """What a row measures: its nets (fused when several), protocol and test scales Q."""

    name: str
    protocol: str
    scales: list[int]
    nets: list[str]
    multi_scale: bool
    fusion: bool


@dataclass(frozen=True)
class EvalRow(RowSpec):
    """A measured row: top-1 and top-5 error (fractions) on ``images`` images, and the paper's figures
    for it where the paper reports the same row (an ImageNet-sized run)."""

    top1_error: float
    top5_error: float
    images: int
    paper: PaperFigures | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRow:
        """A row from its JSON form (a result's ``rows``)."""
        figures = data.get("paper")
        return cls(**{**data, "paper": PaperFigures(**figures) if figures else None})


def score(spec: RowSpec, posteriors: Tensor, targets: Tensor) -> EvalRow:
    """The row ``spec`` scored: top-1 and top-5 errors of its posteriors (N, classes) against ``targets``."""
    return EvalRow(**vars(spec), **measured_figures(posteriors, targets))


def measured_figures(posteriors: Tensor, targets: Tensor) -> dict[str, Any]:
    """What a row measures of posteriors (N, classes) labelled ``targets``: its top-1 and top-5 errors and
    its images (:class:`EvalRow`'s fields)."""
    return {"top1_error": topk_error(posteriors, targets, 1), "top5_error": topk_error(posteriors, targets, 5),
            "images": len(targets)}


def fuse_rows(members: Sequence[tuple[RowSpec, Tensor]], targets: Tensor) -> tuple[EvalRow, Tensor]:
    """Sec. 4.4, Table 6: rows of several nets under one protocol fused by averaging their posteriors
    (N, classes each: the same images in the same order, labelled ``targets``), scored, with the fused
    posteriors; the row ``fusion of A + B: PROTOCOL`` over the members' nets and test scales."""
    specs = [spec for spec, _ in members]
    nets = [name for spec in specs for name in spec.nets]
    scales = sorted({q for spec in specs for q in spec.scales})
    protocol = specs[0].protocol
    if any(spec.protocol != protocol for spec in specs):
        raise ValueError(f"rows of one protocol are fused, not {sorted({spec.protocol for spec in specs})}")
    posteriors = average(post for _, post in members)
    spec = RowSpec(f"fusion of {' + '.join(nets)}: {PROTOCOL_LABELS[protocol]}", protocol, scales, nets,
                   multi_scale=len(scales) > 1, fusion=True)
    return score(spec, posteriors, targets), posteriors


def derive_rows(nets: Sequence[Net], posteriors: PosteriorArrays, protocols: Sequence[str],
                targets: Tensor) -> list[tuple[EvalRow, Tensor]]:
    """Every reported row, scored against ``targets`` (the images of ``posteriors``), with its
    posteriors, by averaging the computed posteriors.

    Per net: dense and multi-crop at each Q, their multi-scale averages, dense+multi-crop, centre
    crop; then, with several nets, the fusion of their full posteriors for each protocol
    (:func:`fuse_rows`).
    """
    rows: list[tuple[EvalRow, Tensor]] = []
    full: dict[tuple[int, str], Tensor] = {}
    whole: dict[tuple[int, str], tuple[EvalRow, Tensor]] = {}  # each net's row over all its scales, by protocol

    def add(i: int, name: str, protocol: str, scales: Sequence[int], post: Tensor) -> None:
        spec = RowSpec(name, protocol, sorted(scales), [nets[i].name], len(scales) > 1, False)
        rows.append((score(spec, post, targets), post))
        whole[i, protocol] = rows[-1]  # a net's rows of a protocol end with the one over all its scales

    for i, net in enumerate(nets):
        prefix = f"{net.name}: " if len(nets) > 1 else ""
        for kind in ("dense", "multicrop"):
            if kind not in protocols and "dense+multicrop" not in protocols:
                continue
            per_scale = [posteriors[i, kind, q] for q in net.scales]
            full[i, kind] = average(per_scale)
            if kind not in protocols:
                continue
            for q, post in zip(net.scales, per_scale, strict=True):
                add(i, f"{prefix}{PROTOCOL_LABELS[kind]} Q={q}", kind, [q], post)
            if len(net.scales) > 1:
                add(i, f"{prefix}{PROTOCOL_LABELS[kind]} Q={scales_label(net.scales)}", kind, net.scales,
                    full[i, kind])
        if "dense+multicrop" in protocols:
            add(i, f"{prefix}{PROTOCOL_LABELS['dense+multicrop']} Q={scales_label(net.scales)}", "dense+multicrop",
                net.scales, average([full[i, "dense"], full[i, "multicrop"]]))
        if "center" in protocols:
            resize = center_resize(net.crop)
            add(i, f"{prefix}{PROTOCOL_LABELS['center']} {resize}/{net.crop}", "center", [resize],
                posteriors[i, "center", resize])
    if len(nets) > 1:
        rows += [fuse_rows([whole[i, protocol] for i in range(len(nets))], targets) for protocol in protocols]
    return rows


def paper_figures(row: RowSpec, nets: Sequence[Net]) -> PaperFigures | None:
    """The paper's published errors for a row of nets of its kind (:attr:`Net.papers_kind`) at its test
    scales, if it reports one."""
    members = [n for n in nets if n.name in row.nets]
    trained = [n.scale for n in members if n.papers_kind and n.scale is not None]
    table = figures.classification_table(row.protocol, row.multi_scale, row.fusion)
    if table is None or len(trained) != len(members):
        return None

    def paper_scales(smin: int, smax: int) -> list[int]:
        if row.multi_scale or row.fusion:
            return figures.multi_test_scales(smin, smax)
        return [figures.single_test_scale(smin, smax)]

    if any(row.scales != paper_scales(*scale) for scale in trained):
        return None
    nets_of_paper = [PaperNet.trained_at(n.config, *scale) for n, scale in zip(members, trained, strict=True)]
    return PaperFigures.lookup(table, nets_of_paper, row.protocol)


def main_row(rows: Sequence[EvalRow], protocols: Sequence[str]) -> EvalRow:
    """The headline row: the fullest protocol asked for, fused over all nets when there are several."""
    best = next(p for p in ("dense+multicrop", "multicrop", "dense", "center") if p in protocols)
    candidates = [r for r in rows if r.protocol == best]
    return max(candidates, key=lambda r: (r.fusion, len(r.scales)))


def score_rows(nets: Sequence[Net], posteriors: PosteriorArrays, protocols: Sequence[str], targets: Tensor,
               valid: Tensor, as_paper: bool = True) -> tuple[list[EvalRow], dict[str, Tensor]]:
    """Every row's errors on the readable images (``valid``), with the paper's figures where it has the
    row and ``as_paper`` (the images flipped and the errors over the nets' 1000 classes, as the paper
    counts them), and each row's posteriors of those images by row name."""
    readable = {key: post[valid] for key, post in posteriors.items()}
    scored = derive_rows(nets, readable, protocols, targets[valid])
    rows = [replace(row, paper=paper_figures(row, nets) if as_paper else None) for row, _ in scored]
    return rows, {row.name: post for row, post in scored}


# ---- the result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall time of the whole evaluation, per image read, and of each pass."""

    seconds: float
    seconds_per_image: float
    passes: list[PassTiming]


@dataclass
class Posteriors:
    """Every posterior array computed (N, classes) by net, kind and Q (``net0_dense_Q256``), with the
    targets and image paths: every row can be recomputed from them. ``rows`` holds each row's own
    posteriors by row name, of the readable images only (``readable``, a mask over ``paths``): what
    fusing rows afterwards or a paired comparison of two rows needs. Not part of the JSON result; its file is
    :mod:`verydeep.eval.posteriors_file`'s."""

    arrays: dict[str, np.ndarray]
    targets: np.ndarray
    paths: list[str]
    readable: np.ndarray
    rows: dict[str, np.ndarray]


@dataclass
class EvalResult:
    """An evaluation: its rows (see :class:`EvalRow`), the ``main`` row's name and per-class accuracy,
    the classes, the nets, settings and timing; ``posteriors`` only when asked for."""

    data: str
    images: int
    skipped: list[str]
    classes: list[str]
    class_names: list[str]
    nets: list[NetInfo]
    protocols: list[str]
    flip: bool
    device: str
    precision: str
    imagenet_sized: bool
    scored: str  # over which classes the errors are counted (:meth:`verydeep.eval.classmap.ClassMap.describe`)
    rows: list[EvalRow]
    main: str
    per_class_accuracy: dict[str, float | None]
    timing: Timing
    posteriors: Posteriors | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able result: every field but ``posteriors``."""
        public = to_json_dict(replace(self, posteriors=None))
        del public["posteriors"]
        return public


