"""Training (Sec. 3.1, 3.3): :func:`train` runs a :class:`Trainer`, assembled from the parts in this package.

    data.py          the training and validation images and their loaders
    start.py         the model's first weights: random init, published weights, net A's (warm start)
    memory_fit.py    the micro-batch whose step fits the memory
    checkpointing.py the run directory and record, atomic checkpoints, exact resume
    step.py          forward, backward and update of one global batch
    validation.py    the validation metrics of an epoch, which decide the schedule
    schedule.py      the learning-rate schedule and an epoch's sums
    metrics_log.py   metrics.jsonl, and TensorBoard with --tensorboard
    recipe.py        TrainConfig (every option, its flag and check), recipes/, the run record
    trainer.py       the assembly and the loop
    command.py       ``verydeep train``
"""

from verydeep.train.command import add_cli, run_cli
from verydeep.train.recipe import TrainConfig
from verydeep.train.schedule import Schedule
from verydeep.train.step import NonFiniteLossError
from verydeep.train.trainer import Trainer, TrainSummary, train

__all__ = ["NonFiniteLossError", "Schedule", "TrainConfig", "TrainSummary", "Trainer", "add_cli", "run_cli", "train"]
