"""Every path of a training run's directory, named once (Sec. 3.1's training leaves these behind):

    RUN/recipe.json            the run record: settings, task, input convention, images
    RUN/metrics.jsonl          one JSON line a step and an epoch
    RUN/model.safetensors      the best epoch's weights, the recipe in the metadata
    RUN/curves.png             the learning curves
    RUN/checkpoints/last.pt    the newest state, for exact resume
    RUN/checkpoints/best.pt    the best epoch's state
    RUN/checkpoints/epoch-0007.pt  each epoch's state (the newest few kept)
    RUN/tensorboard/           the metrics as TensorBoard scalars (train --tensorboard)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD = "recipe.json"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LAST = "last.pt"
BEST = "best.pt"
EPOCH = "epoch-{:04d}.pt"


@dataclass(frozen=True, init=False)
class RunDir:
    """The paths of the run directory ``root``."""

    root: Path
    record: Path
    metrics: Path
    model: Path
    curves: Path
    checkpoints: Path
    tensorboard: Path
    last: Path
    best: Path

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        paths = {"root": root, "record": root / RECORD, "metrics": root / METRICS, "model": root / MODEL,
                 "curves": root / CURVES, "checkpoints": root / CHECKPOINTS, "tensorboard": root / TENSORBOARD,
                 "last": root / CHECKPOINTS / LAST,
                 "best": root / CHECKPOINTS / BEST}
        for name, path in paths.items():
            object.__setattr__(self, name, path)

    def epoch(self, epoch: int) -> Path:
        """The checkpoint of the end of ``epoch``."""
        return self.checkpoints / EPOCH.format(epoch)

    @property
    def chosen_checkpoint(self) -> Path | None:
        """The checkpoint a command reads from the run: the best (by validation), else the last; None if neither."""
        return next((file for file in (self.best, self.last) if file.is_file()), None)

    @property
    def own_folders(self) -> tuple[Path, ...]:
        """The folders that hold the run's own files: the run directory itself and those it makes."""
        return self.root, self.checkpoints, self.tensorboard

    @property
    def run_files(self) -> tuple[Path, ...]:
        """The files of a run besides its checkpoints, cleared when a new run starts in the folder."""
        return self.metrics, self.record, self.model, self.curves


def run_data_folder(stored: dict[str, Any]) -> str:
    """A resumed run's data folder: the path it had when the run was recorded (a relative ``--data`` resolved
    then, so a resume from another working directory reads the same images), else ``--data`` as given then."""
    resolved = stored.get("data_resolved")
    return resolved if isinstance(resolved, str) and Path(resolved).is_dir() else stored["data"]
