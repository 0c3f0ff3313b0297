"""Training (Sec. 3.1, 3.3): mini-batch SGD on one process or many, exactly reproducible.

The paper's optimisation: softmax cross-entropy, SGD with momentum 0.9, batch 256, weight decay
5e-4, dropout 0.5 on FC6/FC7, learning rate 1e-2 divided by 10 when validation top-1 stops
improving, at most 3 times, then stop. Each image: S drawn from [Smin, Smax], a random crop, a
random flip and the AlexNet PCA colour shift (the transforms are ``verydeep.data``'s).

Reproducibility is by construction, so that a resumed run and a run on N processes are the same
computation as one uninterrupted process:

- the order of an epoch is a permutation drawn from ``(seed, epoch)``, cut into global batches;
- each image's augmentation (scale, crop, flip, colour-shift alphas) is drawn from an RNG seeded
  by ``(seed, epoch, index)``, in whichever worker or process reads it;
- a process takes its slice of each global batch, in micro-batches (gradient accumulation), and
  every micro-batch loss is a sum divided by the global batch (times the world size, which DDP's
  gradient averaging divides back), so the step equals one on the whole batch (Sec. 3.3);
- checkpoints hold the model, optimizer, schedule, position in the epoch and every RNG state.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from tqdm import tqdm

from verydeep import runtime
from verydeep.checkpoint import atomic_write, export_safetensors, load_checkpoint, model_from_recipe, save_checkpoint
from verydeep.data import (
    Batch,
    CenterCropTransform,
    ImageFolder,
    Preprocess,
    TrainTransform,
    balanced_subset,
    collate,
    find_split,
    load_preprocess,
    open_split,
    to_input,
)
from verydeep.data.preprocess import pca_shift
from verydeep.init import PROTOCOLS, warm_start
from verydeep.model import VGG

#: Recipe keys that must agree for ``init_from`` to copy every weight (else the paper's warm start).
ARCH_KEYS = ("config", "batch_norm", "width", "num_classes", "crop")

#: Epoch checkpoints are ``checkpoints/epoch-0007.pt``; the newest ``keep_last`` are kept.
EPOCH_CHECKPOINT = "epoch-{:04d}.pt"


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; training stopped before any update or checkpoint with it."""


@dataclass
class TrainConfig:
    """Every training option, defaulting to the paper's (Sec. 3.1)."""

    data: str | Path = ""
    out: str | Path = ""
    recipe: str | None = None  # name or file of the recipe these settings came from (recorded only)
    # model
    config: str = "A"
    width: float = 1.0
    batch_norm: bool = False
    dropout: float = 0.5
    init: str = "paper"
    init_from: str | None = None  # checkpoint or run dir: same architecture -> all weights, else warm start
    # images
    crop: int = 224
    scale: tuple[int, int] = (256, 256)  # (Smin, Smax); equal for a fixed S
    alpha_std: float = 0.1  # PCA colour shift
    preprocess: Preprocess | None = None  # None: load_preprocess(data)
    limit_train: int | None = None  # class-balanced first N images
    limit_val: int | None = None
    # optimisation
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256  # global, over all processes
    micro_batch: int | None = None  # images per forward pass per process; None: the whole slice
    epochs: int = 74  # budget (the paper stopped after 74)
    patience: int = 2  # validations without improvement before lr /= 10
    max_drops: int = 3  # after this many divisions, the next plateau stops training
    milestones: list[int] = field(default_factory=list)  # epochs after which lr /= 10 (replaces plateau)
    seed: int = 0
    # running
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"  # auto / bf16 / fp32
    channels_last: bool = True
    compile: bool = False
    val_every: int = 1  # epochs
    checkpoint_every: int = 0  # steps between checkpoints of last.pt (0: at epoch ends only)
    keep_last: int = 3  # epoch checkpoints kept
    progress: bool = True
    resume: bool = False
    stop_after_steps: int | None = None  # leave after this many steps with no final checkpoint (a crash)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        smin, smax = self.scale
        positive = {"crop": self.crop, "batch_size": self.batch_size, "epochs": self.epochs, "lr": self.lr,
                    "width": self.width, "val_every": self.val_every, "patience": self.patience}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive; got {value}")
        if not self.data:
            raise ValueError("--data is required")
        if not self.out:
            raise ValueError("--out (the run directory) is required")
        if not self.crop <= smin <= smax:
            raise ValueError(f"--scale needs crop <= Smin <= Smax; got scale {smin}:{smax} with crop {self.crop}")
        if self.crop % 32:
            raise ValueError(f"--crop must be a multiple of 32 (five 2x2 poolings); got {self.crop}")
        if self.init not in PROTOCOLS:
            raise ValueError(f"--init must be one of {', '.join(PROTOCOLS)}; got {self.init!r}")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise ValueError(f"--micro-batch must be positive; got {self.micro_batch}")
        for name in ("limit_train", "limit_val", "stop_after_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive; got {value}")
        if min(self.workers, self.checkpoint_every, self.keep_last, self.seed, self.max_drops) < 0:
            raise ValueError("--workers, --checkpoint-every, --keep-last, --seed and --max-drops must be >= 0")
        runtime.autocast_dtype(torch.device("cpu"), self.precision)  # validates the name

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (paths as strings, the preprocessing as its dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(data=str(self.data), out=str(self.out), scale=list(self.scale), milestones=list(self.milestones))
        out["init_from"] = str(self.init_from) if self.init_from else None
        out["preprocess"] = self.preprocess.to_dict() if self.preprocess is not None else None
        return out


def parse_scale(value: Any) -> tuple[int, int]:
    """``256``, ``"384"``, ``"256:512"`` or ``[256, 512]`` -> ``(Smin, Smax)``."""
    try:
        if isinstance(value, (list, tuple)):
            parts = [int(v) for v in value]
        else:
            parts = [int(v) for v in str(value).split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 0 < parts[0] <= parts[1]:
        raise ValueError(f"--scale must be S or Smin:Smax with 0 < Smin <= Smax (e.g. 256 or 256:512); got {value!r}")
    return parts[0], parts[1]


# ---- the learning-rate schedule -------------------------------------------------------------


class Schedule:
    """Sec. 3.1: lr /= 10 when validation top-1 has not improved for ``patience`` validations, at most
    ``max_drops`` times, then stop; or, with ``milestones``, lr /= 10 after each listed epoch."""

    def __init__(self, lr: float, patience: int = 2, max_drops: int = 3, milestones: Sequence[int] = ()) -> None:
        self.base_lr = self.lr = lr
        self.patience = patience
        self.max_drops = max_drops
        self.milestones = sorted(milestones)
        self.best = -math.inf
        self.bad = 0
        self.drops = 0
        self.stopped = False

    def update(self, epochs_done: int, top1: float | None) -> bool:
        """Account for an epoch (``top1`` None when not validated); True when top-1 improved."""
        improved = top1 is not None and top1 > self.best
        if improved:
            self.best, self.bad = top1, 0
        if self.milestones:
            if epochs_done in self.milestones:
                self.lr /= 10
                self.drops += 1
        elif top1 is not None and not improved:
            self.bad += 1
            if self.bad >= self.patience:
                if self.drops < self.max_drops:
                    self.lr /= 10
                    self.drops += 1
                    self.bad = 0
                else:
                    self.stopped = True
        return improved

    def follow_milestones(self, epochs_done: int) -> None:
        """Set lr for ``epochs_done`` from the milestones alone: a resumed run may move or add them."""
        self.drops = sum(milestone <= epochs_done for milestone in self.milestones)
        self.lr = self.base_lr / 10**self.drops

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best": self.best, "bad": self.bad, "drops": self.drops, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.best, self.bad = state["lr"], state["best"], state["bad"]
        self.drops, self.stopped = state["drops"], state["stopped"]


# ---- data: seeded samples, the global-batch sampler -------------------------------------------


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (a BLAKE2 hash: cheap, well mixed)."""
    digest = hashlib.blake2b(",".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples(Dataset):
    """Item ``(epoch, index)`` -> ``(uint8 image or None, label, path, colour shift (3,))``.

    The augmentation and the PCA alphas are drawn under ``torch.manual_seed(f(seed, epoch, index))``
    in a forked RNG, so they are the same whichever process, worker or batch reads the image.
    """

    def __init__(self, dataset: Dataset, seed: int, pre: Preprocess, alpha_std: float) -> None:
        self.dataset, self.seed, self.pre, self.alpha_std = dataset, seed, pre, alpha_std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, str, torch.Tensor]:
        epoch, index = key
        # In a worker the global CPU RNG serves nothing else; in the main process (no workers) it is
        # also dropout's, so it is forked. Only the CPU generator is seeded, never CUDA's.
        isolated = torch.random.fork_rng(devices=[]) if get_worker_info() is None else contextlib.nullcontext()
        with isolated:
            torch.default_generator.manual_seed(derived_seed(self.seed, 1, epoch, index))
            image, label, path = self.dataset[index]
            shift = pca_shift(1, self.pre, self.alpha_std)[0] if self.alpha_std > 0 else torch.zeros(3)
        return image, label, path, shift


def collate_shifted(items: Sequence[tuple[torch.Tensor | None, int, str, torch.Tensor]]) -> tuple[Batch, torch.Tensor]:
    """``verydeep.data.collate`` plus the colour shifts (n, 3) of the images kept."""
    shifts = [shift for image, _, _, shift in items if image is not None]
    return collate([item[:3] for item in items]), torch.stack(shifts) if shifts else torch.zeros(0, 3)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """The distributed sampler: an epoch's order is a permutation drawn from ``(seed, epoch)``, cut into
    global batches of ``batch_size`` (an incomplete last one is dropped); process ``rank`` yields its
    slice of each, ``micro_batch`` images at a time, as ``(epoch, index)`` keys for :class:`SeededSamples`."""

    def __init__(self, indices: Sequence[int], batch_size: int, micro_batch: int, rank: int, world: int,
                 seed: int) -> None:
        self.indices = list(indices)
        self.batch_size, self.micro_batch = batch_size, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.local = batch_size // world
        self.micro_per_step = math.ceil(self.local / micro_batch)
        self.steps_per_epoch = len(self.indices) // batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its global batch ``start_step`` (after a resume)."""
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, 0, self.epoch))
        order = torch.randperm(len(self.indices), generator=generator).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.batch_size + self.rank * self.local
            mine = order[first:first + self.local]
            for i in range(0, self.local, self.micro_batch):
                yield [(self.epoch, self.indices[j]) for j in mine[i:i + self.micro_batch]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.micro_per_step


# ---- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's place among those ``torchrun`` started (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Processes:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- model ------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, recipe: dict[str, Any]) -> tuple[VGG, str]:
    """The net of ``recipe`` initialised by ``cfg.init``, then from ``cfg.init_from`` if given (Sec. 3.1):
    the same architecture copies every weight (S=384 from S=256, jittered S from S=384), another
    configuration takes the paper's warm start (first four convs and FC6-8 of net A).
    Returns the model and a line saying how it was initialised."""
    model = model_from_recipe(recipe, init=cfg.init)
    if not cfg.init_from:
        return model, f"{cfg.init} init"
    source_state = load_checkpoint(cfg.init_from)
    source_recipe = source_state["recipe"]
    if all(source_recipe.get(key) == recipe[key] for key in ARCH_KEYS):
        model.load_state_dict(source_state["model"])
        return model, f"all weights from {cfg.init_from}"
    source = model_from_recipe(source_recipe)
    source.load_state_dict(source_state["model"])
    copied = warm_start(model, source)
    return model, f"warm start from {cfg.init_from} ({', '.join(copied)}), the rest {cfg.init} init"


# ---- the trainer -------------------------------------------------------------------------------


class Trainer:
    """One training run, on this process and its share of the global batches."""

    def __init__(self, cfg: TrainConfig, procs: Processes) -> None:
        cfg.check()
        self.cfg, self.procs = cfg, procs
        if cfg.batch_size % procs.world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {procs.world} processes")
        self.local_batch = cfg.batch_size // procs.world
        self.micro_batch = min(cfg.micro_batch or self.local_batch, self.local_batch)
        self.run_dir = Path(cfg.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.resume and not (self.ckpt_dir / "last.pt").is_file():
            raise FileNotFoundError(f"--resume: {self.ckpt_dir / 'last.pt'} does not exist")
        self.device = self._device()
        self.dtype = runtime.autocast_dtype(self.device, cfg.precision)

        self.pre = cfg.preprocess or load_preprocess(cfg.data)
        train_set = ImageFolder(find_split(cfg.data, "train"), TrainTransform(cfg.crop, tuple(cfg.scale)))
        self.val_set = open_split(find_split(cfg.data, "val"), CenterCropTransform(cfg.scale[0], cfg.crop))
        if self.val_set.classes != train_set.classes:
            raise ValueError(f"{cfg.data}: the validation classes differ from the training classes")
        train_indices = balanced_subset(train_set.targets, cfg.limit_train)
        if len(train_indices) < cfg.batch_size:
            raise ValueError(f"{cfg.data}: {len(train_indices)} training images, fewer than --batch-size "
                             f"{cfg.batch_size}")
        self.val_indices = balanced_subset(self.val_set.targets, cfg.limit_val)
        self.recipe = {
            **cfg.to_dict(),
            "num_classes": len(train_set.classes),
            "preprocess": self.pre.to_dict(),
            "classes": list(train_set.classes),
            "class_names": list(train_set.class_names),
        }

        torch.manual_seed(cfg.seed)
        if cfg.resume:  # the weights come from the checkpoint
            model, how = model_from_recipe(self.recipe), ""
        else:
            model, how = build_model(cfg, self.recipe)
        self.model = runtime.prepare(model, self.device, cfg.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.schedule = Schedule(cfg.lr, cfg.patience, cfg.max_drops, cfg.milestones)
        self.epoch, self.start_step, self.step = 0, 0, 0
        self.partial: dict[str, float] = {}  # running sums of the current epoch, carried across a resume
        self.input_memory = torch.empty(0)  # the float input of every CPU batch (no fresh pages per step)
        if cfg.resume:
            resumed = self._resume()
            how = f"resumed from {self.ckpt_dir / 'last.pt'} at epoch {self.epoch + 1} step {self.start_step}"
        else:
            torch.manual_seed(derived_seed(cfg.seed, 2, procs.rank))  # dropout RNG, one stream per process
            resumed = None
        self.forward_model: torch.nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if procs.distributed:
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.index is not
                                               None else None)
            self.forward_model = self.ddp
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        if resumed is not None:
            set_rng_state(resumed)

        self.sampler = GlobalBatchSampler(train_indices, cfg.batch_size, self.micro_batch, procs.rank, procs.world,
                                          cfg.seed)
        self.loader = self._loader(SeededSamples(train_set, cfg.seed, self.pre, cfg.alpha_std), self.sampler,
                                   collate_shifted)
        val_mine = self.val_indices[procs.rank::procs.world]
        val_batches = [val_mine[i:i + self.micro_batch] for i in range(0, len(val_mine), self.micro_batch)]
        self.val_loader = self._loader(self.val_set, val_batches, collate)
        self.log(f"{model.name} width={cfg.width:g} on {self.device} x{procs.world}, {how}; "
                 f"{len(train_indices)} training images, {len(self.val_indices)} validation images, "
                 f"{self.sampler.steps_per_epoch} steps of {cfg.batch_size} per epoch "
                 f"({self.sampler.micro_per_step} x {self.micro_batch} per process), "
                 f"precision {'bf16' if self.dtype else 'fp32'}")

    def _device(self) -> torch.device:
        """The device: under torchrun on GPUs, this process's (LOCAL_RANK); else ``--device``."""
        if self.procs.distributed and self.cfg.device in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.procs.local_rank)
            device = torch.device("cuda", self.procs.local_rank)
        else:
            device = runtime.pick_device(self.cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes: autotune the convolutions once
        else:
            runtime.keep_freed_memory()  # no fresh pages for every step's activations
        return device

    def _loader(self, dataset: Dataset, batches: Any, collate_fn: Any) -> DataLoader:
        workers = self.cfg.workers
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator(),  # worker seeds drawn here, not from the global (dropout) RNG
        )

    def log(self, message: str) -> None:
        if self.procs.main and self.cfg.progress:
            tqdm.write(message, file=sys.stderr)

    # ---- checkpoints

    def _state(self) -> dict[str, Any]:
        """The checkpoint, collective: every process contributes its RNG state."""
        rngs = [rng_state()]
        if self.procs.distributed:
            rngs = [None] * self.procs.world
            torch_dist.all_gather_object(rngs, rng_state())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.start_step,
            "step": self.step,
            "partial": dict(self.partial),
            "rng": rngs,
            "world": self.procs.world,
            "recipe": self.recipe,
        }

    def _save_last(self) -> None:
        state = self._state()
        if self.procs.main:
            save_checkpoint(state, self.ckpt_dir / "last.pt")

    def _save_epoch(self, improved: bool) -> None:
        state = self._state()
        if not self.procs.main:
            return
        epoch_file = save_checkpoint(state, self.ckpt_dir / EPOCH_CHECKPOINT.format(self.epoch))
        for name in ["last.pt", "best.pt"] if improved else ["last.pt"]:
            atomic_write(self.ckpt_dir / name, lambda tmp: shutil.copyfile(epoch_file, tmp))
        if improved:
            export_safetensors(self.model, self.recipe, self.run_dir / "model.safetensors")
        epochs = sorted(self.ckpt_dir.glob(EPOCH_CHECKPOINT.replace("{:04d}", "*")))
        for old in epochs[:-self.cfg.keep_last] if self.cfg.keep_last else epochs:
            old.unlink()

    def _resume(self) -> dict[str, Any] | None:
        """Load ``last.pt``; returns this process's RNG state to restore last of all."""
        state = load_checkpoint(self.ckpt_dir / "last.pt", map_location=self.device)
        changed = [key for key in ARCH_KEYS if state["recipe"].get(key) != self.recipe[key]]
        if changed:
            raise ValueError(f"--resume: {self.run_dir} was trained with other {', '.join(changed)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.start_step, self.step = state["epoch"], state["step_in_epoch"], state["step"]
        if self.cfg.milestones:
            self.schedule.follow_milestones(self.epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule.lr
        self.partial = dict(state["partial"])
        if self.procs.main:
            self._truncate_metrics()
        if state["world"] != self.procs.world:
            self.log(f"resuming {state['world']} processes' run on {self.procs.world}: dropout RNG streams reseeded")
            torch.manual_seed(derived_seed(self.cfg.seed, 3, self.step, self.procs.rank))
            return None
        return state["rng"][self.procs.rank]

    def _truncate_metrics(self) -> None:
        """Drop the records logged after the checkpoint we resume from (they will be logged again)."""
        path = self.run_dir / "metrics.jsonl"

        def before_checkpoint(record: dict[str, Any]) -> bool:
            return record["step"] <= self.step if record["kind"] == "step" else record["epoch"] <= self.epoch

        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and before_checkpoint(json.loads(line))]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))

    def record(self, **values: Any) -> None:
        if self.procs.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(values) + "\n")

    # ---- steps

    def _input(self, batch: Batch, shifts: torch.Tensor) -> torch.Tensor:
        images = batch.images.to(self.device, non_blocking=True)
        if self.device.type == "cpu" and self.input_memory.numel() < images.numel():
            self.input_memory = torch.empty(images.numel())
        out = self.input_memory if self.device.type == "cpu" else None  # CUDA has its caching allocator
        x = to_input(images, self.pre, shifts.to(self.device, non_blocking=True), out)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x.contiguous()

    def _reduce(self, *values: float) -> list[float]:
        """Sums over the processes."""
        if not self.procs.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def _micro_step(self, batch: Batch, shifts: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed loss (detached)."""
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            if batch.images.shape[0] == 0:  # every file of this micro-batch unreadable: a zero-gradient pass
                x = torch.zeros(1, 3, self.cfg.crop, self.cfg.crop, device=self.device)
                with runtime.autocast(self.device, self.dtype):
                    loss = self.forward_model(x).float().sum() * 0.0
            else:
                x = self._input(batch, shifts)
                labels = batch.labels.to(self.device, non_blocking=True)
                with runtime.autocast(self.device, self.dtype):
                    loss = F.cross_entropy(self.forward_model(x).float(), labels, reduction="sum")
            (loss / self.local_batch).backward()
        return loss.detach()

    def train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when ``stop_after_steps`` ended the run."""
        cfg, sampler = self.cfg, self.sampler
        sampler.set_epoch(self.epoch, self.start_step)
        bar = tqdm(total=sampler.steps_per_epoch, initial=self.start_step, desc=f"epoch {self.epoch + 1}",
                   unit="step", disable=not (cfg.progress and self.procs.main), dynamic_ncols=True)
        for key in ("loss", "images", "seconds", "skipped"):
            self.partial.setdefault(key, 0.0)
        loss_sum = torch.zeros((), device=self.device)
        images = skipped = 0
        tic = time.perf_counter()
        for micro, (batch, shifts) in enumerate(self.loader):
            last = (micro + 1) % sampler.micro_per_step == 0
            loss_sum += self._micro_step(batch, shifts, sync=last)
            images += batch.images.shape[0]
            skipped += len(batch.skipped)
            if not last:
                continue
            loss_total, images_total, skipped_total = self._reduce(loss_sum.item(), images, skipped)
            loss = loss_total / max(images_total, 1)
            if not math.isfinite(loss):
                last_good = self.ckpt_dir / "last.pt"
                raise NonFiniteLossError(
                    f"loss is {loss} at epoch {self.epoch + 1} step {self.step + 1} (lr {self.schedule.lr:g}); "
                    f"stopped; last good checkpoint: {last_good if last_good.is_file() else 'none'}")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - tic
            self.step += 1
            self.start_step += 1
            for key, value in (("loss", loss_total), ("images", images_total), ("seconds", seconds),
                               ("skipped", skipped_total)):
                self.partial[key] += value
            rate = images_total / seconds
            self.record(kind="step", epoch=self.epoch + 1, step=self.step, loss=loss, lr=self.schedule.lr,
                        img_s=round(rate, 2))
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", lr=f"{self.schedule.lr:g}")
            bar.update()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save_last()
            if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                bar.close()
                return False
            loss_sum.zero_()
            images = skipped = 0
            tic = time.perf_counter()
        bar.close()
        return True

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Top-1 and top-5 accuracy (%) on the validation images, one central crop each."""
        self.model.eval()
        correct1 = correct5 = seen = 0
        for batch in self.val_loader:
            if batch.images.shape[0] == 0:
                continue
            x = self._input(batch, torch.zeros(batch.images.shape[0], 3))
            with runtime.autocast(self.device, self.dtype):
                logits = self.model(x).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            hits = top5 == batch.labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            seen += batch.images.shape[0]
        self.model.train()
        correct1, correct5, seen = self._reduce(correct1, correct5, seen)
        return 100.0 * correct1 / max(seen, 1), 100.0 * correct5 / max(seen, 1)

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    def run(self) -> dict[str, Any]:
        """Train until the epoch budget or the schedule's stop; returns the summary."""
        cfg = self.cfg
        start = time.perf_counter()
        if self.procs.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "recipe.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(self.recipe, indent=2) + "\n"))
        self.model.train()
        stopped = "epochs"
        while self.epoch < cfg.epochs:
            if not self.train_epoch():
                stopped = "stop_after_steps"
                break
            top1 = top5 = None
            if (self.epoch + 1) % cfg.val_every == 0 or self.epoch + 1 == cfg.epochs:
                top1, top5 = self.validate()
            lr = self.schedule.lr
            improved = self.schedule.update(self.epoch + 1, top1)
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule.lr
            partial = self.partial
            self.record(kind="epoch", epoch=self.epoch + 1, step=self.step,
                        train_loss=partial["loss"] / max(partial["images"], 1), val_top1=top1, val_top5=top5, lr=lr,
                        img_s=round(partial["images"] / max(partial["seconds"], 1e-9), 2),
                        peak_mem_mb=round(self._peak_memory_mb(), 1), seconds=round(partial["seconds"], 2),
                        skipped=int(partial["skipped"]))
            val = f"val top-1 {top1:.2f}% top-5 {top5:.2f}%" if top1 is not None else "not validated"
            self.log(f"epoch {self.epoch + 1}: train loss {partial['loss'] / max(partial['images'], 1):.4f}, {val}, "
                     f"lr {lr:g}{' -> ' + format(self.schedule.lr, 'g') if self.schedule.lr != lr else ''}, "
                     f"{int(partial['skipped'])} files skipped")
            self.epoch += 1
            self.start_step = 0
            self.partial = {}
            self._save_epoch(improved)
            if self.schedule.stopped:
                stopped = "plateau"
                break
        return {
            "best_val_top1": self.schedule.best if self.schedule.best > -math.inf else None,
            "epochs": self.epoch,
            "steps": self.step,
            "run_dir": str(self.run_dir),
            "seconds": round(time.perf_counter() - start, 2),
            "stopped": stopped,
            "lr": self.schedule.lr,
        }


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says, on this process or, under ``torchrun``, on all of them (Sec. 3.3).

    Returns a summary: ``best_val_top1``, ``epochs`` and ``steps`` done, ``run_dir``, ``seconds``,
    ``stopped`` (``epochs``, ``plateau`` or ``stop_after_steps``) and the final ``lr``.
    """
    procs = Processes.from_env()
    if procs.distributed and not torch_dist.is_initialized():
        cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(procs.local_rank)  # before NCCL starts, so each process binds its own GPU
        torch_dist.init_process_group("nccl" if cuda else "gloo")
        try:
            return Trainer(cfg, procs).run()
        finally:
            torch_dist.destroy_process_group()
    return Trainer(cfg, procs).run()


# ---- recipes and the command line ---------------------------------------------------------------


#: The shipped recipe files (package data).
RECIPES = resources.files("verydeep") / "recipes"


def recipe_names() -> list[str]:
    """The recipes shipped in ``verydeep/recipes`` (the paper's protocols)."""
    return sorted(p.name.removesuffix(".toml") for p in RECIPES.iterdir()
                  if p.name.endswith(".toml"))


def read_recipe(name_or_file: str | Path) -> dict[str, Any]:
    """The settings of a recipe: a shipped name (``a-paper``) or a TOML file of TrainConfig fields."""
    path = Path(name_or_file)
    if path.is_file():
        text = path.read_text()
    elif str(name_or_file) in recipe_names():
        path = Path(str(name_or_file) + ".toml")
        text = RECIPES.joinpath(path.name).read_text()
    else:
        shipped = ", ".join(recipe_names())
        raise FileNotFoundError(f"--recipe {name_or_file}: no such file or recipe (shipped: {shipped})")
    try:
        settings = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from error
    known = {f.name for f in fields(TrainConfig)}
    unknown = [key for key in settings if key not in known]
    if unknown:
        raise ValueError(f"{path}: unknown setting {unknown[0]!r} (settings are TrainConfig fields)")
    return settings


def make_config(settings: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from plain values (recipe file, recipe.json, command line), types normalised."""
    settings = dict(settings)
    if "scale" in settings:
        settings["scale"] = parse_scale(settings["scale"])
    if isinstance(settings.get("milestones"), str):
        text = settings["milestones"]
        try:
            settings["milestones"] = [int(v) for v in text.split(",") if v.strip()]
        except ValueError as error:
            raise ValueError(f"--milestones must be comma-separated epochs (e.g. 30,60); got {text!r}") from error
    if isinstance(settings.get("preprocess"), dict):
        settings["preprocess"] = Preprocess.from_dict(settings["preprocess"])
    elif isinstance(settings.get("preprocess"), (str, Path)):
        settings["preprocess"] = load_preprocess(settings["preprocess"])
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in settings.items() if key in known})


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train a VGG (Sec. 3.1): SGD, plateau schedule, checkpoints, DDP under torchrun",
        description="Train a VGG. Settings: the paper's defaults, then --recipe's, then these flags. "
                    "Under torchrun (RANK/WORLD_SIZE set) the global batch is split over the processes.",
    )
    add = p.add_argument
    add("--data", help="dataset folder with train/ and val/ (or test/) class folders")
    add("--out", help="run directory (checkpoints, metrics.jsonl, recipe.json, model.safetensors)")
    add("--recipe", help=f"a recipe name ({', '.join(recipe_names())}) or TOML file")
    add("--config", help="A, A-LRN, B, C, D, E (default A)")
    add("--scale", help="training scale S (256, 384) or jittered Smin:Smax (256:512)")
    add("--crop", type=int, help="crop size (224; 32 for CIFAR-10)")
    add("--width", type=float, help="width multiplier (1 = the paper's)")
    add("--batch-norm", action=argparse.BooleanOptionalAction, help="batch norm after each conv (not the paper's)")
    add("--dropout", type=float, help="dropout on FC6/FC7 (0.5)")
    add("--init", choices=PROTOCOLS, help="random init: paper (N(0, 0.01)), xavier/glorot, kaiming")
    add("--init-from", help="checkpoint or run dir: same architecture copies all weights, else the warm start")
    add("--alpha-std", type=float, help="std of the PCA colour shift's alphas (0.1; 0 = off)")
    add("--preprocess", help="preprocess.json with mean/std/eigen (default: beside --data, else ImageNet's)")
    add("--limit-train", type=int, help="use a class-balanced subset of this many training images")
    add("--limit-val", type=int, help="use a class-balanced subset of this many validation images")
    add("--lr", type=float, help="initial learning rate (1e-2)")
    add("--momentum", type=float, help="SGD momentum (0.9)")
    add("--weight-decay", type=float, help="L2 weight decay (5e-4)")
    add("--batch-size", type=int, help="global batch size over all processes (256)")
    add("--micro-batch", type=int, help="images per forward pass per process (gradient accumulation)")
    add("--epochs", type=int, help="epoch budget (74)")
    add("--patience", type=int, help="validations without improvement before lr /= 10 (2)")
    add("--max-drops", type=int, help="lr divisions before a plateau stops training (3)")
    add("--milestones", help="comma-separated epochs after which lr /= 10, instead of the plateau rule")
    add("--seed", type=int, help="seed of init, data order and augmentation (0)")
    add("--workers", type=int, help="data-loading processes per training process (4)")
    add("--device", help="auto, cpu, cuda, cuda:N")
    add("--precision", choices=("auto", "bf16", "fp32"), help="auto: bf16 only where it is fast")
    add("--channels-last", action=argparse.BooleanOptionalAction, help="channels_last memory format (on)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (off)")
    add("--val-every", type=int, help="validate every N epochs (1)")
    add("--checkpoint-every", type=int, help="also write checkpoints/last.pt every N steps (0: epoch ends only)")
    add("--keep-last", type=int, help="epoch checkpoints to keep (3)")
    add("--progress", action=argparse.BooleanOptionalAction, help="progress bars (on)")
    add("--resume", action=argparse.BooleanOptionalAction,
        help="continue the run in --out from checkpoints/last.pt (its recipe.json supplies the settings)")
    add("--stop-after-steps", type=int, help="leave after N steps without a final checkpoint (a simulated crash)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    given = {key: value for key, value in vars(args).items() if key not in ("command", "func")}
    settings: dict[str, Any] = {}
    if given.get("resume") and "out" in given and (Path(given["out"]) / "recipe.json").is_file():
        stored = json.loads((Path(given["out"]) / "recipe.json").read_text())
        once = ("resume", "stop_after_steps")  # belong to the invocation that wrote them
        settings.update({key: value for key, value in stored.items()
                         if key in {f.name for f in fields(TrainConfig)} and key not in once})
    if "recipe" in given:
        settings.update(read_recipe(given["recipe"]))
    settings.update(given)
    summary = train(make_config(settings))
    if Processes.from_env().main:
        print(json.dumps(summary))
