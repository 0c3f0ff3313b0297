"""Training (Sec. 3.1, 3.3): mini-batch SGD on one process or many, exactly reproducible.

The paper's optimisation: SGD with momentum 0.9, batch 256, weight decay 5e-4, dropout 0.5 on
FC6/FC7, learning rate 1e-2 divided by 10 when the validation metric stops improving, at most 3
times, then stop. What is learnt (head, targets, loss, validation metric) is a
:class:`~verydeep.tasks.Task`: classification by default. Each image's augmentation comes from
``verydeep.data`` (:mod:`verydeep.data.sampling` seeds it per image).

Reproducibility is by construction, so that a resumed run and a run on N processes are the same
computation as one uninterrupted process: the images and draws of every step (augmentation and
dropout masks) are a function of ``(seed, epoch, index)``; a process takes its slice of each global
batch in micro-batches, and every micro-batch loss is a sum divided by the global batch (times the
world size, which DDP's gradient averaging divides back), so the step equals one on the whole batch
(Sec. 3.3); checkpoints hold the model, optimizer, schedule, position in the epoch and every RNG state.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from verydeep import runtime
from verydeep.checkpoint import (
    atomic_write,
    export_safetensors,
    load_checkpoint,
    model_from_recipe,
    remove_temp_files,
    safetensors_metadata,
    save_checkpoint,
)
from verydeep.data import (
    Batch,
    CenterCropTransform,
    Preprocess,
    TrainTransform,
    balanced_subset,
    carve_validation,
    collate,
    load_preprocess,
    to_input,
)
from verydeep.data import gpu as gpu_decode
from verydeep.data.loaders import image_loader
from verydeep.data.sampling import Draws, GlobalBatchSampler, SeededSamples, Stream, collate_shifted, derived_seed
from verydeep.errors import MissingFileError, UserError
from verydeep.finetune import copy_matching, freeze, param_groups
from verydeep.init import REASONS as INIT_REASONS
from verydeep.init import warm_start
from verydeep.model import VGG
from verydeep.recipe import (
    RUN_RECORD,
    TrainConfig,
    add_flags,
    changed_settings,
    flag_name,
    make_config,
    recipe_names,
    settings_from_flags,
    stored_settings,
    write_run_record,
)
from verydeep.tasks import Classification, Task

#: Run-record keys that must agree for ``resume`` to continue a run.
ARCH_KEYS = ("config", "batch_norm", "width", "num_classes", "outputs", "crop", "task")

#: Epoch checkpoints are ``checkpoints/epoch-0007.pt``; the newest ``keep_last`` are kept.
EPOCH_CHECKPOINT = "epoch-{:04d}.pt"


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stopped before any update or checkpoint with it."""


# ---- the learning-rate schedule -------------------------------------------------------------


class Schedule:
    """Sec. 3.1: lr /= 10 when the validation score (higher is better) has not improved for ``patience``
    validations, at most ``max_drops`` times, then stop; or, with ``milestones``, lr /= 10 after each
    listed epoch. With ``stop_patience``, training also stops once the score has not improved for that
    many validations in a row, whatever the lr: the epoch budget becomes an upper bound."""

    def __init__(self, lr: float, patience: int = 2, max_drops: int = 3, milestones: list[int] | None = None,
                 stop_patience: int | None = None) -> None:
        self.base_lr = self.lr = lr
        self.patience = patience
        self.max_drops = max_drops
        self.milestones = sorted(milestones or [])
        self.stop_patience = stop_patience
        self.best = -math.inf
        self.bad = 0
        self.since_best = 0
        self.drops = 0
        self.stopped = False

    def update(self, epochs_done: int, score: float | None) -> bool:
        """Account for an epoch (``score`` None when not validated); True when the score improved."""
        improved = score is not None and score > self.best
        if improved:
            self.best, self.bad, self.since_best = score, 0, 0
        elif score is not None:
            self.since_best += 1
            self.stopped |= self.stop_patience is not None and self.since_best >= self.stop_patience
        if self.milestones:
            if epochs_done in self.milestones:
                self.lr /= 10
                self.drops += 1
        elif score is not None and not improved:
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
        return {"lr": self.lr, "best": self.best, "bad": self.bad, "since_best": self.since_best,
                "drops": self.drops, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.best, self.bad = state["lr"], state["best"], state["bad"]
        self.since_best = state.get("since_best", state["bad"])  # older checkpoints counted only ``bad``
        self.drops, self.stopped = state["drops"], state["stopped"]


# ---- what a run adds up and returns -------------------------------------------------------------


@dataclass
class EpochTotals:
    """Sums over the steps done so far in the current epoch (carried across a resume)."""

    loss: float = 0.0
    images: float = 0.0
    seconds: float = 0.0
    skipped: float = 0.0

    def add(self, loss: float, images: float, seconds: float, skipped: float) -> None:
        self.loss += loss
        self.images += images
        self.seconds += seconds
        self.skipped += skipped

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.images, 1)


@dataclass
class TrainSummary:
    """How a run ended: its best validation ``metric``, epochs and steps done, why it stopped
    (``epochs``, ``plateau`` or ``stop_after_steps``) and the final learning rate."""

    metric: str
    best: float | None
    epochs: int
    steps: int
    run_dir: str
    seconds: float
    stopped: str
    lr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def changed_architecture(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The :data:`ARCH_KEYS` in which two run records differ (records from before tasks existed were
    classification, with as many outputs as classes)."""

    def arch(record: dict[str, Any]) -> dict[str, Any]:
        defaults = {"task": Classification.name, "outputs": record.get("num_classes")}
        return {key: record.get(key, defaults.get(key)) for key in ARCH_KEYS}

    before, after = arch(old), arch(new)
    return [key for key in ARCH_KEYS if before[key] != after[key]]


def same_classes(source: dict[str, Any], classes: list[str]) -> bool:
    """Whether a net of recipe ``source`` predicts ``classes`` in this order: its named classes are
    these, or it names none (``0``, ``1``, ...) and has as many."""
    theirs = [str(c) for c in source.get("classes") or []]
    unnamed = theirs == [str(i) for i in range(len(theirs))]
    return theirs == list(classes) or (unnamed and len(theirs) == len(classes))


# ---- model ------------------------------------------------------------------------------------


#: The settings of the architecture that ``--weights`` decide unless ``--warm-start`` says otherwise.
FROM_WEIGHTS = ("config", "width", "batch_norm")


def from_weights(cfg: TrainConfig) -> tuple[str, ...]:
    """What ``--weights`` decide: the whole architecture, or with ``--warm-start`` (the net ``--config``
    names) its width and batch norm, which the copied layers' shapes fix."""
    return FROM_WEIGHTS[1:] if cfg.warm_start else FROM_WEIGHTS


def refuse_contradictions(cfg: TrainConfig, given: set[str], source: dict[str, Any]) -> None:
    """The weights decide the architecture (:func:`from_weights`): a setting given that says otherwise
    is a :class:`UserError` naming both, never dropped."""
    for name in from_weights(cfg):
        if name in given and getattr(cfg, name) != source[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {getattr(cfg, name)} contradicts --weights {cfg.weights} ({name} "
                            f"{source[name]}): the architecture comes from the weights; to copy net A's layers "
                            f"into another configuration give --warm-start (Sec. 3.1), else drop {flag}")


# ---- the trainer -------------------------------------------------------------------------------


def _relative(path: Path, root: Path) -> Path:
    """``path`` relative to ``root`` when it lies under it, else as it is."""
    return path.relative_to(root) if path.is_relative_to(root) else path


class Trainer:
    """One training run of ``task``, on this process and its share of the global batches."""

    def __init__(self, cfg: TrainConfig, procs: runtime.Processes, task: Task | None = None,
                 given: Collection[str] | None = None) -> None:
        cfg.check()
        self.cfg, self.procs, self.task = cfg, procs, task or Classification()
        # the settings the user gave (flags, recipe): those that contradict --weights are refused; from
        # Python, those that differ from their defaults
        self.given = set(given) if given is not None else changed_settings(cfg)
        # The stages run in this order because exact resume depends on it: the model's random init
        # draws from the global RNG seeded by cfg.seed, before anything else draws (weights to start
        # from are read first, since they decide the architecture); restoring needs
        # the model and optimizer and must precede wrapping, since DDP broadcasts rank 0's weights as
        # it is built; the checkpoint's RNG states are set after wrapping, last of all, so that nothing
        # draws after them; the loaders start at the restored position in the epoch. Fitting the
        # micro-batch to the memory draws nothing and leaves the model as it was.
        self._place()
        self._adopt_weights()
        self._open_data()
        self._build()
        self._fit_micro_batch()
        rng = self._restore_or_seed()
        self._wrap()
        if rng is not None:
            runtime.set_rng_state(rng)
        self._make_loaders()
        self.log(f"{self.model.name} width={self.cfg.width:g} on {self.device} x{procs.world}, {self.how}; "
                 f"{len(self.train_indices)} training images, {len(self.val_indices)} validation images, "
                 f"{self.sampler.steps_per_epoch} steps of {cfg.batch_size} per epoch "
                 f"({self.sampler.micro_per_step} x {self.micro_batch} per process), "
                 f"precision {'bf16' if self.dtype else 'fp32'}, decoding on the {self.decode.upper()}")

    # ---- set-up stages

    def _place(self) -> None:
        """Batch sizes per process, run directory, device, precision and where JPEGs are decoded."""
        cfg, procs = self.cfg, self.procs
        if cfg.batch_size % procs.world:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {procs.world} processes")
        self.local_batch = cfg.batch_size // procs.world
        self.micro_batch = min(cfg.micro_batch or self.local_batch, self.local_batch)
        self.run_dir = Path(cfg.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._check_run_dir()
        self.device = self._device()
        self.dtype = runtime.autocast_dtype(self.device, cfg.precision)
        self.decode = gpu_decode.resolve_decode(cfg.decode, self.device)
        self.workers = runtime.default_workers() if cfg.workers is None else cfg.workers

    def _check_run_dir(self) -> None:
        """``--out`` must be a folder; a run in it is continued only with ``--resume`` and replaced only
        with ``--overwrite``. Temporary files of writes cut short by a crash are removed."""
        cfg, run_dir, last = self.cfg, self.run_dir, self.ckpt_dir / "last.pt"
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {run_dir}: is a file, not a run directory")
        source = cfg.weights
        if source and not cfg.resume and Path(source).exists() and Path(source).resolve().is_relative_to(
                run_dir.resolve()):
            raise UserError(f"--weights {source} lies in --out {run_dir}, which a new run clears: give another --out")
        if cfg.resume and not last.is_file():
            raise MissingFileError(f"--resume: {last} does not exist")
        if not cfg.resume and last.is_file() and not cfg.overwrite:
            raise UserError(f"--out {run_dir} holds a run (checkpoints/last.pt): continue it with --resume, "
                            "or start it anew with --overwrite")
        if not self.procs.main:
            return
        # a new run: nothing of an old one (say, one that crashed before a checkpoint) mixes in; a folder
        # without our run record is not cleared unless --overwrite says so
        if not cfg.resume and (cfg.overwrite or (run_dir / RUN_RECORD).exists()):
            run_files = [run_dir / name for name in ("metrics.jsonl", RUN_RECORD, "model.safetensors", "curves.png")]
            for path in [*run_files, *self.ckpt_dir.glob("*.pt")]:
                path.unlink(missing_ok=True)
        for folder in (run_dir, self.ckpt_dir):
            remove_temp_files(folder)

    def _device(self) -> torch.device:
        """Under torchrun on GPUs, this process's (LOCAL_RANK); else ``--device``."""
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

    def _adopt_weights(self) -> None:
        """A new run from ``--weights`` takes their architecture and input convention; their tensors are
        copied when the model is built."""
        cfg, self.published = self.cfg, None
        if not cfg.weights or cfg.resume:
            return
        from verydeep.weights import load_published

        self.published = load_published(cfg.weights, cfg.weights_dir)
        source = self.published.recipe
        refuse_contradictions(cfg, self.given, source)
        convention = Preprocess.from_dict(source["preprocess"]) if source.get("preprocess") else None
        architecture = {name: source[name] for name in from_weights(cfg)}
        self.cfg = replace(cfg, **architecture, preprocess=cfg.preprocess or convention)

    def _open_data(self) -> None:
        """The training and validation splits, their subsets, and the run record."""
        cfg = self.cfg
        self.pre = cfg.preprocess or load_preprocess(cfg.data)
        train_transform, val_transform = TrainTransform(cfg.crop, tuple(cfg.scale)), CenterCropTransform(
            cfg.scale[0], cfg.crop)
        if self.decode == "gpu":
            train_transform, val_transform = gpu_decode.EncodedTransform(train_transform), gpu_decode.EncodedTransform(
                val_transform)
        self.train_set, self.val_set = self.task.open_splits(cfg.data, train_transform, val_transform)
        if self.val_set.classes != self.train_set.classes:
            raise UserError(f"{cfg.data}: the validation classes differ from the training classes")
        trainable = list(range(len(self.train_set)))
        if cfg.val_split is not None:
            trainable, self.val_indices = carve_validation(self.train_set.targets, cfg.val_split, cfg.seed)
            self.val_set = copy.copy(self.train_set)  # the same images, read as validation reads them
            self.val_set.transform = val_transform
        else:
            self.val_indices = balanced_subset(self.val_set.targets, cfg.limit_val)
        picked = balanced_subset([self.train_set.targets[i] for i in trainable], cfg.limit_train)
        self.train_indices = [trainable[i] for i in picked]
        if len(self.train_indices) < cfg.batch_size:
            raise UserError(f"{cfg.data}: {len(self.train_indices)} training images, fewer than --batch-size "
                            f"{cfg.batch_size}")
        classes = list(self.train_set.classes)
        self.record = {**cfg.to_dict(), "task": self.task.name, "num_classes": len(classes),
                       "outputs": self.task.outputs(len(classes)), "preprocess": self.pre.to_dict(),
                       "classes": classes, "class_names": list(self.train_set.class_names), **self.task.record(),
                       "init_reason": INIT_REASONS[cfg.init],
                       "training": {"folder": str(getattr(self.train_set, "root", "")),
                                    "images": len(self.train_indices)},
                       "validation": self._validation_record()}

    def _validation_record(self) -> dict[str, Any]:
        """Which images validation reads: their folder, count and a digest of their paths; with
        ``--val-split``, every held-out training image (relative to the training folder)."""
        root = Path(getattr(self.val_set, "root", "/"))
        paths = sorted(str(_relative(Path(self.val_set.samples[i][0]), root)) for i in self.val_indices)
        record = {"folder": str(root), "images": len(paths),
                  "sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
        if self.cfg.val_split is not None:
            record.update(held_out_of_training=True, paths=paths)
        return record

    def _build(self) -> None:
        """Model (initialised from cfg.seed, or as the checkpoint will overwrite), optimizer, schedule."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if cfg.resume:
            model, self.how = model_from_recipe(self.record), ""
            start = stored_settings(self.run_dir).get("start")
        elif self.published is not None and cfg.warm_start:
            model, self.how, start = self._warm_started()
        elif self.published is not None:
            model, self.how, start = self._from_published()
        else:
            model, self.how, start = model_from_recipe(self.record, init=cfg.init), f"{cfg.init} init", None
        if start is not None:
            self.record["start"] = start
        frozen = freeze(model, cfg.freeze)
        if frozen:
            self.how += f"; {len(frozen)} tensors frozen (up to {cfg.freeze})"
        self.model: VGG = runtime.prepare(model, self.device, cfg.channels_last)
        groups = param_groups(self.model, (start or {}).get("copied", []), cfg.lr, cfg.lr_copied)
        # one fused kernel for the whole update instead of a loop over tensors: the same arithmetic, and on
        # a CPU several times faster for VGG's large FC weights (docs/benchmarks)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                         fused=True)
        self.schedule = Schedule(cfg.lr, cfg.patience, cfg.max_drops, cfg.milestones, cfg.stop_patience)
        self.epoch, self.step_in_epoch, self.step = 0, 0, 0
        self.totals = EpochTotals()
        self.input_memory = torch.empty(0)  # the float input of every CPU batch (no fresh pages per step)

    def _fit_micro_batch(self) -> None:
        """Without ``--micro-batch``, for a new run: the micro-batch whose training step fits the memory, the
        GPU's on CUDA and on a CPU what the machine has available (:func:`runtime.fit_micro_batch`; the whole
        batch when it fits), the smallest over the processes, so that they step together. A resumed run
        takes the one its checkpoint was trained with (:meth:`_resume`)."""
        if self.cfg.micro_batch is not None or self.cfg.resume:
            return
        fitted = self._fitted_here()
        if self.procs.distributed:  # every process learns the smallest, a failure (0) included
            smallest = torch.tensor(fitted, device=self.device)
            torch_dist.all_reduce(smallest, op=torch_dist.ReduceOp.MIN)
            fitted = int(smallest)
        if fitted == 0:
            raise UserError(f"--batch-size {self.cfg.batch_size}: a training step of {runtime.PROBE_SIZES[0]} "
                            f"images does not fit the memory of {self.device} (of a process); give --micro-batch")
        if fitted < self.micro_batch:
            self.how += f"; micro-batch {fitted} fitted to the memory of {self.device}"
        self.micro_batch = fitted

    def _fitted_here(self) -> int:
        """This process's fitted micro-batch; 0 when not even the smallest probe fits."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        if self.device.type == "cuda":  # the probes' peak holds the gradients; the momentum comes at the first step
            probe, budget = self._peak_bytes, runtime.cuda_memory_budget(self.device, weights)
        else:  # the count holds neither gradients nor momentum
            probe, budget = self._activation_bytes, runtime.cpu_memory_budget(2 * weights)
            if budget is None:
                return self.micro_batch
        try:
            return runtime.fit_micro_batch(self.local_batch, probe, budget)
        except torch.OutOfMemoryError:
            return 0
        finally:
            if self.device.type == "cuda":  # the epochs' peak memory is the training's, not the probes'
                torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def _probing(self, images: int) -> Iterator[torch.Tensor]:
        """``images`` blank crops in the trainer's memory format, to run through the model in eval mode (no
        dropout draw, batch-norm statistics as they are) under autocast; train mode again after."""
        x = torch.zeros(images, 3, self.cfg.crop, self.cfg.crop, device=self.device)
        self.model.eval()
        try:
            with runtime.autocast(self.device, self.dtype):
                yield x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x
        finally:
            self.model.train()

    def _peak_bytes(self, images: int) -> int:
        """Peak CUDA memory of a forward and backward pass on ``images`` blank crops (:meth:`_probing`); the
        gradients are dropped after."""
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with self._probing(images) as x:
                self.model(x).float().sum().backward()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        finally:
            self.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    def _activation_bytes(self, images: int) -> int:
        """Memory beyond the weights that a training step on ``images`` crops holds at its peak, as a CPU
        measures nothing of it: what the forward pass (:meth:`_probing`) saves for the backward pass (each
        storage once, the weights not), and twice the largest of it for the gradients flowing back."""
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        saved: dict[int, int] = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), self._probing(images) as x:
            self.model(x)
        return sum(saved.values()) + 2 * max(saved.values(), default=0)

    def _from_published(self) -> tuple[VGG, str, dict[str, Any]]:
        """The new net with every tensor of ``--weights`` that fits copied; how; where it started."""
        published = self.published
        model = model_from_recipe(self.record, init=self.cfg.init)
        source = published.model.state_dict()
        if not published.has_fc_layers:  # a file without FC layers (Keras' notop kind): its conv layers only
            source = {name: value for name, value in source.items() if name.startswith("features.")}
        if not same_classes(published.recipe, self.record["classes"]):  # FC8's rows are other classes
            fc8 = f"{model.tap_names['fc8']}."
            source = {name: value for name, value in source.items() if not name.startswith(fc8)}
        copied, new = copy_matching(model, source)
        tap_of = {module: tap for tap, module in model.tap_names.items()}
        layers = sorted({tap_of.get(prefix, prefix) for prefix in (name.rsplit(".", 1)[0] for name in new)},
                        key=lambda tap: list(model.tap_names).index(tap) if tap in model.tap_names else 0)
        how = f"{published.format} weights {self.cfg.weights}: {len(copied)} tensors copied"
        if layers:
            self.warn(f"{self.cfg.weights}: not copied (not in the file, another shape, or other classes), "
                      f"{self.cfg.init} init: {', '.join(layers)}")
        return model, how, {"weights": str(self.cfg.weights), "format": published.format,
                            "source": published.source, "copied": copied}

    def _warm_started(self) -> tuple[VGG, str, dict[str, Any]]:
        """Sec. 3.1: the new net of ``--config``, net A's first four convs and FC6-8 copied from
        ``--weights``, the rest from the random init; how; where it started."""
        published = self.published
        model = model_from_recipe(self.record, init=self.cfg.init)
        layers = warm_start(model, published.model)
        copied = [f"{model.tap_names[layer]}.{kind}" for layer in layers for kind in ("weight", "bias")]
        how = f"warm start from {self.cfg.weights} ({', '.join(layers)}), the rest {self.cfg.init} init"
        return model, how, {"weights": str(self.cfg.weights), "format": published.format,
                            "source": published.source, "warm_start": layers, "copied": copied}

    def _restore_or_seed(self) -> dict[str, Any] | None:
        """Resume from ``last.pt`` (returning this process's RNG state, to set last of all), or seed this
        process's global RNG for a new run (dropout draws nothing from it: each image's masks come from its
        own seed, :class:`~verydeep.data.sampling.Draws`; a task may)."""
        if not self.cfg.resume:
            torch.manual_seed(derived_seed(self.cfg.seed, Stream.PROCESS, self.procs.rank))
            return None
        rng = self._resume()
        self.how = f"resumed from {self.ckpt_dir / 'last.pt'} at epoch {self.epoch + 1} step {self.step_in_epoch}"
        return rng

    def _wrap(self) -> None:
        """DDP over the processes, then ``torch.compile`` when asked."""
        self.forward_model: torch.nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.procs.distributed:
            index = self.device.index
            self.ddp = DistributedDataParallel(self.model, device_ids=[index] if index is not None else None)
            self.forward_model = self.ddp
        if self.cfg.compile:
            self.forward_model = torch.compile(self.forward_model)

    def _make_loaders(self) -> None:
        """The training loader (seeded samples in global batches) and the validation loader."""
        cfg, procs = self.cfg, self.procs
        collate_images = gpu_decode.collate_encoded if self.decode == "gpu" else collate
        self.sampler = GlobalBatchSampler(self.train_indices, cfg.batch_size, self.micro_batch, procs.rank,
                                          procs.world, cfg.seed)
        samples = SeededSamples(self.train_set, cfg.seed, self.pre, cfg.alpha_std)
        self.loader = self._loader(samples, self.sampler, collate_shifted(collate_images))
        val_mine = self.val_indices[procs.rank::procs.world]
        val_batches = [val_mine[i:i + self.micro_batch] for i in range(0, len(val_mine), self.micro_batch)]
        self.val_loader = self._loader(self.val_set, val_batches, collate_images)

    def _loader(self, dataset: Dataset, batches: Any, collate_fn: Any) -> DataLoader:
        return image_loader(dataset, batches, self.workers, collate_fn, self.device, persistent=True, prefetch=4)

    def log(self, message: str) -> None:
        """A line on stderr for the person watching (main process, with progress on)."""
        if self.procs.main and self.cfg.progress:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        """A warning line on stderr (main process, whatever the progress setting)."""
        if self.procs.main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _set_lr(self, lr: float) -> None:
        """The one place the optimizer's learning rate changes."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)

    # ---- checkpoints

    def _state(self) -> dict[str, Any]:
        """The checkpoint, collective: every process contributes its RNG state."""
        rngs = [runtime.rng_state()]
        if self.procs.distributed:
            rngs = [None] * self.procs.world
            torch_dist.all_gather_object(rngs, runtime.rng_state())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "partial": asdict(self.totals),
            "rng": rngs,
            "world": self.procs.world,
            "micro_batch": self.micro_batch,
            "recipe": self.record,
        }

    def _check_weights(self) -> None:
        """Refuse to save weights that are not finite: the last good checkpoint stays the last one."""
        bad = [name for name, p in self.model.named_parameters() if not p.detach().isfinite().all()]
        if bad:
            raise NonFiniteLossError(f"weights became non-finite ({', '.join(bad[:3])}) at epoch {self.epoch + 1} "
                                     f"step {self.step} (lr {self.schedule.lr:g}); stopped; last good checkpoint: "
                                     f"{self._last_good()}")

    def _last_good(self) -> str:
        last = self.ckpt_dir / "last.pt"
        return str(last) if last.is_file() else "none"

    def _save_last(self) -> None:
        self._check_weights()
        state = self._state()
        if self.procs.main:
            save_checkpoint(state, self.ckpt_dir / "last.pt")

    def _save_epoch(self, improved: bool) -> None:
        """The epoch's checkpoint, then the best weights and their export, then ``last.pt``: a crash
        between two writes leaves ``last.pt`` behind the others, and resuming from it redoes them."""
        self._check_weights()
        state = self._state()
        if not self.procs.main:
            return
        epoch_file = save_checkpoint(state, self.ckpt_dir / EPOCH_CHECKPOINT.format(self.epoch))
        if improved:
            atomic_write(self.ckpt_dir / "best.pt", lambda tmp: shutil.copyfile(epoch_file, tmp))
            export_safetensors(self.model, self.record, self.run_dir / "model.safetensors", self.epoch)
        atomic_write(self.ckpt_dir / "last.pt", lambda tmp: shutil.copyfile(epoch_file, tmp))
        epochs = sorted(self.ckpt_dir.glob(EPOCH_CHECKPOINT.replace("{:04d}", "*")))
        for old in epochs[:-self.cfg.keep_last] if self.cfg.keep_last else epochs:
            old.unlink()

    def _resume(self) -> dict[str, Any] | None:
        """Load ``last.pt``; returns this process's RNG state (None when the number of processes changed,
        and the global RNG streams are reseeded; dropout masks, drawn from each image's seed, are not
        affected)."""
        state = load_checkpoint(self.ckpt_dir / "last.pt", map_location=self.device)
        changed = changed_architecture(state["recipe"], self.record)
        if changed:
            raise UserError(f"--resume: {self.run_dir} was trained with other {', '.join(changed)}")
        self._check_unchanged(state["recipe"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]
        if self.cfg.milestones:
            self.schedule.follow_milestones(self.epoch)
            self._set_lr(self.schedule.lr)
        self.totals = EpochTotals(**state["partial"])
        if self.cfg.micro_batch is None:  # the micro-batch it was trained with (fitted, or the whole batch)
            self.micro_batch = min(state.get("micro_batch", self.local_batch), self.local_batch)
        if self.procs.main:
            self._truncate_metrics()
            self._export_best()
        if state["world"] != self.procs.world:
            self.log(f"resuming {state['world']} processes' run on {self.procs.world}: global RNG streams reseeded")
            torch.manual_seed(derived_seed(self.cfg.seed, Stream.PROCESS_RESHARDED, self.step, self.procs.rank))
            return None
        return state["rng"][self.procs.rank]

    def _check_unchanged(self, stored: dict[str, Any]) -> None:
        """A resumed run continues with the settings it was trained with; only those marked resumable
        (budget, schedule, running) may change, and any other that differs is refused, not ignored."""
        for f in fields(TrainConfig):
            if f.metadata["resumable"] or f.name not in stored or stored[f.name] == self.record[f.name]:
                continue
            raise UserError(f"{flag_name(f)} cannot change when resuming {self.run_dir} (trained with "
                            f"{stored[f.name]!r}, given {self.record[f.name]!r}); start a new run with --weights")

    def _export_best(self) -> None:
        """Re-export ``best.pt``'s weights when a crash left ``model.safetensors`` from another epoch."""
        best, exported = self.ckpt_dir / "best.pt", self.run_dir / "model.safetensors"
        if not best.is_file():
            return
        state = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
        if not exported.is_file() or safetensors_metadata(exported).get("epoch") != str(state["epoch"]):
            model = model_from_recipe(state["recipe"])
            model.load_state_dict(state["model"])
            export_safetensors(model, state["recipe"], exported, state["epoch"])

    def _truncate_metrics(self) -> None:
        """Drop the records logged after the checkpoint we resume from (they will be logged again), and a
        line a crash cut short (with a warning)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                self.warn(f"{path}:{number}: a damaged record (cut short by a crash?) was dropped")
                continue
            if record is None:
                continue
            before = record["step"] <= self.step if record["kind"] == "step" else record["epoch"] <= self.epoch
            if before:
                kept.append(line)
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))

    def record_metrics(self, **values: Any) -> None:
        """Append one record to ``metrics.jsonl`` (main process only)."""
        if self.procs.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(values) + "\n")

    # ---- steps

    def _on_device(self, loaded: Any, draws: Draws | None = None) -> tuple[Batch, Draws | None]:
        """A loader's batch as uint8 images (decoded on the device when JPEGs go to the GPU), with the
        draws of the images kept (the device decoder may drop a file the workers could not check)."""
        if self.decode != "gpu":
            return loaded, draws
        batch = gpu_decode.decode_batch(loaded, self.device)
        if draws is not None and len(batch.skipped) > len(loaded.skipped):
            dropped = set(batch.skipped)
            draws = draws.kept(torch.tensor([path not in dropped for path in loaded.paths], dtype=torch.bool))
        return batch, draws

    def _input(self, batch: Batch, shifts: torch.Tensor | None = None) -> torch.Tensor:
        """The network's float input: colour shift and normalisation (Sec. 3.1), in the memory format."""
        images = batch.images.to(self.device, non_blocking=True)
        if self.device.type == "cpu" and self.input_memory.numel() < images.numel():
            self.input_memory = torch.empty(images.numel())
        out = self.input_memory if self.device.type == "cpu" else None  # CUDA has its caching allocator
        shifts = None if shifts is None else shifts.to(self.device, non_blocking=True)
        x = to_input(images, self.pre, shifts, out)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x.contiguous()

    def _reduce(self, *values: float) -> list[float]:
        """Sums over the processes."""
        if not self.procs.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def _micro_step(self, batch: Batch, draws: Draws, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch, each image with its colour shift and dropout masks
        (:class:`~verydeep.data.sampling.Draws`); returns its summed loss (detached)."""
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            if batch.images.shape[0] == 0:  # every file of this micro-batch unreadable: a zero-gradient pass
                x = torch.zeros(1, 3, self.cfg.crop, self.cfg.crop, device=self.device)
                with runtime.autocast(self.device, self.dtype):
                    loss = self.forward_model(x).float().sum() * 0.0
            else:
                x, targets = self._input(batch, draws.shifts), self.task.targets(batch, self.device)
                seeds = draws.seeds.to(self.device, non_blocking=True)
                with runtime.autocast(self.device, self.dtype):
                    loss = self.task.loss(self.forward_model(x, seeds).float(), targets)
            (loss / self.local_batch).backward()
        return loss.detach()

    def _finish_step(self, loss_sum: torch.Tensor, images: int, skipped: int, tic: float) -> tuple[float, float]:
        """The optimizer step once a global batch's gradients are in; returns the batch's mean loss and the
        step's seconds since ``tic`` (when the step before it ended): its data loading and update included,
        and on CUDA the queued work that the loss's transfer to the host waits for."""
        loss_total, images_total, skipped_total = self._reduce(loss_sum.item(), images, skipped)
        loss = loss_total / max(images_total, 1)
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not math.isfinite(loss) or not torch.nn.utils.get_total_norm(gradients).isfinite():
            what = f"loss is {loss}" if not math.isfinite(loss) else "gradients are not finite"
            raise NonFiniteLossError(f"{what} at epoch {self.epoch + 1} step {self.step + 1} (lr "
                                     f"{self.schedule.lr:g}: a smaller --lr may train); stopped; last good "
                                     f"checkpoint: {self._last_good()}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = max(time.perf_counter() - tic, 1e-9)
        self.step += 1
        self.step_in_epoch += 1
        self.totals.add(loss_total, images_total, seconds, skipped_total)
        self.record_metrics(kind="step", epoch=self.epoch + 1, step=self.step, loss=loss, lr=self.schedule.lr,
                            img_s=round(images_total / seconds, 2))
        return loss, seconds

    def train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when ``stop_after_steps`` ended the run."""
        cfg, sampler = self.cfg, self.sampler
        sampler.set_epoch(self.epoch, self.step_in_epoch)
        bar = runtime.progress_bar(sampler.steps_per_epoch, cfg.progress and self.procs.main,
                                   initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}", unit="step")
        loss_sum = torch.zeros((), device=self.device)
        images = skipped = 0
        tic = time.perf_counter()
        with bar:
            for micro, (loaded, draws) in enumerate(self.loader):
                batch, draws = self._on_device(loaded, draws)
                last = (micro + 1) % sampler.micro_per_step == 0
                loss_sum += self._micro_step(batch, draws, sync=last)
                images += batch.images.shape[0]
                skipped += len(batch.skipped)
                if not last:
                    continue
                loss, seconds = self._finish_step(loss_sum, images, skipped, tic)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / seconds:.1f}", lr=f"{self.schedule.lr:g}",
                                refresh=False)
                bar.update()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._save_last()
                if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                    return False
                loss_sum.zero_()
                images = skipped = 0
                tic = time.perf_counter()
        return True

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The task's validation metrics over the validation images, one central crop each, with the
        ``images`` they were computed on and the ``skipped`` (unreadable) ones."""
        self.model.eval()
        sums = [0.0] * len(self.task.metrics)
        seen = skipped = 0
        for loaded in self.val_loader:
            batch, _ = self._on_device(loaded)
            skipped += len(batch.skipped)
            if batch.images.shape[0] == 0:
                continue
            with runtime.autocast(self.device, self.dtype):
                outputs = self.model(self._input(batch)).float()
            batch_sums = self.task.metric_sums(outputs, self.task.targets(batch, self.device))
            sums = [a + b for a, b in zip(sums, batch_sums, strict=True)]
            seen += batch.images.shape[0]
        self.model.train()
        *sums, seen, skipped = self._reduce(*sums, seen, skipped)
        if not seen:  # a metric over no image would read as a perfect (or the worst) score
            raise UserError(f"{getattr(self.val_set, 'root', self.cfg.data)}: no validation image could be read "
                            f"({int(skipped)} unreadable)")
        return {**self.task.summarise(sums, int(seen)), "images": int(seen), "skipped": int(skipped)}

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    def _end_epoch(self) -> None:
        """Validate when due, update the schedule, log the epoch and checkpoint it."""
        cfg, totals, task = self.cfg, self.totals, self.task
        if totals.skipped and not totals.images:
            raise UserError(f"{getattr(self.train_set, 'root', cfg.data)}: no training image of epoch "
                            f"{self.epoch + 1} could be read ({int(totals.skipped)} unreadable)")
        due = (self.epoch + 1) % cfg.val_every == 0 or self.epoch + 1 == cfg.epochs
        metrics = self.validate() if due else {}
        primary = metrics.get(task.metrics[0])
        lr = self.schedule.lr
        improved = self.schedule.update(self.epoch + 1, self._score(primary))
        self._set_lr(self.schedule.lr)
        self.record_metrics(kind="epoch", epoch=self.epoch + 1, step=self.step, train_loss=totals.mean_loss,
                            **{f"val_{name}": metrics.get(name) for name in (*task.metrics, "images", "skipped")},
                            lr=lr, img_s=round(totals.images / max(totals.seconds, 1e-9), 2),
                            peak_mem_mb=round(self._peak_memory_mb(), 1), seconds=round(totals.seconds, 2),
                            skipped=int(totals.skipped))
        val = self._describe_validation(metrics)
        new_lr = f" -> {self.schedule.lr:g}" if self.schedule.lr != lr else ""
        self.log(f"epoch {self.epoch + 1}: train loss {totals.mean_loss:.4f}, {val}, lr {lr:g}{new_lr}, "
                 f"{int(totals.skipped)} files skipped")
        self.epoch += 1
        self.step_in_epoch = 0
        self.totals = EpochTotals()
        self._save_epoch(improved)

    def _describe_validation(self, metrics: dict[str, float]) -> str:
        if not metrics:
            return "not validated"
        values = ", ".join(f"val {name} {metrics[name]:.4g}" for name in self.task.metrics)
        unreadable = f" ({metrics['skipped']} unreadable)" if metrics["skipped"] else ""
        return f"{values} on {metrics['images']} images{unreadable}"

    def _score(self, value: float | None) -> float | None:
        """The schedule's score (higher is better) of the task's first validation metric."""
        if value is None:
            return None
        return value if self.task.higher_is_better else -value

    def run(self) -> TrainSummary:
        """Train until the epoch budget or the schedule's stop; a resumed run that had already reached
        either says so and does nothing."""
        start = time.perf_counter()
        if self.schedule.stopped or self.epoch >= self.cfg.epochs:
            reason = "validation stopped improving" if self.schedule.stopped else f"--epochs is {self.cfg.epochs}"
            self.log(f"{self.run_dir}: the run has finished ({reason} after epoch {self.epoch}); nothing to do")
            return self._summary("plateau" if self.schedule.stopped else "epochs", start)
        if self.procs.main:
            write_run_record(self.run_dir, self.record)
        self.model.train()
        stopped = "epochs"
        while self.epoch < self.cfg.epochs:
            if not self.train_epoch():
                stopped = "stop_after_steps"
                break
            self._end_epoch()
            if self.schedule.stopped:
                stopped = "plateau"
                break
        return self._summary(stopped, start)

    def _summary(self, stopped: str, start: float) -> TrainSummary:
        best = self._score(self.schedule.best) if self.schedule.best > -math.inf else None
        return TrainSummary(metric=self.task.metrics[0], best=best, epochs=self.epoch, steps=self.step,
                            run_dir=str(self.run_dir), seconds=round(time.perf_counter() - start, 2),
                            stopped=stopped, lr=self.schedule.lr)


def train(cfg: TrainConfig, task: Task | None = None, given: Collection[str] | None = None) -> TrainSummary:
    """Train as ``cfg`` says (``task``: classification by default), on this process or, under
    ``torchrun``, on all of them (Sec. 3.3). ``given``: the settings the user gave (default: those that
    differ from their defaults). When ``torchrun --max-restarts`` restarts the processes after one
    failed, they resume from the last checkpoint."""
    procs = runtime.Processes.from_env()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if restarted and not cfg.resume and (Path(cfg.out) / "checkpoints" / "last.pt").is_file():
        cfg = replace(cfg, resume=True, overwrite=False)  # torchrun restarted the processes after a failure
    if not procs.distributed or torch_dist.is_initialized():
        return Trainer(cfg, procs, task, given).run()
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(procs.local_rank)  # before NCCL starts, so each process binds its own GPU
    torch_dist.init_process_group("nccl" if cuda else "gloo")
    try:
        return Trainer(cfg, procs, task, given).run()
    finally:
        torch_dist.destroy_process_group()


# ---- the command line ---------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train a VGG (Sec. 3.1): SGD, plateau schedule, checkpoints, DDP under torchrun",
        description="Train a VGG. Settings: the paper's defaults, then --recipe's (shipped: "
                    f"{', '.join(recipe_names())}), then these flags; with --resume the run's own first. "
                    "Under torchrun (RANK/WORLD_SIZE set) the global batch is split over the processes.",
    )
    add_flags(p)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    given = {key: value for key, value in vars(args).items() if key not in ("command", "func")}
    settings = settings_from_flags(given)
    summary = train(make_config(settings), given=set(settings))
    if runtime.Processes.from_env().main:
        print(json.dumps(summary.to_dict()))
