"""The posteriors of Sec. 3.2's testing, computed once per (image, net, kind, test scale Q): dense (the
fully-convolutional net on the whole image rescaled to Q, its class score map averaged spatially),
multi-crop (a 5x5 grid of crops and their mirror images) and centre crop; images decoded once per Q
for every net that needs them, the passes shared among ``torchrun``'s processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from verydeep.data import (
    CenterCropTransform,
    RescaleTransform,
    SizeGroupedBatchSampler,
    collate,
    gpu,
    grid_crops,
    to_input,
)
from verydeep.data.loaders import image_loader
from verydeep.eval.nets import Net, center_resize
from verydeep.nn.model import VGG, DenseVGG
from verydeep.runtime import sharding
from verydeep.runtime.ahead import run_ahead
from verydeep.runtime.precision import autocast
from verydeep.runtime.processes import Processes
from verydeep.runtime.progress import progress_bar

#: Multi-crop forwards take as many crops as keep the first conv's output under this many elements:
#: 128 crops of 224 for a full-width net (1.6 GB in fp32), thousands of small crops of a narrow one.
ACTIVATION_BUDGET = 128 * 224 * 224 * 64

# ---- posteriors ---------------------------------------------------------------------------


def dense_posteriors(dense: DenseVGG | Callable[[Tensor], Tensor], x: Tensor, flip: bool = True) -> Tensor:
    """Sec. 3.2 dense evaluation of a batch of normalised images (N, 3, H, W) -> posteriors (N, classes), by
    ``dense`` (a :class:`DenseVGG`, or its compiled form).

    The class score map is averaged spatially, then softmax; with ``flip`` the mirrored image's
    posterior is averaged in. Scores are taken to fp32 before averaging.
    """
    n = x.shape[0]
    inputs = torch.cat([x, x.flip(-1)]) if flip else x
    posteriors = dense(inputs).float().mean(dim=(2, 3)).softmax(dim=1)
    return posteriors.view(2, n, -1).mean(dim=0) if flip else posteriors


def multicrop_posteriors(
    model: VGG, x: Tensor, crop: int, grid: int = 5, flip: bool = True, chunk: int | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Sec. 3.2 multi-crop evaluation: posteriors (N, classes) averaged over the grid crops and flips.

    Crops go through the net (``forward``: ``model``, or its compiled form) at most ``chunk`` at a time
    (whole images per forward; by default as many as :data:`ACTIVATION_BUDGET` allows) to bound memory.
    """

    per_image = grid * grid * (2 if flip else 1)
    if chunk is None:
        chunk = ACTIVATION_BUDGET // (crop * crop * model.features[0].out_channels)
    step = max(1, chunk // per_image)
    forward = model if forward is None else forward
    out = []
    for start in range(0, x.shape[0], step):
        crops = grid_crops(x[start : start + step], crop, grid, flip)
        n = crops.shape[0]
        crops = crops.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        out.append(forward(crops).float().softmax(dim=1).view(n, per_image, -1).mean(dim=1))
    return torch.cat(out)


def average(posteriors: Iterable[Tensor]) -> Tensor:
    """The mean of several (N, classes) posterior arrays (multi-scale, combination, fusion)."""
    return torch.stack(list(posteriors)).mean(dim=0)


# ---- computing the posteriors -------------------------------------------------------------

#: Posteriors (N, classes) by (net index, kind, Q); kind is ``dense``, ``multicrop`` or ``center``.
PosteriorArrays = dict[tuple[int, str, int], Tensor]


@dataclass(frozen=True)
class Pass:
    """One sweep over the data: whole images rescaled to ``q`` (``crop`` 0), or centre crops of ``crop``."""

    q: int
    crop: int = 0

    def transform(self) -> Any:

        return CenterCropTransform(self.q, self.crop) if self.crop else RescaleTransform(self.q)

    def label(self) -> str:
        return f"centre {self.q}/{self.crop}" if self.crop else f"Q={self.q}"


#: For one pass: which nets (by index) compute which kinds of posterior.
PassUsers = list[tuple[int, list[str]]]


def plan_passes(nets: Sequence[Net], protocols: Sequence[str]) -> dict[Pass, PassUsers]:
    """Which nets compute which kinds of posterior on each sweep: images are decoded once per Q."""
    kinds = [k for k in ("dense", "multicrop") if k in protocols or "dense+multicrop" in protocols]
    passes: dict[Pass, PassUsers] = {}
    for i, net in enumerate(nets):
        if kinds:
            for q in net.scales:
                passes.setdefault(Pass(q), []).append((i, kinds))
        if "center" in protocols:
            passes.setdefault(Pass(center_resize(net.crop), net.crop), []).append((i, ["center"]))
    return dict(sorted(passes.items(), key=lambda item: (item[0].crop, item[0].q)))


@dataclass(frozen=True)
class SweepSettings:
    """How the passes run: device, autocast dtype, mirrored images, batch size, loader workers, progress bar,
    and where JPEGs are decoded (``cpu`` in the workers, ``gpu`` on the device)."""

    device: torch.device
    dtype: torch.dtype | None
    flip: bool
    batch_size: int
    workers: int
    progress: bool
    decode: str = "cpu"


@dataclass(frozen=True)
class PassTiming:
    """The time one pass took (``pass_`` is ``pass`` in JSON)."""

    pass_: str
    nets: list[str]
    kinds: list[str]
    seconds: float
    seconds_per_image: float


def net_posteriors(net: Net, kind: str, x: Tensor, flip: bool) -> Tensor:
    """One net's posteriors (N, classes) of a batch of inputs by one kind of evaluation."""
    if kind == "dense":
        return dense_posteriors(net.run_dense, x, flip)
    if kind == "multicrop":
        return multicrop_posteriors(net.model, x, net.crop, flip=flip, forward=net.run_model)
    return net.run_model(x).float().softmax(dim=1)


def pass_batches(dataset: Any, sweep: Pass, size: int) -> list[list[int]]:
    """One process's batches of a pass: whole images grouped by their size at Q, or centre crops in order."""

    n = len(dataset)
    if sweep.crop:
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    return SizeGroupedBatchSampler(dataset, sweep.q, size).batches


def run_pass(nets: Sequence[Net], dataset: Any, sweep: Pass, users: PassUsers, posteriors: PosteriorArrays,
             settings: SweepSettings, batches: Sequence[list[int]], bar: Any) -> set[str]:
    """Fill the rows of ``batches`` in ``posteriors`` for one pass over ``dataset``; returns the paths of
    unreadable images."""
    on_gpu = settings.decode == "gpu"
    dataset.transform = gpu.EncodedTransform(sweep.transform()) if on_gpu else sweep.transform()
    collate_fn = gpu.collate_encoded if on_gpu else collate
    loader = image_loader(dataset, batches, settings.workers, collate_fn, settings.device)
    paths = [str(path) for path, _ in dataset.samples]
    skipped: set[str] = set()
    # JPEGs decoded on the GPU: each batch while the nets run on the one before
    decoded = run_ahead(loader, lambda b: gpu.decode_batch(b, settings.device), settings.device) if on_gpu else loader
    for indices, batch in zip(batches, decoded, strict=True):
        skipped.update(batch.skipped)
        bad = set(batch.skipped)
        good = torch.tensor([i for i in indices if paths[i] not in bad], dtype=torch.long)
        bar.update(len(indices))
        if not len(good):
            continue
        images = batch.images.to(settings.device, non_blocking=True)
        for i, kinds in users:
            x = to_input(images, nets[i].preprocess).contiguous(memory_format=torch.channels_last)
            with autocast(settings.device, settings.dtype):
                for kind in kinds:
                    posteriors[i, kind, sweep.q][good] = net_posteriors(nets[i], kind, x, settings.flip).cpu()
    return skipped


@torch.inference_mode()
def compute_posteriors(nets: Sequence[Net], dataset: Any, passes: dict[Pass, PassUsers],
                       settings: SweepSettings) -> tuple[PosteriorArrays, set[str], list[PassTiming]]:
    """Posteriors per (net index, kind, Q), NaN rows for unreadable images; their paths; each pass's time.
    Under ``torchrun`` each process computes its share of every pass's batches and the rows are gathered
    (:mod:`verydeep.runtime.sharding`): every process ends with one process's arrays."""
    n = len(dataset)
    posteriors = {
        (i, kind, p.q): torch.full((n, nets[i].model.num_classes), float("nan"))
        for p, users in passes.items()
        for i, kinds in users
        for kind in kinds
    }
    plans = {sweep: sharding.shard(pass_batches(dataset, sweep, settings.batch_size)) for sweep in passes}
    skipped: set[str] = set()
    seconds = []
    own_images = sum(len(batch) for batches in plans.values() for batch in batches)
    with progress_bar(own_images, settings.progress and Processes.from_env().main, unit="img") as bar:
        for sweep, users in passes.items():
            bar.set_description(f"eval {sweep.label()}", refresh=False)
            start = time.perf_counter()
            skipped |= run_pass(nets, dataset, sweep, users, posteriors, settings, plans[sweep], bar)
            rows = [i for batch in plans[sweep] for i in batch]
            for i, kinds in users:
                for kind in kinds:
                    sharding.gather_rows(posteriors[i, kind, sweep.q], rows)
            if settings.device.type == "cuda":
                torch.cuda.synchronize(settings.device)
            seconds.append(time.perf_counter() - start)
    skipped = sharding.union(skipped)
    read = max(n - len(skipped), 1)  # none read: refused by the caller, which has the file names
    timings = [PassTiming(sweep.label(), [nets[i].name for i, _ in users],
                          sorted({k for _, kinds in users for k in kinds}), round(took, 3), round(took / read, 6))
               for (sweep, users), took in zip(passes.items(), sharding.slowest(seconds), strict=True)]
    return posteriors, skipped, timings

