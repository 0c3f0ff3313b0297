"""A task plugs into the trainer without touching its loop: a toy regression trained, resumed exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny, weights

from verydeep.data import Batch
from verydeep.errors import UserError
from verydeep.io.checkpoint import load_checkpoint
from verydeep.nn.tasks import Task
from verydeep.train import train


class Brightness(Task):
    """Regress an image's mean brightness (0..1) from its pixels: one output, a Euclidean loss, lower
    validation error is better."""

    name = "brightness"
    metrics = ("abs_error",)
    higher_is_better = False

    def outputs(self, num_classes: int) -> int:
        return 1

    def targets(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return batch.images.float().mean(dim=(1, 2, 3)).div(255).to(device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs[:, 0], targets, reduction="sum")

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        return [float((outputs[:, 0] - targets).abs().sum())]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_regression_task_trains_through_the_same_loop(data, tmp_path):
    summary = train(tiny(data, tmp_path, epochs=4, lr=0.01, dropout=0.0, batch_norm=True), task=Brightness())
    epochs = [r for r in records(tmp_path) if r["kind"] == "epoch"]
    errors = [r["val_abs_error"] for r in epochs]
    assert summary.metric == "abs_error" and summary.best == pytest.approx(min(errors))
    assert "val_top1" not in epochs[0] and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert state["recipe"]["task"] == "brightness" and state["recipe"]["outputs"] == 1
    assert state["model"]["classifier.6.weight"].shape[0] == 1  # FC8 regresses one number
    assert state["schedule"]["best"] == pytest.approx(-min(errors))  # the schedule's score: higher is better


def test_the_regression_task_resumes_bitwise(data, tmp_path):
    options = dict(epochs=2, checkpoint_every=3)
    train(tiny(data, tmp_path / "straight", **options), task=Brightness())
    crashed = train(tiny(data, tmp_path / "resumed", stop_after_steps=5, **options), task=Brightness())
    assert crashed.stopped == "stop_after_steps"
    assert train(tiny(data, tmp_path / "resumed", resume=True, **options), task=Brightness()).steps == 8
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(value, resumed[key]) for key, value in straight.items())
    def step_losses(run) -> list[float]:
        return [r["loss"] for r in records(run) if r["kind"] == "step"]

    assert step_losses(tmp_path / "resumed") == step_losses(tmp_path / "straight")


def test_resuming_with_another_task_is_refused(data, tmp_path):
    train(tiny(data, tmp_path, stop_after_steps=2, checkpoint_every=1), task=Brightness())
    with pytest.raises(UserError, match="task"):
        train(tiny(data, tmp_path, resume=True))
