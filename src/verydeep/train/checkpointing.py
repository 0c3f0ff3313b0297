"""A run's directory, its record and its checkpoints: atomic writes, exact resume, nothing of an old run mixed in.

``checkpoints/last.pt`` is what ``--resume`` continues from; ``epoch-0007.pt`` (the newest
``--keep-last``), ``best.pt`` and its export ``model.safetensors`` follow each epoch. Every write is
atomic (:func:`verydeep.io.atomic.atomic_write`), so a crash leaves the last good state readable.
"""

from __future__ import annotations

import argparse
import math
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from verydeep.data import Preprocess
from verydeep.errors import MissingFileError, UserError
from verydeep.io.atomic import atomic_write, remove_temp_files
from verydeep.io.checkpoint import (
    export_safetensors,
    load_checkpoint,
    model_from_recipe,
    read_state,
    safetensors_metadata,
    save_checkpoint,
)
from verydeep.io.outputs import refuse_overwriting_inputs
from verydeep.io.rundir import EPOCH, RunDir
from verydeep.nn.init import REASONS as INIT_REASONS
from verydeep.nn.tasks import Classification, Task
from verydeep.runtime.limits import is_finite, is_whole
from verydeep.runtime.processes import Processes
from verydeep.runtime.rng import rng_state, set_rng_state
from verydeep.runtime.sharding import failing_together
from verydeep.train.data import TrainingData
from verydeep.train.recipe import TrainConfig, flag_name, unresumable
from verydeep.train.schedule import lr_after

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

#: Run-record keys that must agree for ``resume`` to continue a run.
ARCH_KEYS = ("config", "batch_norm", "width", "num_classes", "outputs", "crop", "task")



def run_record(cfg: TrainConfig, task: Task, pre: Preprocess, data: TrainingData) -> dict[str, Any]:
    """The run record (``recipe.json``): the settings, the task, the input convention and the images."""
    classes = data.classes
    return {**cfg.to_dict(), "data_resolved": str(Path(cfg.data).resolve()), "task": task.name,
            "num_classes": len(classes), "outputs": task.outputs(len(classes)), "preprocess": pre.to_dict(),
            **task.record(),
            "init_reason": INIT_REASONS[cfg.init], **data.record()}


def changed_architecture(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The :data:`ARCH_KEYS` in which two run records differ (records from before tasks existed were
    classification, with as many outputs as classes)."""

    def arch(record: dict[str, Any]) -> dict[str, Any]:
        defaults = {"task": Classification.name, "outputs": record.get("num_classes")}
        return {key: record.get(key, defaults.get(key)) for key in ARCH_KEYS}

    before, after = arch(old), arch(new)
    return [key for key in ARCH_KEYS if before[key] != after[key]]


def check_resumable(run_dir: Path, stored: dict[str, Any], record: dict[str, Any]) -> None:
    """A resumed run continues with the architecture and settings it was trained with; only those marked
    resumable (budget, schedule, running) may change, and any other that differs is refused, not ignored."""
    changed = changed_architecture(stored, record)
    if changed:
        raise UserError(f"--resume: {run_dir} was trained with other {', '.join(changed)}")
    if stored.get("start") != record.get("start"):  # it made the optimizer's groups, which the checkpoint holds
        run = RunDir(run_dir)
        raise UserError(f"--resume: {run.record} and {run.last} name other tensors copied from the weights (start): "
                        "one of them was edited or comes from another run; restore it")
    for f in fields(TrainConfig):  # before the images: a setting that chose them is named as the cause
        if f.metadata["resumable"] or f.name not in stored or stored[f.name] == record[f.name]:
            continue
        raise unresumable(flag_name(f), run_dir, stored[f.name], repr(record[f.name]))
    check_same_images(run_dir, stored, record)


def check_same_images(run_dir: Path, stored: dict[str, Any], record: dict[str, Any]) -> None:
    """The data may move (``--data`` is resumable), not change: the net's outputs are the stored classes, the
    run's place in its epoch counts the stored training images, and the best epoch was chosen on the stored
    validation images; an image renamed or moved to another class is another (records without them pass)."""
    data = record["data"]
    if stored.get("class_names", record["class_names"]) != record["class_names"]:
        raise UserError(f"--data {data}: its classes ({_shown(record['class_names'])}) are not those {run_dir} "
                        f"was trained on ({_shown(stored['class_names'])}); resume with the run's data, or start a "
                        "new run with --weights")
    before = stored.get("training", {}).get("images") if isinstance(stored.get("training"), dict) else None
    if before is not None and before != record["training"]["images"]:
        raise UserError(f"--data {data}: {record['training']['images']} training images, where {run_dir} was "
                        f"trained on {before} (its place in the epoch counts them); resume with the run's data, "
                        "or start a new run with --weights")
    for split, what in (("training", "trained"), ("validation", "validated")):
        then = stored.get(split, {}).get("sha256") if isinstance(stored.get(split), dict) else None
        if then is not None and then != record[split]["sha256"]:
            raise UserError(f"--data {data}: its {split} images (their names or classes) are not those "
                            f"{run_dir} {what} on; resume with the run's data, or start a new run with --weights")


def _shown(names: list[Any], first: int = 4) -> str:
    return ", ".join(map(str, names[:first])) + (", ..." if len(names) > first else "")


class Checkpoints:
    """The run directory ``run_dir`` and its ``checkpoints/``; only the main process writes."""

    def __init__(self, run_dir: Path, procs: Processes, keep_last: int) -> None:
        self.run_dir, self.procs, self.keep_last = run_dir, procs, keep_last
        self.paths = RunDir(run_dir)
        self.dir, self.last = self.paths.checkpoints, self.paths.last
        self.lock = RunLock(run_dir)

    def release(self) -> None:
        """Let another training write the run (the end of this one)."""
        self.lock.release()

    def hold(self) -> None:
        """Lock the run directory (:class:`RunLock`), once: a second training into it is refused on every
        process."""
        with failing_together():  # the main process alone writes, and may be refused
            if self.procs.main and not self.lock.held:
                self.lock.acquire()

    def prepare(self, cfg: TrainConfig) -> None:
        """``--out`` must be a folder; a run in it is continued only with ``--resume`` and replaced only
        with ``--overwrite`` (:meth:`clear`, once the rest is checked)."""
        run_dir, source = self.run_dir, cfg.weights
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {run_dir}: is a file, not a run directory")
        # whoever gave them (flags, a recipe, the stored run, a Python caller), checked as the CLI checks flags
        refuse_overwriting_inputs(argparse.Namespace(data=cfg.data, out=cfg.out, weights=cfg.weights,
                                                     weights_dir=cfg.weights_dir))
        if source and not cfg.resume and Path(source).exists() and Path(source).resolve().is_relative_to(
                run_dir.resolve()):
            raise UserError(f"--weights {source} lies in --out {run_dir}, which a new run clears: give another --out")
        if cfg.resume and not self.last.is_file():
            raise MissingFileError(f"--resume: {self.last} does not exist")
        if cfg.resume:  # locked before resuming writes a file of the run (its log cut back to the checkpoint)
            self.hold()
        if cfg.resume or cfg.overwrite:
            return
        if self.last.is_file():
            raise UserError(f"--out {run_dir} holds a run (checkpoints/last.pt): continue it with --resume, "
                            "or start it anew with --overwrite")
        kept = [path for path in (self.paths.best, self.paths.model, *sorted(self.dir.glob("*.pt"))) if path.is_file()]
        if kept:  # a run whose last.pt is gone: its other weights are still a run's, not to be cleared unasked
            raise UserError(f"--out {run_dir} holds a run's weights ({kept[0].relative_to(run_dir)}), though not "
                            "checkpoints/last.pt to resume from: start anew with --overwrite, or give another --out")
        if self.paths.metrics.is_file() and not self.paths.record.is_file():  # a log not of a run: not appended to
            raise UserError(f"--out {run_dir} holds {self.paths.metrics.name} but no run record: start anew with "
                            "--overwrite, or give another --out")

    def clear(self, cfg: TrainConfig) -> None:
        """For a new run, once every setting and the data have been checked (a run refused leaves the old one as
        it was), the files of an old run in ``--out`` removed: nothing of one (say, one that crashed before a
        checkpoint) mixes in; a folder without our run record is cleared only with ``--overwrite``. Temporary
        files of writes cut short by a crash are removed. First the run directory is locked (:meth:`hold`)."""
        self.hold()
        if not self.procs.main:
            return
        if not cfg.resume and (cfg.overwrite or self.paths.record.exists()):
            events = self.paths.tensorboard.glob("events.out.tfevents.*")  # TensorBoard's files only
            for path in [*self.paths.run_files, *self.dir.glob("*.pt"), *events]:
                path.unlink(missing_ok=True)
        for folder in (self.run_dir, self.dir):
            remove_temp_files(folder)

    def last_good(self) -> str:
        """The checkpoint a failed run can be resumed from, for error messages."""
        return str(self.last) if self.last.is_file() else "none"

    def load_last(self, device: torch.device) -> dict[str, Any]:
        return load_checkpoint(self.last, map_location=device)

    def save_last(self, state: dict[str, Any]) -> None:
        if self.procs.main:
            save_checkpoint(state, self.last)

    def save_epoch(self, state: dict[str, Any], model: torch.nn.Module, improved: bool) -> None:
        """The epoch's checkpoint, then the best weights and their export, then ``last.pt``: a crash
        between two writes leaves ``last.pt`` behind the others, and resuming from it redoes them."""
        if not self.procs.main:
            return
        epoch_file = save_checkpoint(state, self.paths.epoch(state["epoch"]))
        if improved:
            atomic_write(self.paths.best, lambda tmp: shutil.copyfile(epoch_file, tmp))
            export_safetensors(model, state["recipe"], self.paths.model, state["epoch"])
        atomic_write(self.last, lambda tmp: shutil.copyfile(epoch_file, tmp))
        epochs = sorted(self.dir.glob(EPOCH.replace("{:04d}", "*")))
        for old in epochs[:-self.keep_last] if self.keep_last else epochs:
            old.unlink()

    def export_best(self) -> None:
        """Re-export ``best.pt``'s weights when a crash left ``model.safetensors`` from another epoch."""
        best, exported = self.paths.best, self.paths.model
        if not self.procs.main or not best.is_file():
            return
        state = read_best(best)
        if not exported.is_file() or safetensors_metadata(exported).get("epoch") != str(state["epoch"]):
            model = model_from_recipe(state["recipe"])
            model.load_state_dict(state["model"])
            export_safetensors(model, state["recipe"], exported, state["epoch"])


def read_best(path: Path) -> dict[str, Any]:
    """``best.pt``'s state, read without unpickling code (its tensors mapped, not copied); a file that is not
    one of our epoch checkpoints is a one-line :class:`UserError` naming it."""
    remedy = "; restore it, or remove it to go on without the best epoch's weights"
    state = read_state(path, mmap=True, hint=remedy)
    if not isinstance(state, dict) or not {"model", "recipe", "epoch"} <= state.keys():
        raise UserError(f"{path}: not a verydeep epoch checkpoint (no 'model', 'recipe' and 'epoch' entries){remedy}")
    return state


class RunLock:
    """The run directory's ``.lock``, held while one training writes the run: a second training into the same
    ``--out`` (or a second ``--resume``) is refused instead of interleaving its checkpoints and log with the
    first's. An advisory lock of the operating system, released when the process ends however it ends."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir, self.file = Path(run_dir), None

    def acquire(self) -> None:
        """Hold the lock; a :class:`UserError` when another process holds it. A bad ``--out`` (none, a file) is
        left to the run's own checks."""
        if fcntl is None or not str(self.run_dir) or (self.run_dir.exists() and not self.run_dir.is_dir()):
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / ".lock", "a")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()
            raise UserError(f"--out {self.run_dir}: another training is writing this run now; wait for it to "
                            "end, or give another --out") from None

    @property
    def held(self) -> bool:
        return self.file is not None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


#: The optimizer's settings per group that the run's recipe decides (``lr`` follows the schedule).
GROUP_SETTINGS = ("momentum", "weight_decay", "lr_ratio", "dampening", "nesterov", "maximize")


def check_training_state(state: dict[str, Any], path: Path, steps_per_epoch: int,
                         optimizer: torch.optim.Optimizer) -> None:
    """The numbers of ``last.pt`` that place and steer a resumed run, each of its kind and in range and agreeing
    with the run: its place (``epoch``, ``step``, ``step_in_epoch`` of ``steps_per_epoch``), ``micro_batch``, the
    processes' RNG states, the epoch's sums so far, the schedule's state (its lr the run's ``--lr`` divided by 10
    once for each drop) and the optimizer's settings (those of ``optimizer``, built from the run's recipe). Any
    other is a :class:`UserError` naming the file and the entry: edited, or of another run."""
    def refuse(entry: str, value: Any, wanted: str) -> None:
        raise UserError(f"{path}: {entry} is {str(value)[:80]}, where the run needs {wanted}: the checkpoint was "
                        "edited or comes from another run; restore the run's own")

    for key, least in (("epoch", 0), ("step", 0), ("step_in_epoch", 0), ("micro_batch", 1), ("world", 1)):
        if (key in state or key != "micro_batch") and not (is_whole(state.get(key)) and state[key] >= least):
            refuse(key, state.get(key), f"a whole number of at least {least}")  # micro_batch: older runs lack it
    place = state["epoch"] * steps_per_epoch + state["step_in_epoch"]
    if state["step_in_epoch"] > steps_per_epoch or state["step"] != place:
        refuse("its place (epoch, step, step_in_epoch)", (state["epoch"], state["step"], state["step_in_epoch"]),
               f"step = epoch x {steps_per_epoch} steps an epoch + step_in_epoch <= {steps_per_epoch}")
    if not (isinstance(state.get("rng"), list) and len(state["rng"]) == state["world"]):
        refuse("rng", type(state.get("rng")).__name__, f"one RNG state for each of its {state['world']} processes")
    unsettable = next((i for i, saved in enumerate(state["rng"]) if not _settable(saved)), None)
    if unsettable is not None:
        refuse(f"process {unsettable}'s RNG state", "damaged", "torch's, Python's and NumPy's as they were saved")
    partial = state.get("partial")
    if not (isinstance(partial, dict) and set(partial) == set(PARTIAL) and all(is_finite(partial[k]) for k in PARTIAL)
            and min(partial[k] for k in PARTIAL[1:]) >= 0):
        refuse("partial", partial, f"the epoch's sums so far ({', '.join(PARTIAL)}), finite, the counts not negative")
    _check_schedule_state(state.get("schedule"), optimizer.defaults["lr"], state["epoch"], refuse)
    stored = state["optimizer"].get("param_groups") if isinstance(state.get("optimizer"), dict) else None
    if not isinstance(stored, list) or len(stored) != len(optimizer.param_groups):
        refuse("optimizer param_groups", stored, f"{len(optimizer.param_groups)} parameter groups")
    for i, (theirs, ours) in enumerate(zip(stored, optimizer.param_groups, strict=True)):
        for key in GROUP_SETTINGS:
            if key in ours and (not isinstance(theirs, dict) or theirs.get(key) != ours[key]):
                refuse(f"optimizer group {i}'s {key}", theirs.get(key) if isinstance(theirs, dict) else theirs,
                       f"{ours[key]} (recipe.json)")


def _settable(saved: Any) -> bool:
    """Whether ``saved`` is a process's RNG states as :func:`~verydeep.runtime.rng.rng_state` keeps them: set, and
    this process's own put back."""
    own = rng_state()
    try:
        set_rng_state(saved)
        return True
    except (TypeError, KeyError, ValueError, RuntimeError, IndexError, AttributeError, ArithmeticError):
        return False
    finally:
        set_rng_state(own)


#: The sums of an epoch's steps a checkpoint carries (:class:`~verydeep.train.schedule.EpochTotals`).
PARTIAL = ("loss", "images", "seconds", "skipped")


def _check_schedule_state(schedule: Any, lr: float, epochs: int, refuse: Any) -> None:
    """The schedule's state: counts whole and not negative (``drops`` at most one an epoch of the ``epochs`` done),
    ``stopped`` a switch, ``best`` a score (not NaN, -inf before any validation), and ``lr`` the run's ``lr``
    divided by 10 once for each of its ``drops``."""
    if not isinstance(schedule, dict):
        refuse("schedule", schedule, "the schedule's state")
    for key in ("bad", "drops", "since_best"):
        if (key in schedule or key != "since_best") and not (is_whole(schedule.get(key)) and schedule[key] >= 0):
            refuse(f"schedule {key}", schedule.get(key), "a whole number of at least 0")  # older runs: no since_best
    if schedule["drops"] > epochs:
        refuse("schedule drops", schedule["drops"], f"at most one an epoch, of the {epochs} done")
    if not isinstance(schedule.get("stopped"), bool):
        refuse("schedule stopped", schedule.get("stopped"), "true or false")
    best = schedule.get("best")
    if not (is_finite(best) or best == -math.inf):
        refuse("schedule best", best, "a score, or -inf before any validation")
    if schedule.get("lr") != lr_after(lr, schedule["drops"]):
        refuse("schedule lr", schedule.get("lr"), f"--lr {lr:g} divided by 10 for each of its {schedule['drops']} "
               "drops")
