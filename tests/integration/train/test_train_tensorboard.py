"""``train --tensorboard``: the run's metrics as TensorBoard scalars, the same figures as metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from conftest import tiny

from verydeep.train import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="train --tensorboard needs the tensorboard extra")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged_epoch(run_dir):
    """A log of one epoch of two steps, written and closed (TensorBoard too)."""
    from verydeep.train.metrics_log import MetricsLog

    log = MetricsLog(run_dir, main=True, tensorboard=True)
    log.open()
    for step in (1, 2):
        log.append(kind="step", epoch=1, step=step, loss=2.0 / step, lr=0.1, img_s=10.0)
    log.append(kind="epoch", epoch=1, step=2, train_loss=1.5, val_top1=0.40)
    log.close()
    return log


def test_tensorboard_holds_the_metrics_of_every_step_and_epoch(data, tmp_path):
    train(tiny(data, tmp_path, epochs=2, tensorboard=True))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    logged = scalars(tmp_path)
    assert logged["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert logged["train/lr"] == [(r["step"], pytest.approx(r["lr"])) for r in steps]
    assert logged["val/top1"] == [(r["step"], pytest.approx(r["val_top1"])) for r in epochs]
    assert [value for _, value in logged["epoch/micro_batch"]] == [16, 16]
    assert {"train/images_per_second", "epoch/train_loss", "val/top5"} <= set(logged)


def test_a_resumed_run_logs_its_steps_once(data, tmp_path):
    """A crash after step 5 and a resume: TensorBoard, like metrics.jsonl, holds each step once."""
    train(tiny(data, tmp_path, epochs=2, tensorboard=True, stop_after_steps=5, checkpoint_every=3))
    train(tiny(data, tmp_path, epochs=2, tensorboard=True, resume=True))
    steps = [step for step, _ in scalars(tmp_path)["train/loss"]]
    assert steps == list(range(1, 9))


def test_a_new_run_in_the_folder_of_an_old_one_logs_only_its_own_steps(data, tmp_path):
    train(tiny(data, tmp_path, epochs=1, tensorboard=True, lr=0.05))
    (tmp_path / "tensorboard" / "notes.txt").write_text("mine")
    train(tiny(data, tmp_path, epochs=1, tensorboard=True, lr=0.02, overwrite=True))
    assert [value for _, value in scalars(tmp_path)["train/lr"]] == pytest.approx([0.02] * 4)
    assert (tmp_path / "tensorboard" / "notes.txt").read_text() == "mine"  # not TensorBoard's: left


def test_without_the_flag_nothing_is_written(data, tmp_path):
    train(tiny(data, tmp_path, epochs=1))
    assert not (tmp_path / "tensorboard").exists()


def test_an_epoch_logged_again_after_a_resume_at_its_last_step_is_shown_once(tmp_path):
    """A crash after an epoch's record but before its checkpoint, resumed from a checkpoint at the epoch's last
    step: the epoch is logged again at the step its first record had (the step itself is not logged again)."""
    log = logged_epoch(tmp_path)
    log.truncate(step=2, epoch=0, warn=print)  # the checkpoint: step 2, epoch 1 not finished
    log.open()
    log.append(kind="epoch", epoch=1, step=2, train_loss=1.5, val_top1=0.40)
    log.close()
    logged = scalars(tmp_path)
    assert logged["val/top1"] == [(2, pytest.approx(0.40))]
    assert [step for step, _ in logged["train/loss"]] == [1, 2]


def test_tensorboard_turned_on_at_a_resume_shows_the_whole_run(data, tmp_path):
    train(tiny(data, tmp_path, epochs=2, stop_after_steps=5, checkpoint_every=3))
    train(tiny(data, tmp_path, epochs=2, tensorboard=True, resume=True))
    logged = scalars(tmp_path)
    assert [step for step, _ in logged["train/loss"]] == list(range(1, 9))
    assert len(logged["val/top1"]) == 2


def test_a_folder_with_a_log_but_no_run_is_not_appended_to(data, tmp_path, capsys):
    from verydeep.errors import UserError

    (tmp_path / "metrics.jsonl").write_text("my notes\n")
    with pytest.raises(UserError, match="metrics.jsonl but no run record"):
        train(tiny(data, tmp_path, epochs=1))
    assert (tmp_path / "metrics.jsonl").read_text() == "my notes\n"


def test_records_without_their_step_or_epoch_are_dropped_with_a_warning_naming_the_line(tmp_path):
    """A record of another form (edited, or another tool's line) is dropped as a damaged one, not shown to
    TensorBoard, which needs each record's step."""
    log = logged_epoch(tmp_path)
    lines = log.path.read_text().splitlines()
    damaged = [{"kind": "epoch", "epoch": 1, "train_loss": 1.5}, {"kind": "note", "epoch": 1, "step": 2},
               {"kind": "step", "epoch": 1, "step": 2.5, "loss": 1.0}, [1, 2]]
    log.path.write_text("\n".join(lines + [json.dumps(record) for record in damaged]) + "\n")
    warnings: list[str] = []
    log.truncate(step=2, epoch=1, warn=warnings.append)
    assert warnings == [f"{log.path}:{n}: a damaged record (cut short by a crash?) was dropped" for n in (4, 5, 6, 7)]
    assert log.path.read_text().splitlines() == lines
    log.open()
    log.close()
    assert [step for step, _ in scalars(tmp_path)["train/loss"]] == [1, 2]
