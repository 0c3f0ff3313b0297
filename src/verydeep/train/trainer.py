"""The training loop (Sec. 3.1, 3.3): mini-batch SGD on one process or many, exactly reproducible.

The paper's optimisation: SGD with momentum 0.9, batch 256, weight decay 5e-4, dropout 0.5 on
FC6/FC7, learning rate 1e-2 divided by 10 when the validation metric stops improving, at most 3
times, then stop. What is learnt (head, targets, loss, validation metric) is a
:class:`~verydeep.nn.tasks.Task`: classification by default.

:class:`Trainer` assembles the run from its parts, in the order its constructor shows, and then
holds only the loop: :mod:`.data` (the images), :mod:`.start` (the model's first weights),
:mod:`.memory_fit` (the micro-batch), :mod:`.checkpointing` (the run directory and record), :mod:`.step`
(forward, backward, update), :mod:`.validation` (an epoch's metrics), :mod:`.schedule` and :mod:`.metrics_log`.

Reproducibility is by construction, so that a resumed run and a run on N processes are the same
computation as one uninterrupted process: the images and draws of every step (augmentation and
dropout masks) are a function of ``(seed, epoch, index)``; a process takes its slice of each global
batch in micro-batches (:mod:`.step`); checkpoints hold the model, optimizer, schedule, position in
the epoch and every RNG state.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from verydeep.data import gpu as gpu_decode
from verydeep.data import load_preprocess
from verydeep.data.sampling import Stream, derived_seed
from verydeep.errors import UserError
from verydeep.io.checkpoint import model_from_recipe
from verydeep.io.rundir import RunDir
from verydeep.nn.model import VGG
from verydeep.nn.tasks import Classification, Task
from verydeep.runtime import sharding
from verydeep.runtime.device import pick_device, prepare, refuse_inference_mode
from verydeep.runtime.memory import keep_freed_memory
from verydeep.runtime.precision import autocast_dtype, own_modes
from verydeep.runtime.processes import Processes, loader_workers
from verydeep.runtime.progress import progress_bar
from verydeep.runtime.rng import rng_state, set_rng_state
from verydeep.runtime.sharding import process_group
from verydeep.train.checkpointing import Checkpoints, check_resumable, check_training_state, run_record
from verydeep.train.data import TrainingData
from verydeep.train.memory_fit import MemoryProbe, fit_micro_batch
from verydeep.train.metrics_log import MetricsLog, peak_memory_mb
from verydeep.train.recipe import (
    TrainConfig,
    as_flags_given,
    changed_settings,
    flag_of,
    record_run,
    started_with,
    stored_settings,
    stored_settings_file,
)
from verydeep.train.schedule import EpochTotals, Schedule
from verydeep.train.start import checked_settings, copied_tensors, freeze, initial_model, param_groups, start_record
from verydeep.train.step import StepFigures, Stepper, StepQueue, check_finite_weights, zero_momenta
from verydeep.train.validation import describe, score, validate


@dataclass
class TrainSummary:
    """How a run ended: its best validation ``metric``, epochs and steps done, why it stopped
    (``epochs``, ``plateau``, ``stop_patience`` or ``stop_after_steps``) and the final learning rate."""

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


class Trainer:
    """One training run of ``task``, on this process and its share of the global batches."""

    def __init__(self, cfg: TrainConfig, procs: Processes, task: Task | None = None,
                 given: Mapping[str, str] | Collection[str] | None = None) -> None:
        self.procs, self.task = procs, task or Classification()
        # the settings given (flags, recipe; from Python, those off their defaults), each named by its origin
        self.given = given = given_settings(cfg, given)
        refuse_inference_mode("training")
        self.cfg, self.published = checked_settings(cfg, given)
        self._place()  # a refusal from here on lets go of the run's lock, not left to a traceback's frame
        try:
            with own_modes():  # a caller's no_grad would leave the memory probe nothing to measure
                self._assemble(procs)
        except BaseException:
            self.checkpoints.release()
            raise

    def _assemble(self, procs: Processes) -> None:
        """The parts, in the order exact resume needs: the weights (read first, in ``__init__``) decide the net; its
        init draws first from the RNG seeded by cfg.seed; restoring needs model and optimizer and precedes wrapping
        (DDP broadcasts rank 0's weights as it is built); the checkpoint's RNG states are set last, so that nothing
        draws after them; the loaders start where the epoch stopped. Fitting the micro-batch draws nothing."""
        self.data = TrainingData(self.cfg, self.task, self.decode)
        self.record = run_record(self.cfg, self.task, self.pre, self.data)
        self._build()
        self._fit_micro_batch()
        rng = self._restore_or_seed()
        zero_momenta(self.optimizer)  # after fitting, which counts the momentum as still to come
        self.how += self.stepper.wrap(self.cfg.compile)
        if rng is not None:
            set_rng_state(rng)
        self.sampler, self.loader, self.val_loader = self.data.loaders(procs, self.micro_batch, self.pre,
                                                                       self.workers, self.device)
        refuse_idle_step_flags(self.cfg, self.sampler.steps_per_epoch, self.step, self.run_dir)
        self.checkpoints.clear(self.cfg)  # all checked: a refused run leaves an old one in --out as it was
        if not self.cfg.resume:
            self.metrics.open()
        self.log(describe_start(self))

    # ---- assembly

    def _place(self) -> None:
        """Batch sizes per process, run directory, device, precision and where JPEGs are decoded."""
        cfg, procs = self.cfg, self.procs
        self.local_batch = per_process_batch(cfg, procs.world)
        self.micro_batch = cfg.micro_batch or self.local_batch
        self.run_dir = Path(cfg.out)
        self.checkpoints = Checkpoints(self.run_dir, procs, cfg.keep_last)
        self.checkpoints.prepare(cfg)
        self.metrics = MetricsLog(self.run_dir, procs.main, cfg.tensorboard)
        self.device = self._device()
        self.dtype = sharding.agreed(autocast_dtype(self.device, cfg.precision))  # auto: the first process's
        self.decode = gpu_decode.resolve_decode(cfg.decode, self.device)
        self.workers = loader_workers(cfg.workers)
        self.pre = cfg.preprocess or load_preprocess(cfg.data)

    def _device(self) -> torch.device:
        """Under torchrun on GPUs, this process's (LOCAL_RANK); else ``--device``."""
        if self.procs.distributed and self.cfg.device in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.procs.local_rank)
            device = torch.device("cuda", self.procs.local_rank)
        else:
            device = pick_device(self.cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes: autotune the convolutions once
        else:
            keep_freed_memory()  # no fresh pages for every step's activations
        return device

    def _build(self) -> None:
        """Model (initialised from cfg.seed, or as the checkpoint will overwrite), optimizer, schedule."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if cfg.resume:
            model, self.how, start = model_from_recipe(self.record), "", stored_settings(self.run_dir).get("start")
        else:
            model, self.how, start = initial_model(cfg, self.record, self.published, self.warn, self.given)
        copied = copied_tensors(start, stored_settings_file(self.run_dir))
        if start is not None:
            self.record.update(start_record(cfg.init, start, copied, model))
        frozen = freeze(model, cfg.freeze, copied)
        if frozen:
            self.how += f"; {len(frozen)} tensors frozen (up to {cfg.freeze})"
        self.model: VGG = prepare(model, self.device, cfg.channels_last)
        groups = param_groups(self.model, copied, cfg.lr, cfg.lr_copied)
        # one fused kernel for the whole update instead of a loop over tensors: the same arithmetic, and on
        # a CPU several times faster for VGG's large FC weights (docs/benchmarks)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                         fused=True)
        self.schedule = Schedule(cfg.lr, cfg.patience, cfg.max_drops, cfg.milestones, cfg.stop_patience)
        self.epoch, self.step_in_epoch, self.step = 0, 0, 0
        self.totals = EpochTotals()
        self.memory = MemoryProbe(self.model, self.device, cfg.crop, cfg.channels_last, self.dtype)
        self.stepper = Stepper(self.model, self.optimizer, self.task, self.procs, self.device, self.dtype, self.pre,
                               cfg.crop, cfg.channels_last, self.local_batch, self.decode)
        self.steps = StepQueue(self.stepper)

    def _fit_micro_batch(self) -> None:
        """Without ``--micro-batch``, for a new run: the micro-batch whose training step fits the memory
        (:mod:`.memory_fit`). A resumed run takes the one its checkpoint was trained with (:meth:`_resume`)."""
        if self.cfg.micro_batch is not None or self.cfg.resume:
            return
        fitted = fit_micro_batch(self.memory, self.local_batch, self.micro_batch, self.procs, self.cfg.batch_size)
        if fitted < self.micro_batch:
            self.how += f"; micro-batch {fitted} fitted to the memory of {self.device}"
        self.micro_batch = fitted

    def _restore_or_seed(self) -> dict[str, Any] | None:
        """Resume from ``last.pt`` (returning this process's RNG state, to set last of all), or seed this
        process's global RNG for a new run (dropout draws nothing from it: each image's masks come from its
        own seed, :class:`~verydeep.data.sampling.Draws`; a task may)."""
        if not self.cfg.resume:
            torch.manual_seed(derived_seed(self.cfg.seed, Stream.PROCESS, self.procs.rank))
            return None
        rng = self._resume()
        self.how = f"resumed from {self.checkpoints.last} at epoch {self.epoch + 1} step {self.step_in_epoch}"
        return rng

    def _resume(self) -> dict[str, Any] | None:
        """Load ``last.pt``; returns this process's RNG state (None when the number of processes changed,
        and the global RNG streams are reseeded; dropout masks, drawn from each image's seed, are not
        affected)."""
        state = self.checkpoints.load_last(self.device)
        check_resumable(self.run_dir, state["recipe"], self.record)
        check_training_state(state, self.checkpoints.last, len(self.data.train_indices) // self.cfg.batch_size,
                             self.optimizer)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])  # a stop asked again under the schedule given now
        self._set_lr(self.schedule.lr)
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]
        self.totals = EpochTotals(**state["partial"])
        if self.cfg.micro_batch is None:  # the micro-batch it was trained with (fitted, or the whole batch)
            self.micro_batch = min(state.get("micro_batch", self.local_batch), self.local_batch)
        self.metrics.truncate(self.step, self.epoch, self.warn)
        self.metrics.open()
        self.checkpoints.export_best()
        if state["world"] != self.procs.world:
            self.log(f"resuming {state['world']} processes' run on {self.procs.world}: global RNG streams reseeded")
            torch.manual_seed(derived_seed(self.cfg.seed, Stream.PROCESS_RESHARDED, self.step, self.procs.rank))
            return None
        return state["rng"][self.procs.rank]

    def log(self, message: str, always: bool = False) -> None:
        """A line on stderr for the person watching (main process, with progress on unless ``always``)."""
        if self.procs.main and (self.cfg.progress or always):
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
        """The checkpoint, collective: every process contributes its RNG state. Weights that are not finite
        are never saved: the last good checkpoint stays the last one."""
        check_finite_weights(self.model, f"at epoch {self.epoch + 1} step {self.step} (lr {self.schedule.lr:g}); "
                                         f"stopped; last good checkpoint: {self.checkpoints.last_good()}")
        rngs = [rng_state()]
        if self.procs.distributed:
            rngs = [None] * self.procs.world
            torch_dist.all_gather_object(rngs, rng_state())
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "step": self.step, "partial": asdict(self.totals), "rng": rngs, "world": self.procs.world,
                "micro_batch": self.micro_batch, "recipe": self.record}

    # ---- the loop

    def finish_step(self, loss_sum: torch.Tensor, images: int, skipped: int) -> None:
        """Queue the update once a global batch's gradients are in, then record the step before it, whose
        figures are ready by now (:class:`.step.StepQueue`)."""
        where = partial(self._where, self.epoch + 1, self.step + 1, self.schedule.lr)
        self.step += 1
        self.step_in_epoch += 1
        self.record_step(self.steps.push(self.stepper.update(loss_sum, images, skipped, where, self.step,
                                                             self.schedule.lr)))

    def record_step(self, figures: StepFigures | None) -> None:
        """A step's figures into the epoch's totals and the step records (none: nothing to record). A step none of
        whose images could be read has no loss to record (its skipped files count in the epoch's)."""
        if figures is None:
            return
        self.totals.add(figures.loss_sum, figures.images, figures.seconds, figures.skipped)
        if figures.images:
            self.metrics.append(kind="step", epoch=self.epoch + 1, step=figures.step,
                                loss=figures.loss_sum / figures.images, lr=figures.lr,
                                img_s=round(figures.images / figures.seconds, 2))

    def _where(self, epoch: int, step: int, lr: float) -> str:
        return (f"at epoch {epoch} step {step} (lr {lr:g}: a smaller --lr may train); stopped; last good "
                f"checkpoint: {self.checkpoints.last_good()}")

    def train_epoch(self, stop_after_steps: int | None = None) -> bool:
        """Run the rest of the epoch; False when the run leaves after step ``stop_after_steps`` (or the flag's)."""
        stop = self.cfg.stop_after_steps if stop_after_steps is None else stop_after_steps
        sampler, stepper = self.sampler, self.stepper
        sampler.set_epoch(self.epoch, self.step_in_epoch)
        bar = progress_bar(sampler.steps_per_epoch, self.cfg.progress and self.procs.main,
                                   initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}", unit="step")
        self.record_step(self.steps.pop())  # one queued outside the epochs (the bench's) keeps its own seconds
        self.steps.start_clock()
        loss_sum = torch.zeros((), device=self.device)
        images = skipped = 0
        with bar:
            for micro, (batch, draws) in enumerate(stepper.batches(self.loader)):
                last = (micro + 1) % sampler.micro_per_step == 0
                loss_sum += stepper.micro_step(batch, draws, sync=last)
                images += batch.images.shape[0]
                skipped += len(batch.skipped)
                if not last:
                    continue
                self.finish_step(loss_sum, images, skipped)
                done = self.totals  # the steps recorded so far: all but the one just queued
                bar.set_postfix(loss=f"{done.mean_loss:.4f}", img_s=f"{done.images / max(done.seconds, 1e-9):.1f}",
                                lr=f"{self.schedule.lr:g}", refresh=False)
                bar.update()
                checkpoint = bool(self.cfg.checkpoint_every) and self.step % self.cfg.checkpoint_every == 0
                leave = stop is not None and self.step >= stop
                if checkpoint or leave:
                    self.record_step(self.steps.pop())  # a checkpoint holds only steps known to be finite
                if checkpoint:
                    self.checkpoints.save_last(self._state())
                if leave:
                    return False
                loss_sum = torch.zeros((), device=self.device)  # the queued update holds the last one
                images = skipped = 0
        self.record_step(self.steps.pop())
        return True

    def validate(self) -> dict[str, float]:
        """The task's validation metrics over the validation images (:func:`.validation.validate`)."""
        return validate(self.model, self.stepper, self.val_loader, self.task, self.device, self.dtype,
                        getattr(self.data.val_set, "root", self.cfg.data))

    def _end_epoch(self) -> None:
        """Validate when due, update the schedule, log the epoch and checkpoint it."""
        cfg, totals, task = self.cfg, self.totals, self.task
        if totals.skipped and not totals.images:
            raise UserError(f"{getattr(self.data.train_set, 'root', cfg.data)}: no training image of epoch "
                            f"{self.epoch + 1} could be read ({int(totals.skipped)} unreadable)")
        due = (self.epoch + 1) % cfg.val_every == 0 or self.epoch + 1 == cfg.epochs
        metrics = self.validate() if due else {}
        lr = self.schedule.lr
        improved = self.schedule.update(self.epoch + 1, score(task, metrics.get(task.metrics[0])))
        self._set_lr(self.schedule.lr)
        self.metrics.append(kind="epoch", epoch=self.epoch + 1, step=self.step, train_loss=totals.mean_loss,
                            **{f"val_{name}": metrics.get(name) for name in (*task.metrics, "images", "skipped")},
                            lr=lr, img_s=round(totals.images / max(totals.seconds, 1e-9), 2),
                            peak_mem_mb=round(peak_memory_mb(self.device), 1), seconds=round(totals.seconds, 2),
                            skipped=int(totals.skipped), micro_batch=self.micro_batch,
                            precision=str(self.dtype or torch.float32).removeprefix("torch."))  # as it ran
        new_lr = f" -> {self.schedule.lr:g}" if self.schedule.lr != lr else ""
        self.log(f"epoch {self.epoch + 1}: train loss {totals.mean_loss:.4f}, {describe(metrics, task)}, lr {lr:g}"
                 f"{new_lr}, {int(totals.skipped)} files skipped")
        self.epoch, self.step_in_epoch, self.totals = self.epoch + 1, 0, EpochTotals()
        self.checkpoints.save_epoch(self._state(), self.model, improved)

    def run(self) -> TrainSummary:
        """Train until the epoch budget or the schedule's stop; a resumed run that had already reached
        either says so and does nothing. However it ends, another training may then write the run."""
        try:
            with own_modes():  # whatever the caller's grad mode and autocast
                return self._train()
        finally:
            self.checkpoints.release()

    def _train(self) -> TrainSummary:
        start, finished = time.perf_counter(), self.schedule.stopped or self.epoch >= self.cfg.epochs
        if self.procs.main:  # a finished run's record changes only by the settings that end it
            record_run(self.run_dir, self.record, finished)
        if finished:  # the summary's lr: the one it ended with
            reason = "validation stopped improving" if self.schedule.stopped else f"--epochs is {self.cfg.epochs}"
            self.log(f"{self.run_dir}: the run has finished ({reason} after epoch {self.epoch}); nothing to do",
                     always=True)  # whatever --progress: it is why nothing happens
            return summary(self, self.schedule.stop_reason if self.schedule.stopped else "epochs", start)
        if self.cfg.resume and self.cfg.milestones:  # the milestones given now decide the lr from here on
            self._set_lr(self.schedule.follow_milestones(self.epoch))
        self.model.train()
        stopped = "epochs"
        try:
            while self.epoch < self.cfg.epochs:
                if not self.train_epoch():
                    stopped = "stop_after_steps"
                    break
                self._end_epoch()
                if self.schedule.stopped:
                    stopped = self.schedule.stop_reason
                    break
        finally:
            self.metrics.close()
        return summary(self, stopped, start)


def summary(trainer: Trainer, stopped: str, start: float) -> TrainSummary:
    """What a run that began at ``start`` (``time.perf_counter()``) and ended by ``stopped`` did."""
    best = score(trainer.task, trainer.schedule.best) if trainer.schedule.best > -math.inf else None
    return TrainSummary(metric=trainer.task.metrics[0], best=best, epochs=trainer.epoch, steps=trainer.step,
                        run_dir=str(trainer.run_dir), seconds=round(time.perf_counter() - start, 2),
                        stopped=stopped, lr=trainer.schedule.lr)


def given_settings(cfg: TrainConfig, given: Mapping[str, str] | Collection[str] | None) -> dict[str, str]:
    """The settings given, each mapped to where it came from (a flag, a recipe's key), as errors name it;
    given as bare names, or not at all (those that differ from their defaults), each is named as its flag."""
    if isinstance(given, Mapping):
        return dict(given)
    return {name: flag_of(name) for name in (changed_settings(cfg) if given is None else given)}


def describe_start(trainer: Trainer) -> str:
    """The line that says what a run is about to do: net, device, start, images, steps, precision, decoding."""
    data, sampler, cfg = trainer.data, trainer.sampler, trainer.cfg
    return (f"{trainer.model.name} width={cfg.width:g} on {trainer.device} x{trainer.procs.world}, {trainer.how}; "
            f"{len(data.train_indices)} training images, {len(data.val_indices)} validation images, "
            f"{sampler.steps_per_epoch} steps of {cfg.batch_size} per epoch ({sampler.micro_per_step} x "
            f"{trainer.micro_batch} per process), precision {'bf16' if trainer.dtype else 'fp32'}, decoding on the "
            f"{trainer.decode.upper()}")


def per_process_batch(cfg: TrainConfig, world: int) -> int:
    """Each of ``world`` processes' share of the global batch; a batch they cannot share evenly, or a micro-batch
    larger than the share, is a :class:`UserError`."""
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    local = cfg.batch_size // world
    if cfg.micro_batch is not None and cfg.micro_batch > local:
        raise UserError(f"--micro-batch {cfg.micro_batch} is larger than a process's share of --batch-size "
                        f"{cfg.batch_size} over {world} processes ({local})")
    return local


def refuse_idle_step_flags(cfg: TrainConfig, steps_per_epoch: int, done: int, run_dir: Path) -> None:
    """Raise :class:`UserError` when ``--stop-after-steps`` or a new ``--checkpoint-every`` (a resumed run's own,
    retyped or given again by torchrun's restart of the command, has acted before, and may have no step left)
    could not act in the steps from ``done`` (a resumed run's) to the last of ``--epochs``; a run with no step
    left has nothing for them to act on (:meth:`Trainer.run` says it has finished)."""
    last = cfg.epochs * steps_per_epoch
    if done >= last:
        return
    budget = f"--epochs {cfg.epochs} x {steps_per_epoch} steps = {last}"
    if cfg.stop_after_steps is not None and cfg.stop_after_steps <= done:
        raise UserError(f"--stop-after-steps {cfg.stop_after_steps}: the run in {run_dir} has done {done} steps "
                        "already; give a later step")
    if cfg.stop_after_steps is not None and cfg.stop_after_steps > last:
        raise UserError(f"--stop-after-steps {cfg.stop_after_steps} is beyond the run's last step ({budget}), "
                        "so it would never stop it")
    every = cfg.checkpoint_every
    new_every = not cfg.resume or stored_settings(run_dir).get("checkpoint_every") != every
    if every and new_every and (done // every + 1) * every > last:
        raise UserError(f"--checkpoint-every {every}: no step from {done + 1} to the last ({budget}) is a "
                        "multiple of it, so it would never write; lower it")


def train(cfg: TrainConfig, task: Task | None = None,
          given: Mapping[str, str] | Collection[str] | None = None) -> TrainSummary:
    """Train as ``cfg`` says (``task``: classification by default), on this process or, under
    ``torchrun``, on all of them (Sec. 3.3). ``given``: the settings the user gave (default: those that
    differ from their defaults, after the resumed run's and ``cfg.recipe``'s settings). When ``torchrun
    --max-restarts`` restarts the processes after one failed, they resume from the last checkpoint."""
    if given is None and (cfg.recipe or cfg.resume):  # from Python: the run and recipe as the command line has them
        cfg, given = as_flags_given(cfg)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    # torchrun restarted the processes after a failure: they resume the run they started, but an old one
    # that --overwrite was to replace, which a process may have failed before clearing, is replaced; an old
    # run of the same settings and images cannot be told from the new, and is the same computation (resume
    # is exact), so it is resumed
    if restarted and not cfg.resume and RunDir(cfg.out).last.is_file():
        resolved = checked_settings(cfg, given_settings(cfg, given))[0]  # as the run recorded them (weights', S)
        if not cfg.overwrite or started_with(resolved, cfg.out):
            cfg = replace(resolved, resume=True, overwrite=False)
    callers = rng_state()  # torch's, Python's and NumPy's global RNGs, which a run seeds or restores: put back
    try:
        with process_group(cfg.device) as procs:
            return Trainer(cfg, procs, task, given).run()
    finally:
        set_rng_state(callers)
