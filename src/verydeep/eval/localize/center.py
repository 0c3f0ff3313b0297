"""Protocol 1 of Appendix A (Table 8): the box of the central crop at the training scale, for the
ground-truth class, beside the whole image and the centre prior."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from verydeep.data import CenterCropTransform, balanced_subset, collate, to_input
from verydeep.data.boxes import clipped, decode
from verydeep.data.datasets import LabelledImages
from verydeep.data.loaders import image_loader
from verydeep.errors import UserError
from verydeep.eval.localize.prior import in_frames, mean_relative_box
from verydeep.eval.localize.scoring import wrong
from verydeep.eval.localize.task import boxes_source, classes_in_net, recipe_file, smallest_training_scale, task_of
from verydeep.eval.nets import train_scale
from verydeep.io.rundir import CHECKPOINTS
from verydeep.io.sources import load
from verydeep.nn import configs
from verydeep.paper.figures import TABLE_8, BoxRegression, scaled_from
from verydeep.paper.report import Column, Row, Table
from verydeep.runtime import sharding
from verydeep.runtime.device import pick_device
from verydeep.runtime.processes import Processes
from verydeep.runtime.progress import progress_bar


@dataclass
class CenterResult:
    """Protocol 1's localisation error (%) of a net, and of two boxes that ignore the image: the
    whole image, and the mean training box (relative to the image)."""

    checkpoint: str
    head: str
    fine_tuned: str  # Table 8's label of the layers fine-tuned: all, fc (FC1-FC2), or "after LAYER"
    images: int
    localisation_error: float
    whole_image_error: float
    centre_prior_error: float | None  # None: no training image had a box to take the mean of
    paper_error: float | None = None  # Table 8's figure of a net of its setting (:func:`papers_figure`)


def loader(images: LabelledImages, limit: int | None, batch_size: int, workers: int) -> DataLoader:
    """The first ``limit`` images per class, round-robin (:func:`~verydeep.data.balanced_subset`), in batches;
    under ``torchrun`` this process's share of the batches (:func:`verydeep.runtime.sharding.shard`)."""
    indices = balanced_subset(images.targets, limit)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return image_loader(images, sharding.shard(batches), workers, collate)


def fine_tuned_layers(recipe: dict[str, Any], given: str | None, where: str | Path) -> str:
    """Table 8's label of the layers a net fine-tuned, as its recipe's ``freeze`` records it (none: ``all``,
    ``features``: ``fc``, another layer: ``after LAYER``), else ``given`` (default ``all``). A given label that
    the recipe contradicts, or a ``freeze`` that is not a layer name, is a :class:`UserError` naming ``where``."""
    if "freeze" not in recipe:  # weights that do not say which layers were trained: the label given
        return given or "all"
    frozen = recipe["freeze"]
    if frozen is not None and not isinstance(frozen, str):
        raise UserError(f"{where}: recipe freeze must be a layer name or null; got {frozen!r}")
    recorded = {None: "all", "features": "fc"}.get(frozen, f"after {frozen}")
    if given is not None and given != recorded:
        raise UserError(f"--fine-tuned {given}: {where} records freeze {frozen} (fine-tuned: {recorded}); drop "
                        "--fine-tuned, or give it as the net was trained")
    return recorded


@torch.no_grad()
def evaluate_center(checkpoint: str | Path, data: str | Path, boxes: str | Path | None = None,
                    limit: int | None = None, batch_size: int = 64, device: str = "auto",
                    workers: int = 0, fine_tuned: str | None = None, progress: bool = True) -> CenterResult:
    """Protocol 1 on the validation split of ``data``: the trained scale S, its central crop; ``fine_tuned``:
    Table 8's label of the net where its recipe does not say (:func:`fine_tuned_layers`); ``progress``: a
    bar over the batches (the first process's)."""
    dev = pick_device(device)
    net = load(checkpoint, data=data, device=dev)
    model, recipe = net.model, net.recipe
    task = task_of(recipe, boxes_source(boxes, data, [recipe]), net.source)
    layers = fine_tuned_layers(recipe, fine_tuned, recipe_file(net.source))
    transform = CenterCropTransform(smallest_training_scale(recipe), int(recipe["crop"]))
    train_set, val_set = task.open_for_eval(str(data), transform)
    # a per-class box is the box of the image's class as the net numbers it; SCR's one box is every class's
    to_net = classes_in_net(recipe, val_set, net.source) if task.head == "pcr" else None
    prior = mean_relative_box(train_set) if train_set is not None else None  # no training boxes: no prior
    pre = net.preprocess
    wrong_counts, images = torch.zeros(2 if prior is None else 3), 0  # the net, the whole image, the prior
    batches = loader(val_set, limit, batch_size, workers)
    with progress_bar(len(batches), progress and Processes.from_env().main,
                              desc=f"localize {net_name(checkpoint)}", unit="batch") as bar:
        for batch in batches:
            bar.update()
            if not len(batch.images):
                continue
            side = batch.images.shape[-1]
            outputs = model(to_input(batch.images.to(dev), pre)).float().cpu()
            labels = batch.labels if to_net is None else to_net[batch.labels]
            guesses = [clipped(decode(task.predicted(outputs, labels), side), batch.frames), batch.frames,
                       *([] if prior is None else [in_frames(prior, batch.frames)])]
            wrong_counts += torch.stack([wrong(guess, batch.boxes).sum() for guess in guesses])
            images += len(batch.images)
    *summed, total = sharding.total(torch.tensor([*wrong_counts.tolist(), images], dtype=torch.float64)).tolist()
    wrong_counts, images = torch.tensor(summed, dtype=torch.float64), int(total)
    if not images:
        raise UserError(f"{data}: no readable validation image with a box")
    net_error, whole, *centre = (100.0 * wrong_counts / images).tolist()
    return CenterResult(str(checkpoint), task.head, layers, images, net_error, whole, centre[0] if centre else None,
                        papers_figure(recipe, task.head, layers))


def table_8_label(fine_tuned: str) -> str:
    """Table 8's name of the layers fine-tuned: ``FC1-FC2`` (``fc``), ``all``, ``after LAYER``."""
    return "FC1-FC2" if fine_tuned == "fc" else fine_tuned


def papers_figure(recipe: dict[str, Any], head: str, fine_tuned: str) -> float | None:
    """Table 8's error for a net of its setting, configuration D trained at S = 384 (at a 224-pixel crop, or 384
    scaled to the net's crop, :func:`~verydeep.paper.figures.scaled_from`), with its fine-tuned layers and head;
    None for any other net."""
    smin, smax = train_scale(recipe)
    if configs.canonical(recipe["config"]) != "D" or smin != smax or not scaled_from(384, smin, int(recipe["crop"])):
        return None
    return TABLE_8.get(BoxRegression(table_8_label(fine_tuned), head.upper()))


def net_name(checkpoint: str | Path) -> str:
    """A net as tables name it: its run folder, or ``RUN/best.pt`` for one of its checkpoints."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == CHECKPOINTS else path.name


def center_json(results: Sequence[CenterResult]) -> dict[str, Any]:
    """Protocol 1's JSON object: the first net's figures, and with several nets ``nets``, each net's."""
    first = dict(results[0].__dict__)
    return {**first, "nets": [result.__dict__ for result in results]} if len(results) > 1 else first


def table_8(results: Sequence[CenterResult]) -> Any:
    """Table 8's layout (protocol 1, error %) with the paper's figures beside each row."""

    several, rows = len(results) > 1, []
    for result in results:
        label, paper = table_8_label(result.fine_tuned), result.paper_error
        errors = (result.localisation_error, result.whole_image_error, result.centre_prior_error)
        cells = (*([net_name(result.checkpoint)] if several else []), label, result.head.upper(),
                 *("-" if error is None else f"{error:.1f}" for error in errors))
        rows.append(Row(cells, (f"{paper:.1f}",) if paper is not None else None))
    columns = [*([Column("net")] if several else []), Column("fine-tuned"), Column("regression"),
               Column("error %", True), Column("whole image %", True), Column("centre prior %", True)]
    return Table("Table 8: localisation error, central crop, ground-truth class", columns, rows,
                 [Column("paper %", True)], paper_missing="-")
