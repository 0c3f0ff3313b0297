"""Protocol 2 of Appendix A (Table 9): the dense nets' top-5 (class, box) guesses on the validation
images, the top-5 localisation error of their union and of each net alone, beside the whole image
and the centre prior."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verydeep.data import CenterCropTransform, balanced_subset
from verydeep.errors import UserError
from verydeep.eval.localize.center import net_name
from verydeep.eval.localize.dense_nets import DenseNets, DenseOutput, Guess, ranked, unreadable_image
from verydeep.eval.localize.prior import mean_relative_box
from verydeep.eval.localize.scoring import ilsvrc_wrong
from verydeep.eval.localize.task import boxes_source, classes_in_net, smallest_training_scale, task_of
from verydeep.eval.nets import train_scale
from verydeep.eval.rows import scales_label
from verydeep.nn import configs
from verydeep.paper.figures import TABLE_9, TABLE_9_FUSION, ValTest, table_9_row
from verydeep.paper.report import Column, Row, Table
from verydeep.runtime import sharding
from verydeep.runtime.processes import Processes
from verydeep.runtime.progress import progress_bar

#: Validation images read (and grouped by size into batches) at a time by :func:`evaluate_dense`.
WINDOW_BATCHES = 4


@dataclass
class DenseNetResult:
    """One localisation net of protocol 2 alone: its head, training scale S (Smin; ``scale_max`` Smax, the same
    for a fixed S) and crop, its error (%), and its configuration (Table 1's letter)."""

    checkpoint: str
    head: str
    scale: int
    crop: int
    localisation_error: float
    config: str
    scale_max: int | None = None  # None: a fixed S

    @property
    def fixed(self) -> bool:
        """Whether the net was trained at one scale S (Table 9's nets were)."""
        return self.scale_max in (None, self.scale)

    @property
    def papers_kind(self) -> bool:
        """Whether the net is of Table 9's rows: configuration D, a box per class (PCR), one scale S."""
        return self.config == "D" and self.head == "pcr" and self.fixed

    @property
    def scale_label(self) -> str:
        """S as the tables write it: ``256``, or ``256:512`` when jittered."""
        return str(self.scale) if self.fixed else f"{self.scale}:{self.scale_max}"


@dataclass
class DenseResult:
    """Protocol 2's top-5 localisation error (%) of the union of the localisation nets' boxes ranked by a
    classifier, and of two boxes that ignore the image, each with the classifier's top-5 classes: the
    whole image, and the mean training box; ``nets``: each net alone."""

    checkpoint: str
    classifier: str
    scales: list[int]
    images: int
    localisation_error: float
    whole_image_error: float
    centre_prior_error: float | None  # None: no training image had a box to take the mean of
    nets: list[DenseNetResult]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: ``checkpoint`` is the first net's; ``nets`` only for several nets."""
        fields = {key: value for key, value in self.__dict__.items() if key != "nets"}
        return {**fields, "nets": [net.__dict__ for net in self.nets]} if len(self.nets) > 1 else fields


def image_misses(output: DenseOutput, truth: Sequence[tuple[int, Tensor]], prior: Tensor | None) -> Tensor:
    """Whether protocol 2 is wrong on one image: the union of all nets, each net alone, the whole image
    and, with a ``prior``, the mean training box (each with the top classes)."""
    w, h = output.size
    union = ranked(output)
    alone = [ranked(output, [net]) for net in range(len(output.boxes))] if len(output.boxes) > 1 else [union]
    guesses, labels = [union, *alone], output.labels.tolist()
    size = torch.tensor([w, h, w, h])
    baselines = [torch.tensor([0.0, 0.0, w, h]), *([] if prior is None else [prior * size])]
    guesses += [[Guess(label, box, 0.0) for label in labels] for box in baselines]
    return torch.tensor([ilsvrc_wrong([(g.label, g.box) for g in row], truth) for row in guesses], dtype=torch.float)


def evaluate_dense(checkpoint: str | Path | Sequence[str | Path], classifier: str | Path | None, data: str | Path,
                   boxes: str | Path | None = None, scales: Sequence[int] | None = None, limit: int | None = None,
                   device: str = "auto", batch_size: int = 64, workers: int = 0, progress: bool = True) -> DenseResult:
    """Protocol 2 on the validation split of ``data``, the union of the nets' boxes (scales Q default to
    the first net's training S), the images read by ``workers`` processes; ``progress``: a bar over the
    images (the first process's)."""
    if classifier is None:
        raise UserError("--protocol dense ranks the boxes by a classification net's scores: give --classifier RUN")
    checkpoints = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
    nets = DenseNets.load(checkpoints, classifier, device)
    recipe = nets.recipes[0]
    qs = list(scales or [smallest_training_scale(recipe)])
    nets.check_scales(qs)
    transform = CenterCropTransform(max(qs), int(recipe["crop"]))
    task = task_of(recipe, boxes_source(boxes, data, nets.recipes), checkpoints[0])
    train_set, val_set = task.open_for_eval(str(data), transform, unreadable_image)  # protocol 2 leaves none out
    to_net = classes_in_net(recipe, val_set, checkpoints[0])
    prior = mean_relative_box(train_set) if train_set is not None else None  # no training boxes: no prior
    indices = balanced_subset(val_set.targets, limit)
    count = len(checkpoints) + 2 + (prior is not None)  # the union, each net, the whole image, the prior
    misses, window = torch.zeros(count, dtype=torch.float64), batch_size * WINDOW_BATCHES
    starts = sharding.shard(range(0, len(indices), window))
    with (progress_bar(sum(len(indices[start:start + window]) for start in starts),
                       progress and Processes.from_env().main, desc="localize dense", unit="img") as bar,
          sharding.failing_together()):  # an image it cannot read ends every process's share
        for start in starts:
            chosen = [val_set.samples[i] for i in indices[start:start + window]]
            outputs = nets.outputs([path for path, _ in chosen], qs, batch_size=batch_size, workers=workers)
            for (path, label), output in zip(chosen, outputs, strict=True):
                # an image's boxes are of its class (or of none): its class as the nets number their guesses'
                truth = [(label if to_net is None else int(to_net[label]), torch.tensor(b.corners))
                         for b in val_set.transform.boxes[str(path)]]
                misses += image_misses(output, truth, prior)
            bar.update(len(chosen))
    misses = sharding.total(misses)
    if not indices:
        raise UserError(f"{data}: no validation image with a box to evaluate")
    errors = (100.0 * misses / len(indices)).tolist()
    alone, (whole, *centre) = errors[1:len(checkpoints) + 1], errors[len(checkpoints) + 1:]
    per_net = [net_result(c, r, t.head, e) for c, r, t, e in zip(checkpoints, nets.recipes, nets.tasks, alone,
                                                                 strict=True)]
    return DenseResult(str(checkpoints[0]), str(classifier), qs, len(indices), errors[0], whole,
                       centre[0] if centre else None, per_net)


def net_result(checkpoint: str | Path, recipe: dict[str, Any], head: str, error: float) -> DenseNetResult:
    """A net's result with its training scales as its recipe gives them."""
    smin, smax = train_scale(recipe)
    return DenseNetResult(str(checkpoint), head, smin, int(recipe["crop"]), error,
                          configs.canonical(recipe["config"]), smax)


def table_9(result: DenseResult) -> Any:
    """Table 9's layout (protocol 2, top-5 localisation error %): each net alone (several nets) and the
    union of their boxes, the two baselines, then the paper's rows not shown beside ours. A net of the paper's
    kind (:attr:`DenseNetResult.papers_kind`) whose S and Q are a row of the paper's scaled to its crop
    has its figures beside it; the union of several such nets has the paper's fusion."""

    def figures(paper: ValTest | None) -> tuple[str, str] | None:
        return None if paper is None else (f"{paper.val:.1f}", "-" if paper.test is None else f"{paper.test:.1f}")

    q, fused, rows = scales_label(result.scales), len(result.nets) > 1, []
    keys = [table_9_row(net.scale, result.scales, net.crop) if net.papers_kind else None for net in result.nets]
    for net, key in zip(result.nets, keys, strict=True):
        rows.append(Row((f"{net_name(net.checkpoint)} ({net.head.upper()})", net.scale_label, q,
                         f"{net.localisation_error:.1f}"), figures(TABLE_9.get(key))))
    if fused:
        union = "union of " + " + ".join(net_name(net.checkpoint) for net in result.nets)
        ordered = sorted(result.nets, key=lambda net: (net.scale, net.scale_max or net.scale))
        labels = list(dict.fromkeys(net.scale_label for net in ordered))
        rows.append(Row((union, labels[0] if len(labels) == 1 else "{" + ",".join(labels) + "}", q,
                         f"{result.localisation_error:.1f}"),
                    figures(TABLE_9_FUSION) if all(net.papers_kind for net in result.nets) else None))
    rows += [Row((name, "-", q, "-" if error is None else f"{error:.1f}")) for name, error in (
        ("whole image box", result.whole_image_error), ("mean training box", result.centre_prior_error))]
    rows += [Row(("paper: D, PCR", str(key.train), scales_label(key.test), "-"), figures(paper))
             for key, paper in TABLE_9.items() if key not in keys]
    if not fused:
        rows.append(Row(("paper: fusion of its nets", "-", "-", "-"), figures(TABLE_9_FUSION)))
    columns = [Column("net(s)"), Column("S"), Column("Q"), Column("top-5 loc. error %", True)]
    return Table(f"Table 9: top-5 localisation error, dense boxes merged greedily ({result.images} val. images)",
                 columns, rows, [Column("paper val. %", True), Column("paper test %", True)], show_paper=True,
                 paper_missing="-")
