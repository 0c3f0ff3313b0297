"""A run's log: one JSON record a line in ``metrics.jsonl`` (each step, each epoch), and with
``--tensorboard`` the same figures as TensorBoard scalars in ``tensorboard/``, a view of ``metrics.jsonl``
written anew whenever logging opens; an epoch's peak memory."""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from verydeep.errors import UserError
from verydeep.io.atomic import atomic_write
from verydeep.io.rundir import RunDir

#: The scalars a step record and an epoch record give TensorBoard, under their tag's group.
STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "img_s": "train/images_per_second"}
EPOCH_SCALARS = {"train_loss": "epoch/train_loss", "img_s": "epoch/images_per_second", "seconds": "epoch/seconds",
                 "peak_mem_mb": "epoch/peak_memory_mb", "micro_batch": "epoch/micro_batch"}


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory so far: the device's allocations on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tensorboard_writer(log_dir: Path) -> Any:
    """TensorBoard's writer (``pip install 'verydeep[tensorboard]'``) into ``log_dir``, whose earlier event files
    are removed first (TensorBoard's files only): the records they held are written again from ``metrics.jsonl``.
    Purging by step could not do it: an epoch's record shares its step with the epoch's last step record, so a
    run resumed from that step logs the epoch again but not the step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'verydeep[tensorboard]'") from error
    for events in log_dir.glob("events.out.tfevents.*"):
        events.unlink()
    return SummaryWriter(log_dir=str(log_dir))


def is_record(record: Any) -> bool:
    """Whether ``record`` is one :class:`MetricsLog` writes: a step's or an epoch's, with whole step and epoch
    numbers."""
    return (isinstance(record, dict) and record.get("kind") in ("step", "epoch")
            and all(type(record.get(key)) is int for key in ("step", "epoch")))


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` (main process only), and to TensorBoard when asked."""

    def __init__(self, run_dir: Path, main: bool, tensorboard: bool = False) -> None:
        self.path, self.main, self.tensorboard = RunDir(run_dir).metrics, main, tensorboard
        self.writer: Any = None

    def open(self) -> None:
        """Start logging (a new run, or a resumed one after :meth:`truncate`): with ``--tensorboard`` its
        scalars are written anew from the records ``metrics.jsonl`` holds, a run's earlier epochs included."""
        if not (self.main and self.tensorboard):
            return
        self.writer = tensorboard_writer(RunDir(self.path.parent).tensorboard)
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                self._scalars(json.loads(line), flush=False)
            self.writer.flush()

    def append(self, **values: Any) -> None:
        if not self.main:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(values) + "\n")
        except OSError as error:  # a full disk, a folder made read-only: the checkpoints before it are intact
            raise UserError(f"{self.path}: cannot be written ({error.strerror or error}); the last good "
                            "checkpoint is intact: free space, then resume") from error
        if self.writer is not None:
            self._scalars(values)

    def _scalars(self, record: dict[str, Any], flush: bool = True) -> None:
        tags = STEP_SCALARS if record["kind"] == "step" else EPOCH_SCALARS
        named = {tag: record.get(key) for key, tag in tags.items()}
        if record["kind"] == "epoch":
            named |= {f"val/{key[4:]}": value for key, value in record.items() if key.startswith("val_")}
        for tag, value in named.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(tag, value, record["step"])
        if flush:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def truncate(self, step: int, epoch: int, warn: Callable[[str], None]) -> None:
        """Drop the records logged after step ``step`` of epoch ``epoch``, which a resumed run logs again,
        and a line a crash cut short (with a warning)."""
        if not self.main or not self.path.is_file():
            return
        kept = []
        for number, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8-sig")
                record = json.loads(line) if line.strip() else None
            except ValueError:  # not UTF-8, not JSON
                line, record = "", "damaged"
            if record is None:  # a blank line
                continue
            if not is_record(record):
                warn(f"{self.path}:{number}: a damaged record (cut short by a crash?) was dropped")
                continue
            if not (record["step"] > step if record["kind"] == "step" else record["epoch"] > epoch):
                kept.append(line)  # logged before the checkpoint; a later one is logged again
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))
