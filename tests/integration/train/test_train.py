"""Training: the loss falls, accumulation and resume are exact, the schedule and warm start follow Sec. 3.1."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import photo, save, tiny, weights, write_classifier, write_dataset

import verydeep
from verydeep.cli import main
from verydeep.data import balanced_subset
from verydeep.data.sampling import GlobalBatchSampler
from verydeep.errors import MissingFileError, UserError
from verydeep.io.checkpoint import export_safetensors, load_checkpoint
from verydeep.nn.model import VGG
from verydeep.nn.tasks import Classification
from verydeep.runtime import memory
from verydeep.runtime.processes import Processes, loader_workers
from verydeep.train import NonFiniteLossError, Schedule, Trainer, master_weights, train
from verydeep.train.memory_fit import MemoryProbe
from verydeep.train.recipe import (
    TrainConfig,
    make_config,
    parse_scale,
    read_recipe,
    recipe_names,
    setting_lines,
    settings_from_flags,
)
from verydeep.train.start import checked_settings
from verydeep.train.step import zero_momenta


def test_loss_falls_within_a_few_dozen_steps(data, tmp_path):
    summary = train(tiny(data, tmp_path, epochs=6, batch_norm=True, lr=0.01))  # the paper's lr; BN: a quick start
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert summary.steps == len(losses) == 24 and summary.epochs == len(epochs) == 6
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    assert summary.metric == "top1" and summary.best > 25.0  # four classes: chance is 25%
    assert {"val_top1", "val_top5", "img_s", "peak_mem_mb", "seconds", "skipped", "train_loss"} <= set(epochs[-1])
    exported = verydeep.load(tmp_path / "model.safetensors").model
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["schedule"]["best"] == summary.best
    assert all(torch.equal(value, best["model"][key]) for key, value in exported.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*.pt")) == [
        "epoch-0004.pt", "epoch-0005.pt", "epoch-0006.pt"]
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["classes"] == [f"class{i}" for i in range(4)] and recipe["scale"] == [32, 40]
    assert recipe["num_classes"] == 4 and "mean" in recipe["preprocess"]


def test_a_run_begun_from_python_with_an_alias_and_numpy_numbers_resumes(data, tmp_path, capsys):
    cfg = tiny(data, tmp_path / "run", config="vgg11", batch_size=np.int64(8), lr=np.float32(0.01), epochs=1,
               momentum=np.float64(0.9))  # a float, as numpy's float64 is, that torch.save would pickle
    assert (cfg.config, type(cfg.batch_size), type(cfg.lr), type(cfg.momentum)) == ("A", int, float, float)
    train(cfg)
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["config"] == "A" and recipe["batch_size"] == 8
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2
    assert main(["train", "--resume"]) == 2  # the run's settings, its data too, come from --out
    assert capsys.readouterr().err.strip().endswith("--out (the run directory) is required")
    resumed = train(TrainConfig(out=str(tmp_path / "run"), resume=True, epochs=3, progress=False))  # as --resume
    assert (resumed.epochs, load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["recipe"]["width"]) == (
        3, 1 / 16)  # the run's own settings (data, width, batch...), none restated


def test_accumulation_equals_the_full_batch(data, tmp_path):
    whole = train(tiny(data, tmp_path / "whole", dropout=0.0))
    accumulated = train(tiny(data, tmp_path / "micro", dropout=0.0, micro_batch=4))
    assert whole.steps == accumulated.steps == 4
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "micro")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_a_crash_is_bitwise_equal(data, tmp_path, workers):
    options = dict(epochs=2, checkpoint_every=2, workers=workers)  # dropout on: its RNG must be restored too
    train(tiny(data, tmp_path / "straight", **options))
    crashed = train(tiny(data, tmp_path / "resumed", stop_after_steps=7, **options))
    assert crashed.stopped == "stop_after_steps"
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 6  # mid-epoch 2
    if workers:  # through the command line: the run directory's recipe.json supplies the settings
        assert main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--no-progress"]) == 0
    else:
        assert train(tiny(data, tmp_path / "resumed", resume=True, **options)).steps == 8
    straight, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("straight", "resumed"))
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in straight["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line]
    assert steps == list(range(1, 9))  # the records after the checkpoint were dropped and logged again


def test_a_recipe_named_from_python_is_applied_before_the_settings_given(data, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("alpha_std = 0.0\nlr = 0.5\n")  # tiny gives lr 0.05, which wins; alpha_std it leaves
    train(tiny(data, tmp_path / "run", recipe=str(recipe)))
    record = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert record["alpha_std"] == 0.0 and record["lr"] == 0.05 and record["recipe"] == str(recipe)
    with pytest.raises(MissingFileError, match="--recipe no-such-recipe: no such file or recipe"):
        train(tiny(data, tmp_path / "other", recipe="no-such-recipe"))


@pytest.mark.parametrize("options, message", [
    (dict(stop_after_steps=5), r"--stop-after-steps 5 is beyond the run's last step \(--epochs 1 x 4 steps = 4\)"),
    (dict(checkpoint_every=5), "--checkpoint-every 5: no step from 1 to the last .* so it would never write"),
])
def test_step_flags_that_could_not_act_in_the_run_are_refused(data, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        train(tiny(data, tmp_path, **options))
    assert not (tmp_path / "checkpoints").exists()


def test_resume_stopping_at_a_step_already_done_is_refused_and_leaves_the_run(data, tmp_path):
    train(tiny(data, tmp_path, epochs=2, stop_after_steps=6, checkpoint_every=2))
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="--stop-after-steps 6: the run in .* has done 6 steps already"):
        train(tiny(data, tmp_path, epochs=2, resume=True, stop_after_steps=6))
    with pytest.raises(UserError, match="--checkpoint-every 3: no step from 7 to the last"):
        train(tiny(data, tmp_path, epochs=2, resume=True, checkpoint_every=3))
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    assert train(tiny(data, tmp_path, epochs=2, resume=True, stop_after_steps=7)).steps == 7


def test_a_crashed_run_resumes_though_its_own_checkpoint_every_has_no_step_left(data, tmp_path, capsys,
                                                                                monkeypatch):
    """--resume alone, or torchrun restarting the command: the run's --checkpoint-every acted before the crash."""
    args = ["train", "--data", str(data), "--out", str(tmp_path), "--device", "cpu", "--workers", "0", "--no-progress",
            "--width", "0.0625", "--crop", "32", "--scale", "32:40", "--batch-size", "16", "--precision", "fp32"]
    crashing = [*args, "--epochs", "2", "--checkpoint-every", "3"]
    assert main([*crashing, "--stop-after-steps", "7"]) == 0  # last.pt at step 6 of 8: no multiple of 3 left
    assert main(["train", "--out", str(tmp_path), "--resume", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 8
    assert main([*crashing, "--overwrite", "--stop-after-steps", "7"]) == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the same command again, after the crash
    assert main(crashing) == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 8
    assert main(["train", "--out", str(tmp_path), "--resume", "--epochs", "3", "--checkpoint-every", "7"]) == 2
    assert "--checkpoint-every 7: no step from 9 to the last" in capsys.readouterr().err  # a new one: refused


def test_a_run_given_relative_data_resumes_from_another_working_directory(data, tmp_path, capsys, monkeypatch):
    """The record keeps where --data was: a relative path read again from elsewhere would be other images, or none."""
    monkeypatch.chdir(data.parent)
    run = tmp_path / "run"
    assert main(["train", "--data", data.name, "--out", str(run), "--device", "cpu", "--workers", "0", "--no-progress",
                 "--width", "0.0625", "--crop", "32", "--scale", "32:40", "--batch-size", "16", "--precision", "fp32",
                 "--epochs", "2", "--stop-after-steps", "5"]) == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / data.name).mkdir()  # another folder of that name here: not the run's
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 8
    assert json.loads((run / "recipe.json").read_text())["data"] == str(data.resolve())


def test_plateau_divides_by_ten_after_patience_at_most_three_times_then_stops():
    schedule = Schedule(lr=0.01, patience=2, max_drops=3)
    assert schedule.update(1, 50.0) and schedule.lr == 0.01
    schedule.update(2, 49.0)
    assert schedule.lr == 0.01  # one bad validation: within the patience
    schedule.update(3, 50.0)
    assert schedule.lr == pytest.approx(1e-3) and schedule.drops == 1
    for epoch, top1 in enumerate([60.0, 60.0, 60.0, 59.0, 58.0, 61.0, 61.0], start=4):
        schedule.update(epoch, top1)
    assert schedule.lr == pytest.approx(1e-5) and schedule.drops == 3 and not schedule.stopped
    schedule.update(11, 61.0)
    schedule.update(12, 61.0)
    assert schedule.stopped and schedule.lr == pytest.approx(1e-5) and schedule.best == 61.0


def test_stop_patience_stops_a_run_that_stopped_improving_whatever_the_lr():
    schedule = Schedule(lr=0.01, patience=2, max_drops=3, stop_patience=3)
    for epoch, top1 in enumerate([50.0, 49.0, 49.5], start=1):
        schedule.update(epoch, top1)
    assert not schedule.stopped and schedule.drops == 1  # the plateau rule acted; two bad, not yet three
    schedule.update(4, 50.0)  # equal is not better
    assert schedule.stopped and schedule.best == 50.0
    steady = Schedule(lr=0.01, patience=2, milestones=[2], stop_patience=2)
    for epoch, top1 in enumerate([10.0, 11.0, 10.5, 12.0, 11.0], start=1):
        steady.update(epoch, top1)
        assert not steady.stopped  # improving every other epoch never counts two in a row
    resumed = Schedule(lr=0.01, stop_patience=2)
    resumed.load_state_dict({**steady.state_dict()})
    resumed.update(6, 11.5)
    assert resumed.stopped  # the count since the best survives a checkpoint


def test_a_stopped_schedule_resumed_under_another_rule_goes_on_as_that_rule_says():
    """A resume with more --max-drops, more --patience, another --stop-patience or milestones decides the stop
    again: the drop the stored rule had no more of is made at once; the same rule stays stopped."""
    stopped = Schedule(lr=0.01, patience=1, max_drops=0)
    stopped.update(1, 50.0)
    stopped.update(2, 49.0)
    assert stopped.stopped and stopped.drops == 0
    for rule, (lr, drops, still) in [(dict(patience=1, max_drops=0), (0.01, 0, True)),
                                     (dict(patience=1, max_drops=3), (0.01 / 10, 1, False)),
                                     (dict(patience=2, max_drops=0), (0.01, 0, False)),
                                     (dict(milestones=[5]), (0.01, 0, False)),
                                     (dict(patience=1, max_drops=3, stop_patience=1), (0.01 / 10, 1, True))]:
        resumed = Schedule(lr=0.01, **rule)
        resumed.load_state_dict(stopped.state_dict())
        assert (resumed.lr, resumed.drops, resumed.stopped) == (lr, drops, still), rule
    going = Schedule(lr=0.01, patience=5)  # two validations without improving: within its patience
    for epoch, top1 in enumerate([50.0, 49.0, 49.0], start=1):
        going.update(epoch, top1)
    for rule, (lr, drops, still) in [(dict(patience=5), (0.01, 0, False)),
                                     (dict(patience=1, max_drops=0), (0.01, 0, True)),
                                     (dict(patience=2), (0.01 / 10, 1, False)),
                                     (dict(patience=5, stop_patience=1), (0.01, 0, True))]:
        resumed = Schedule(lr=0.01, **rule)  # a run that ended at --epochs, resumed with more of them
        resumed.load_state_dict(going.state_dict())
        assert (resumed.lr, resumed.drops, resumed.stopped) == (lr, drops, still), rule
    by_patience = Schedule(lr=0.01, stop_patience=1)
    by_patience.update(1, 50.0)
    by_patience.update(2, 49.0)
    resumed = Schedule(lr=0.01, stop_patience=3)
    resumed.load_state_dict(by_patience.state_dict())
    assert by_patience.stopped and not resumed.stopped and resumed.drops == 0


def test_a_run_stopped_on_a_plateau_trains_on_when_resumed_with_more_drops(data, tmp_path, capsys):
    args = ["train", "--data", str(data), "--out", str(tmp_path), "--device", "cpu", "--workers", "0", "--no-progress",
            "--width", "0.0625", "--crop", "32", "--scale", "32:40", "--batch-size", "16", "--precision", "fp32",
            "--lr", "1e-12", "--epochs", "4", "--patience", "1", "--max-drops", "0"]  # the weights stay: no improving
    assert main(args) == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["stopped"] == "plateau"
    assert main(["train", "--out", str(tmp_path), "--resume", "--max-drops", "1", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert resumed["epochs"] == 3 and resumed["stopped"] == "plateau" and resumed["lr"] == 1e-12 / 10
    assert json.loads((tmp_path / "recipe.json").read_text())["max_drops"] == 1


def test_a_resume_that_ends_the_run_at_once_records_what_ended_it(data, tmp_path, capsys):
    """A stricter --stop-patience (or fewer --epochs) given at a resume stops the run there: the record says so,
    and a plain --resume later finds the run finished too."""
    args = ["train", "--data", str(data), "--out", str(tmp_path), "--device", "cpu", "--workers", "0", "--no-progress",
            "--width", "0.0625", "--crop", "32", "--scale", "32:40", "--batch-size", "16", "--precision", "fp32",
            "--lr", "1e-12", "--epochs", "6", "--patience", "5"]  # no improving, no drop yet
    assert main([*args, "--stop-after-steps", "12"]) == 0  # two epochs or more: one at least without improving
    summaries, records = [], []
    for again in (["--stop-patience", "1"], ["--workers", "1"]):  # then a plain resume, of another call's workers
        assert main(["train", "--out", str(tmp_path), "--resume", "--no-progress", *again]) == 0
        summaries.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
        records.append((tmp_path / "recipe.json").read_bytes())
    assert summaries[0] == summaries[1] | {"seconds": summaries[0]["seconds"]} and summaries[0]["epochs"] < 6
    assert summaries[0]["stopped"] == "stop_patience"
    assert json.loads(records[0])["stop_patience"] == 1 and records[1] == records[0]  # as trained, but what ended it
    assert json.loads(records[0])["resume"] is False and json.loads(records[0])["workers"] == 0


def test_milestones_given_at_a_resume_replace_the_stored_plateau_rule(data, tmp_path, capsys):
    """The stored --patience 3 is the old rule's, not a clash with the milestones given now (which nothing could
    otherwise give); a --patience given beside them still is."""
    args = ["train", "--data", str(data), "--out", str(tmp_path), "--device", "cpu", "--workers", "0", "--no-progress",
            "--width", "0.0625", "--crop", "32", "--scale", "32:40", "--batch-size", "16", "--precision", "fp32",
            "--epochs", "1", "--patience", "3"]
    assert main(args) == 0
    resume = ["train", "--out", str(tmp_path), "--resume", "--no-progress", "--epochs", "3", "--milestones", "2"]
    assert main([*resume, "--patience", "2"]) == 2
    assert "--milestones 2 replaces the plateau rule, so --patience 2 would be ignored" in capsys.readouterr().err
    assert main(resume) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["lr"] == pytest.approx(TrainConfig.lr / 10)
    record = json.loads((tmp_path / "recipe.json").read_text())
    assert record["milestones"] == [2] and record["patience"] == TrainConfig.patience
    again, recipe = tmp_path / "again", tmp_path / "milestones.toml"
    recipe.write_text("milestones = [3]\n")
    assert main([*args[:4], str(again), *args[5:]]) == 0
    # the recipe's milestones undone by the flag: the plateau rule stays, the stored patience with it
    assert main(["train", "--out", str(again), "--resume", "--no-progress", "--recipe", str(recipe), "--epochs", "2",
                 "--milestones", ""]) == 0
    assert json.loads((again / "recipe.json").read_text())["patience"] == 3


def test_the_trainers_fused_update_is_plain_sgd(data, tmp_path):
    """The trainer's optimizer (one fused kernel) makes the update of torch's plain SGD loop, with the
    gradients autograd gives (laid out as their channels-last weights)."""
    import copy

    from verydeep.train import Trainer

    trainer = Trainer(tiny(data, tmp_path, epochs=1, dropout=0.0), Processes.from_env())
    plain_model = copy.deepcopy(trainer.model)
    plain = torch.optim.SGD(plain_model.parameters(), lr=trainer.cfg.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
        for model, optimizer in ((trainer.model, trainer.optimizer), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).logsumexp(dim=1).sum().backward()
            optimizer.step()
    for mine, theirs in zip(trainer.model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_milestones_replace_the_plateau_rule():
    schedule = Schedule(lr=0.1, patience=1, milestones=[2, 4])
    lrs = []
    for epoch in range(1, 6):
        schedule.update(epoch, 10.0)
        lrs.append(schedule.lr)
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001]) and not schedule.stopped


def test_resume_may_move_the_milestones(data, tmp_path):
    """A run that dropped lr after epoch 1 is extended with the drop moved to epoch 2: lr goes back up."""
    plateau = dict(patience=TrainConfig.patience)  # tiny's patience would be refused beside the milestones
    train(tiny(data, tmp_path, epochs=1, milestones=[1], **plateau))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["schedule"]["lr"] == pytest.approx(0.005)
    assert train(tiny(data, tmp_path, epochs=3, milestones=[2], resume=True, **plateau)).epochs == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["epoch"]: r["lr"] for r in records if r["kind"] == "epoch"}
    assert lrs == pytest.approx({1: 0.05, 2: 0.05, 3: 0.005})


def test_a_resumed_schedule_has_the_uninterrupted_ones_rates_bit_for_bit():
    """Resumed after any epoch, the milestones give the same floats as the divisions of an uninterrupted
    run (0.003 / 100 is not 0.003 / 10 / 10)."""
    uninterrupted = Schedule(lr=0.003, milestones=[1, 2, 3])
    rates = []
    for epoch in range(1, 5):
        uninterrupted.update(epoch, None)
        rates.append(uninterrupted.lr)
    for stopped_after in range(1, 5):
        resumed = Schedule(lr=0.003, milestones=[1, 2, 3])
        resumed.follow_milestones(stopped_after)
        assert resumed.lr == rates[stopped_after - 1]


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "2", "--milestones", "1,1"], "--milestones 1,1: an epoch is listed twice"),
    (["--epochs", "2", "--milestones", "0,-1"], "--milestones 0,-1: each must be an epoch, from 1 on"),
    (["--epochs", "2", "--milestones", "3"], "--milestones 3: epoch 3 is after the last, --epochs 2"),
    (["--milestones", "1", "--patience", "1", "--max-drops", "0"],
     "--milestones 1 replaces the plateau rule, so --patience 1 and --max-drops 0 would be ignored"),
    (["--milestones", "1", "--max-drops", "0"], "--milestones 1 replaces the plateau rule, so --max-drops 0 would"),
    (["--milestones", "1", "--patience", "2"], "--milestones 1 replaces the plateau rule, so --patience 2 would"),
    (["--batch-size", "4", "--micro-batch", "100"], "--micro-batch 100 is larger than --batch-size 4"),
])
def test_a_schedule_or_micro_batch_flag_that_could_not_take_effect_is_refused(data, tmp_path, capsys, flags,
                                                                              message):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"verydeep train: error: {message}"), err
    assert not run.exists()


def test_a_recipe_s_plateau_settings_give_way_to_milestones_given_on_the_command_line():
    settings = settings_from_flags({"recipe": "a-paper", "milestones": "30,60"})
    assert make_config(settings).milestones == [30, 60] and settings["patience"] == TrainConfig.patience
    with pytest.raises(UserError, match="--milestones 30,60 replaces the plateau rule, so --max-drops 3 would"):
        settings_from_flags({"recipe": "a-paper", "milestones": "30,60", "max_drops": 3})


@pytest.mark.parametrize("text, flags, message", [
    ('patience = 3\nmilestones = "2"\n', [], "{recipe}'s milestones 2 replaces the plateau rule, so {recipe}'s "
     "patience 3 would be ignored"),
    ("patience = 3\n", ["--milestones", "2"], "--milestones 2 replaces the plateau rule, so {recipe}'s patience 3"),
    ('scale = "16"\n', [], "{recipe}'s scale needs crop <= Smin <= Smax; got scale 16:16 with crop 32"),
    ('crop = 224\nscale = "256"\n', [], "{recipe}'s scale 256 is for crops of 224, not --crop 32: give --scale for "
     "crops of 32 too"),  # the recipe's S was never meant for 32-pixel crops
    ('freeze = "conv9_9"\n', [], "{recipe}'s freeze conv9_9: not a layer of VGG-A (features, or one of conv1_1"),
    ("", ["--freeze", "conv5_3"], "--freeze conv5_3: not a layer of VGG-A"),  # found before the data is read
])
def test_a_setting_a_recipe_gave_is_named_as_the_recipe_s_in_the_checks_of_all_settings(data, tmp_path, capsys,
                                                                                       text, flags, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--recipe", str(path), "--crop", "32",
            "--epochs", "3", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(recipe=f"--recipe {path}") in err and err.count("\n") == 1, err


def test_milestones_given_from_python_are_checked_as_the_flags_are(data, tmp_path):
    with pytest.raises(UserError, match="--milestones 2,2: an epoch is listed twice"):
        train(tiny(data, tmp_path, epochs=3, milestones=[2, 2], patience=TrainConfig.patience))
    with pytest.raises(UserError, match="--patience 100 would be ignored"):
        train(tiny(data, tmp_path, epochs=3, milestones=[2]))


def test_a_micro_batch_larger_than_a_process_share_of_the_batch_is_refused(data, tmp_path):
    two_processes = Processes(rank=0, world=2, local_rank=0)
    with pytest.raises(UserError, match=r"--micro-batch 12 is larger than a process's share of --batch-size 16 "
                                        r"over 2 processes \(8\)"):
        Trainer(tiny(data, tmp_path, micro_batch=12), two_processes)


def test_plateau_stops_a_run(data, tmp_path):
    summary = train(tiny(data, tmp_path, lr=1e-9, patience=1, max_drops=1, epochs=10, val_every=1))
    assert summary.stopped == "plateau" and summary.epochs == 3 and summary.lr == pytest.approx(1e-10)


def test_a_run_stop_patience_ended_says_so_not_plateau(data, tmp_path):
    summary = train(tiny(data, tmp_path, lr=1e-9, patience=5, stop_patience=1, epochs=10, val_every=1))
    assert summary.stopped == "stop_patience" and summary.epochs == 2 and summary.lr == 1e-9  # no drop made


RECIPE = {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32}


def test_weights_with_warm_start_copy_exactly_the_papers_layers(data, tmp_path):
    train(tiny(data, tmp_path / "a", epochs=1))
    source = verydeep.load(tmp_path / "a" / "checkpoints" / "last.pt").model
    cfg = tiny(data, tmp_path / "d", config="D", weights=str(tmp_path / "a"), warm_start=True, init="paper")
    trainer = Trainer(cfg, Processes.from_env())
    deep = trainer.model
    assert "warm start" in trainer.how and trainer.record["start"]["warm_start"] == [
        "conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]
    copied = {"conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"}
    layers = {**deep.conv_layers(), **deep.fc_layers()}
    theirs = {**source.conv_layers(), **source.fc_layers()}
    for name, layer in layers.items():
        same = name in theirs and layer.weight.shape == theirs[name].weight.shape and torch.equal(
            layer.weight.float(), theirs[name].weight.float())
        assert same == (name in copied), name
    same_config = Trainer(tiny(data, tmp_path / "a2", weights=str(tmp_path / "a")), Processes.from_env())
    for key, value in source.state_dict().items():
        assert torch.equal(value, same_config.model.state_dict()[key].to(value.dtype))


def test_warm_start_copies_batch_norm_with_its_convolution_and_fc8_only_for_the_same_classes(data, tmp_path,
                                                                                               capsys):
    """A copied layer of a batch-norm net A comes whole (so it may be frozen, and --lr-copied reaches its batch
    norm); FC8 of net A scores its classes, so a dataset of other classes starts it anew, as plain --weights does."""
    train(tiny(data, tmp_path / "a", epochs=1, batch_norm=True))
    source = verydeep.load(tmp_path / "a").model
    cfg = tiny(data, tmp_path / "d", config="D", weights=str(tmp_path / "a"), warm_start=True, freeze="conv1_1",
               lr_copied=0.01)
    trainer = Trainer(cfg, Processes.from_env())
    copied = trainer.record["start"]["copied"]
    bn = trainer.model.tap_names["bn1_1"]
    assert {f"{bn}.weight", f"{bn}.bias"} <= set(copied) and f"{trainer.model.tap_names['bn1_2']}.weight" not in copied
    torch.testing.assert_close(trainer.model.get_submodule(bn).running_mean,
                               source.get_submodule(source.tap_names["bn1_1"]).running_mean)
    other = tmp_path / "other"  # the same images under other class names
    shutil.copytree(data, other)
    for split in ("train", "val"):
        for folder in sorted((other / split).iterdir()):
            folder.rename(folder.with_name(folder.name.replace("class", "kind")))
    assert main(["train", "--data", str(other), "--weights", str(tmp_path / "a"), "--warm-start", "--config", "B",
                 "--out", str(tmp_path / "b"), "--device", "cpu", "--workers", "0", "--no-progress", "--crop", "32",
                 "--scale", "32:40", "--batch-size", "16", "--epochs", "1", "--stop-after-steps", "1"]) == 0
    assert "not copied (other classes or another task), he init: fc8" in capsys.readouterr().err
    record = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert record["start"]["warm_start"] == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7"]
    assert not any(name.startswith("classifier.6.") for name in record["start"]["copied"])


def test_the_weights_crop_restated_brings_their_training_scale_and_the_refusal_says_both(data, tmp_path, capsys):
    """A 32-pixel net's S is its own, not the 224 crop's default 256: with --crop restating its crop too, and the
    refusal of a recipe's other crop names the --scale that keeps it."""
    train(tiny(data, tmp_path / "a", epochs=1))  # crop 32, S in [32, 40]
    args = ["train", "--data", str(data), "--weights", str(tmp_path / "a"), "--device", "cpu", "--workers", "0",
            "--no-progress", "--batch-size", "16", "--epochs", "1", "--stop-after-steps", "1"]
    assert main([*args, "--crop", "32", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "recipe.json").read_text())["scale"] == [32, 40]
    recipe = tmp_path / "r.toml"
    recipe.write_text('crop = 224\nscale = "256"\n')  # as the warm-start recipe's
    assert main([*args, "--recipe", str(recipe), "--out", str(tmp_path / "c")]) == 2
    assert ("give --crop 32 --scale 32:40 to keep it (the weights' crop and training scale), or --crop 224 to train "
            "FC6 anew") in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # the forms --scale takes, and its default for another crop
    assert "Smin:Smax (256:512); for another --crop, 256 scaled with it (36 for 32) (default 256)" in shown


def test_a_setting_that_contradicts_the_weights_is_refused_without_warm_start(data, tmp_path, capsys):
    train(tiny(data, tmp_path / "a", epochs=1))
    args = ["train", "--data", str(data), "--weights", str(tmp_path / "a"), "--out", str(tmp_path / "e"),
            "--device", "cpu", "--workers", "0", "--no-progress", "--crop", "32", "--scale", "32:40",
            "--batch-size", "16", "--epochs", "1"]
    assert main([*args, "--config", "E"]) == 2
    err = capsys.readouterr().err
    assert "--config E contradicts --weights" in err and "--warm-start" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--width", "0.5"]) == 2 and "--width 0.5 contradicts" in capsys.readouterr().err
    recipe = tmp_path / "e.toml"
    recipe.write_text('config = "E"\n')
    assert main([*args, "--recipe", str(recipe)]) == 2  # named as the recipe's, which a flag overrides
    assert f"--recipe {recipe}'s config E contradicts --weights" in capsys.readouterr().err.replace("\n", " ")
    recipe.write_text("crop = 64\n")  # a recipe's crop would re-initialise FC6 unasked; a flag's may
    assert main([a for a in args if a not in ("--crop", "32")] + ["--recipe", str(recipe)]) == 2
    assert f"--recipe {recipe}'s crop 64 is not the crop of --weights" in capsys.readouterr().err
    assert main([*args[:-2], "--epochs", "1", "--stop-after-steps", "1", "--config", "E", "--warm-start"]) == 0
    record = json.loads((tmp_path / "e" / "recipe.json").read_text())
    assert record["config"] == "E" and record["start"]["warm_start"][:2] == ["conv1_1", "conv2_1"]
    warm = [*args[:-2], "--epochs", "1", "--warm-start"]
    assert main([*warm, "--config", "A"]) == 2  # net A into net A: plain --weights copies every layer
    assert "--config A is the net of --weights" in capsys.readouterr().err
    assert main([*warm, "--config", "D", "--batch-norm"]) == 2
    err = capsys.readouterr().err
    assert "--batch-norm True contradicts" in err and "with --warm-start the weights still decide it" in err
    net_e = tmp_path / "e.safetensors"
    export_safetensors(VGG("E", num_classes=4, width=1 / 16, input_size=32), {
        "config": "E", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32}, net_e)
    from_e = [str(net_e) if value == str(tmp_path / "a") else value for value in warm]
    assert main([*from_e, "--config", "E"]) == 2  # from net E, not A
    assert "--warm-start copies net A's first four convs and FC layers (Sec. 3.1)" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--warm-start"]) == 2
    assert "--warm-start copies the layers of --weights" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--lr-copied", "0.001"]) == 2
    assert "--lr-copied is the learning rate of the layers copied from --weights" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--weights-dir", str(tmp_path)]) == 2
    assert f"--weights-dir {tmp_path} is where named --weights are looked for" in capsys.readouterr().err


def test_non_finite_loss_stops_with_the_last_good_checkpoint(data, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf).*last good checkpoint: .*last\.pt"):
        train(tiny(data, tmp_path, lr=1e12, dropout=0.0, epochs=5, checkpoint_every=1))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] >= 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


class LossBecomesInfinite(Classification):
    """Cross-entropy until the ``bad``-th batch, whose loss is infinite."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.batches, self.bad = 0, bad

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        loss = super().loss(outputs, targets)
        return loss * float("inf") if self.batches == self.bad else loss


def test_a_non_finite_step_is_named_and_nothing_after_it_is_recorded_or_saved(data, tmp_path):
    """The host reads a step's check once the next step is queued; still the error names the step that went
    bad, the step records stop before it, and the last checkpoint is the step before it."""
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at epoch 1 step 3 .*last good checkpoint: .*last\.pt"):
        train(tiny(data, tmp_path, dropout=0.0, epochs=5, checkpoint_every=1), LossBecomesInfinite(bad=3))
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps == [1, 2]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2


def test_zero_momenta_before_the_first_step_give_the_same_updates_bit_for_bit():
    """The trainer creates the momentum buffers as zeros before the first step (so that a skipped first step
    leaves them defined); the updates are those of torch's SGD creating them at the first step."""
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    runs = []
    for zeroed in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
        if zeroed:
            zero_momenta(optimizer)
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            optimizer.step()
        runs.append([p.detach().clone() for p in params] + [optimizer.state[p]["momentum_buffer"] for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("device, precision", [("cpu", "fp32"), ("cpu", "bf16"),
                                               pytest.param("cuda", "fp32", marks=pytest.mark.gpu)])
def test_a_non_finite_step_leaves_the_weights_and_momentum_as_they_were(data, tmp_path, monkeypatch, device,
                                                                       precision):
    """The update of a non-finite loss or gradient is skipped, on the first step or a later one, and a finite
    step after it still updates; in bf16 on the CPU, where the net trains on bf16 copies, the copies too."""
    monkeypatch.setattr(master_weights, "MIN_WEIGHTS", 0)  # the copies for this tiny net too
    trainer = Trainer(tiny(data, tmp_path, dropout=0.0, device=device, precision=precision), Processes.from_env())
    model, optimizer, masters = trainer.stepper.model, trainer.stepper.optimizer, trainer.stepper.masters
    assert (masters is not None) == (precision == "bf16")
    trained = list(masters.copies.values()) if masters else list(model.parameters())

    def step(loss: float, gradient: float) -> None:
        for p in trained:
            p.grad = torch.full_like(p, gradient)
        queued = trainer.stepper.update(torch.tensor(loss, device=device), 4, 0, lambda: "at the test's step", 1, 0.1)
        trainer.stepper.read(queued)

    def state() -> list[torch.Tensor]:
        buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters() if p in optimizer.state]
        copies = [c.detach() for c in masters.copies.values()] if masters else []
        return [t.clone() for t in [*model.state_dict().values(), *buffers, *copies]]

    for first in (True, False):
        for loss, gradient, what in [(float("nan"), 0.1, "loss is nan"), (1.0, float("inf"), "gradients are not")]:
            before = state()
            with pytest.raises(NonFiniteLossError, match=f"{what}.*at the test's step"):
                step(loss, gradient)
            assert all(torch.equal(a, b) for a, b in zip(before, state(), strict=True)), (first, what)
        before = state()
        step(1.0, 0.1)
        assert not all(torch.equal(a, b) for a, b in zip(before, state(), strict=False))  # the finite step updated


def test_sampler_slices_make_up_the_global_batch():
    single = list(GlobalBatchSampler(range(40), 8, 8, 0, 1, seed=3))
    rank0 = list(GlobalBatchSampler(range(40), 8, 2, 0, 2, seed=3))
    rank1 = list(GlobalBatchSampler(range(40), 8, 2, 1, 2, seed=3))
    assert len(single) == 5 and len(rank0) == 10
    for step, batch in enumerate(single):
        assert batch == rank0[2 * step] + rank0[2 * step + 1] + rank1[2 * step] + rank1[2 * step + 1]
    resumed = GlobalBatchSampler(range(40), 8, 8, 0, 1, seed=3)
    resumed.set_epoch(0, step_in_epoch=3)
    assert list(resumed) == single[3:]
    resumed.set_epoch(1)
    assert list(resumed) != [[(1, i) for _, i in batch] for batch in single]  # a new order each epoch


def test_balanced_subset_takes_classes_in_turn():
    targets = [0] * 5 + [1] * 5 + [2] * 5
    assert balanced_subset(targets, 6) == [0, 1, 5, 6, 10, 11]
    assert balanced_subset(targets, None) == list(range(15))


def test_scale_and_recipes():
    assert parse_scale("256") == (256, 256) and parse_scale("256:512") == (256, 512) and parse_scale([36, 73]) == (
        36, 73)
    assert {"a-paper", "warm-start", "glorot", "s384", "jitter", "cifar10"} <= set(recipe_names())
    cfg = make_config({**read_recipe("s384"), "data": "x", "out": "y"})
    assert cfg.scale == (384, 384) and cfg.lr == 1e-3
    assert make_config(read_recipe("jitter")).scale == (256, 512)
    assert "config" not in read_recipe("s384") and "config" not in read_recipe("jitter")  # the weights' net
    assert make_config({"milestones": "30, 60"}).milestones == [30, 60]
    from_python = TrainConfig(scale="36:73", milestones="3,5", crop=32)  # a field as its flag gives it
    assert from_python.scale == (36, 73) and from_python.milestones == [3, 5]
    assert TrainConfig(scale="36").scale == (36, 36) and TrainConfig(milestones=(2, 4)).milestones == [2, 4]
    with pytest.raises(UserError, match="--scale must be"):
        TrainConfig(scale="36:x")
    for scale in (256.7, float("inf"), "1_0", True, [256, 512.5], "256:100000"):  # from a recipe file: never truncated
        with pytest.raises(UserError, match="--scale must be"):
            parse_scale(scale)
    with pytest.raises(UserError, match="--milestones must be"):
        make_config({"milestones": [30, 60.5]})


def test_bad_options_are_one_line_errors(data, tmp_path, capsys):
    cases = [
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(data), "--scale", "256:abc"], "--scale"),
        (["--data", str(data), "--scale", "50", "--crop", "48"], "--crop must be a multiple of 32"),
        (["--data", str(data), "--recipe", "no-such-recipe"], "no-such-recipe"),
        (["--data", str(data), "--milestones", "3,x"], "--milestones"),
        (["--data", str(data), "--resume"], "--resume"),
    ]
    for flags, message in cases:
        assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("verydeep train: error:"), err


@pytest.mark.parametrize("text, message", [
    ('lr = "abc"', "lr must be a number; got 'abc'"),
    ("dropout = 1.5", "dropout is the probability of dropping an FC activation: at least 0 and below 1"),
    ("limit_train = 2.5", "limit_train must be a whole number; got 2.5"),
    ("channels_last = 1", "channels_last must be true or false; got 1"),
    ("config = 5", "config must be text; got 5"),
    ('config = "F"', "config: unknown VGG configuration 'F'; choose one of A, A-LRN"),
    ("workers = 100000", "workers must be from 0 to"),
    ('scale = "abc"', "scale: --scale must be S or Smin:Smax"),
    ('recipe = "cifar10"', "recipe = 'cifar10': a recipe cannot name another"),
    ("overwrite = true", "overwrite is an action of one command line (--overwrite), not a recipe setting"),
    ("resume = true", "resume is an action of one command line (--resume), not a recipe setting"),
    ("stop_after_steps = 2", "stop_after_steps is an action of one command line (--stop-after-steps)"),
    ('freeze = ""', "freeze must be features or a layer name (conv4_3, fc6); got ''"),
    ('freeze = "conv 4"', "freeze must be features or a layer name (conv4_3, fc6); got 'conv 4'"),
])
def test_a_recipe_setting_of_the_wrong_type_or_out_of_range_names_the_file_and_setting(data, tmp_path, capsys,
                                                                                      text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f"# a comment, then a good setting and the bad one\nepochs = 1\n{text}\n")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"verydeep train: error: {recipe}:3: {message}"), err
    assert recipe.read_text().endswith(text + "\n") and not (tmp_path / "run").exists()


def test_a_recipe_error_names_the_line_of_a_quoted_key_and_of_a_table():
    text = '# a recipe\n\n"lr" = 0.1\n[momentum]\nx = 1\n'
    assert setting_lines(text, {"lr": 0.1, "momentum": {"x": 1}}) == {"lr": 3, "momentum": 4}


def test_a_recipe_that_is_not_text_is_one_line_naming_it(data, tmp_path, capsys):
    recipe = tmp_path / "binary.toml"
    recipe.write_bytes(b"lr = 0.01\nepochs = \x82\xff\n")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err == f"verydeep train: error: {recipe}: not a TOML recipe (not UTF-8 text at byte 19)\n"


@pytest.mark.parametrize("flags, message", [
    (["--dropout", "1.5"], "--dropout is the probability of dropping an FC activation: at least 0 and below 1"),
    (["--dropout", "1"], "--dropout is the probability"),
    (["--workers", "100000"], "--workers must be from 0 to"),
])
def test_dropout_is_a_probability_below_one_and_workers_are_bounded_by_the_cores(data, tmp_path, capsys, flags,
                                                                                  message):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"verydeep train: error: {message}"), err
    assert not (tmp_path / "run").exists()
    assert tiny(data, tmp_path / "run", dropout=0.0, workers=loader_workers()).check() is None


def test_step_times_include_the_update(data, tmp_path, monkeypatch):
    """A step's logged time runs from the end of the step before to the end of its own update, so a slow
    update (here 50 ms) shows in the images per second."""
    trainer = Trainer(tiny(data, tmp_path), Processes())
    update = trainer.optimizer.step

    def slow_update(*args, **kwargs):
        time.sleep(0.05)
        return update(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", slow_update)
    trainer.run()
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 4 and all(16 / r["img_s"] >= 0.05 for r in steps)


def test_micro_batch_fitted_to_a_memory_budget():
    """Peak memory 100 MB + 10 MB an image: a step of 64 images (740 MB) fits 1 GB whole; 500 MB fits 40
    images, so 64 go as two micro-batches of 32; the two probes are the only measurements."""
    probed = []

    def peak(images: int) -> int:
        probed.append(images)
        return (100 + 10 * images) * 10**6

    assert memory.fit_micro_batch(64, peak, 10**9) == 64
    assert memory.fit_micro_batch(64, peak, 500 * 10**6) == 32 and probed == [2, 8, 2, 8]
    assert memory.fit_micro_batch(64, peak, 105 * 10**6) == 1  # not even one image: one at a time
    assert memory.fit_micro_batch(100, peak, 500 * 10**6) == 34  # 3 micro-batches of at most 40: 34, 34, 32
    assert memory.fit_micro_batch(2, peak, 0) == 2 and probed == [2, 8] * 4  # nothing to split

    def out_of_memory_above_4(images: int) -> int:
        if images > 4:
            raise torch.OutOfMemoryError("probe")
        return peak(images)

    assert memory.fit_micro_batch(64, out_of_memory_above_4, 10**9) == 2  # the size that did fit
    # a peak that does not grow: each image taken as 800 / 8 = 100 MB, 600 MB fixed, so 4 fit in 1 GB
    assert memory.fit_micro_batch(64, lambda images: 800 * 10**6, 10**9) == 4


def test_available_memory_is_capped_by_the_containers_limit(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{3 * 2**30}\n")
    usage.write_text(f"{2**30}\n")
    monkeypatch.setattr(memory, "CGROUP_MEMORY", ((str(limit), str(usage)),))
    available = memory.available_memory_bytes()
    assert available is not None and available <= 2 * 2**30
    limit.write_text("max\n")  # no limit: the machine's
    assert memory.available_memory_bytes() >= available


def test_micro_batch_fitted_to_the_cpu_memory(data, tmp_path, monkeypatch):
    """On a CPU the probe counts what the forward pass saves for the backward pass (linear in the images,
    the weights left out); with plenty of memory the batch goes whole, with little it is split evenly,
    and the split run trains as the whole one (gradient accumulation is exact)."""
    whole = Trainer(tiny(data, tmp_path / "whole", dropout=0.0), Processes())
    assert whole.micro_batch == whole.local_batch == 16
    probes = {n: whole.memory.activation_bytes(n) for n in (2, 8, 16)}
    per_image = (probes[8] - probes[2]) / 6
    assert per_image > 0 and probes[16] == pytest.approx(probes[2] + 14 * per_image, rel=0.01)
    first_conv = whole.model.features[0]
    assert probes[2] > 2 * first_conv.out_channels * 32 * 32 * 4  # at least the first conv's output
    assert {p.dtype for p in whole.model.parameters()} == {torch.float32}  # nothing changed by the probes
    pending = 2 * sum(p.numel() * 4 for p in whole.model.parameters())
    room = pending + probes[2] + 4.5 * per_image  # 6.5 images fit: 16 go as 3 micro-batches, of at most 6
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: int(room / memory.MEMORY_HEADROOM) + 1)
    split = Trainer(tiny(data, tmp_path / "split", dropout=0.0), Processes())
    assert split.micro_batch == 6 and "fitted to the memory of cpu" in split.how
    split.run()
    whole.run()
    for name, value in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(tmp_path / "split")[name], value, atol=1e-5, rtol=1e-4)
    monkeypatch.undo()  # plenty of memory again: a resumed run keeps the micro-batch it was trained with
    resumed = Trainer(tiny(data, tmp_path / "split", dropout=0.0, epochs=2, resume=True), Processes())
    assert resumed.micro_batch == 6 and resumed.sampler.micro_per_step == 3


def test_no_micro_batch_that_fits_is_a_one_line_error(data, tmp_path, monkeypatch):
    monkeypatch.setattr(MemoryProbe, "fitted", lambda self, local_batch: 0)
    with pytest.raises(UserError, match="does not fit the memory of cpu"):
        Trainer(tiny(data, tmp_path), Processes())


def test_cpu_memory_budget_shared_by_the_processes_of_a_machine(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1000)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory.cpu_memory_budget(50) == int(memory.MEMORY_HEADROOM * 1000) - 50
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory.cpu_memory_budget() == int(memory.MEMORY_HEADROOM * 250)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: None)
    assert memory.cpu_memory_budget() is None


@pytest.mark.gpu
def test_cuda_micro_batch_fitted_to_the_gpu(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", {"train": 16, "val": 4})
    trainer = Trainer(tiny(data, tmp_path / "whole", device="cuda"), Processes())
    assert trainer.micro_batch == trainer.local_batch  # a tiny net fits
    peaks = [trainer.memory.peak_bytes(n) for n in (2, 8)]
    assert 0 < peaks[0] < peaks[1]
    monkeypatch.setattr(memory, "cuda_memory_budget", lambda device, extra=0: peaks[0] + (peaks[1] - peaks[0]) // 2)
    trainer = Trainer(tiny(data, tmp_path / "fitted", device="cuda"), Processes())
    assert trainer.micro_batch < trainer.local_batch
    assert train(tiny(data, tmp_path / "run", device="cuda", epochs=1)).steps > 0


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_cuda_bf16_channels_last_with_workers(tmp_path, decode):
    data = write_dataset(tmp_path / "data", {"train": 16, "val": 4}, ext="jpg")  # JPEGs: nvJPEG decodes them
    summary = train(tiny(data, tmp_path, device="cuda", precision="auto", workers=2, epochs=3, micro_batch=8,
                         decode=decode))
    assert summary.steps == 12 and summary.best is not None
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "step")
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # mapped to the CPU
    assert all(v.device.type == "cpu" for v in state["model"].values()) and "cuda" in state["rng"][0]


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    data = write_dataset(tmp_path / "data", {"train": 16, "val": 2})
    for label in range(4):
        (data / "train" / f"class{label}" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = train(tiny(data, tmp_path / "run", batch_size=17))  # 68 images, 4 steps: every file is read once
    epoch = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary.steps == 4 and epoch["skipped"] == 4 and np.isfinite(epoch["train_loss"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_where_no_image_can_be_read_is_one_line_not_a_score(tmp_path, capsys, split):
    data = write_dataset(tmp_path / "data", {"train": 4, "val": 2})
    for path in (data / split).rglob("*.png"):
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--width", "0.0625", "--crop", "32",
            "--scale", "32", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
            "--precision", "fp32", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    expected = {"train": f"{data / 'train'}: no training image of epoch 1 could be read (16 unreadable)",
                "val": f"{data / 'val'}: no validation image could be read (8 unreadable)"}[split]
    assert len(err.splitlines()) == 1 and err.endswith(expected)
    assert not (tmp_path / "run" / "model.safetensors").exists()


FAULTS_PER_STEP = """
import ctypes, resource, sys, torch
from verydeep.nn.model import VGG
from verydeep.runtime.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # glibc's documented defaults, held fixed: its dynamic threshold sometimes spares steps too
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-1, 128 << 10) and libc.mallopt(-3, 128 << 10)  # M_TRIM_, M_MMAP_THRESHOLD
torch.set_num_threads(1)  # every allocation from this thread: glibc's main arena
torch.manual_seed(0)
net = VGG("A", num_classes=10, width=1 / 8, input_size=32)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
def step():
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
for _ in range(3):  # warm-up: the allocator's high-water mark
    step()
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keep_freed_memory_spares_each_step_its_page_faults():
    def faults(mode: str) -> float:
        """Median page faults of seven steps (the heap may still grow now and then: a mean over
        three steps once read 256 against 1,014). The baseline holds glibc's default thresholds
        fixed: left to adjust themselves, they once spared most steps (a median of 64)."""
        run = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return statistics.median(int(line) for line in run.stdout.split())

    plain, kept = faults("plain"), faults("keep")
    assert plain > 500  # the activations came back as fresh pages every step
    assert kept < plain / 10


def test_every_setting_has_one_flag_with_its_default_in_the_help(capsys):
    from dataclasses import fields

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--lr LR initial learning rate (default 0.01)" in text
    for group in ("model:", "images:", "optimisation:", "running:"):
        assert group in text


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_non_finite_or_non_positive_lr_is_refused(data, tmp_path, capsys, value):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--lr", value]) == 2
    assert "--lr must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_progress_in_a_log_is_lines_not_carriage_returns(data, tmp_path, capsys):
    train(tiny(data, tmp_path, epochs=2, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 3 and lines[0].startswith("VGG-A width=0.0625") and lines[2].startswith("epoch 2: train loss")


@pytest.mark.parametrize("config", ["A", "A-LRN", "B", "C", "D", "E"])
def test_every_configuration_learns_from_the_default_initialisation(tmp_path, config):
    """A newcomer's first run: no --init, no weights to start from; the training loss falls."""
    data = write_dataset(tmp_path / "data", {"train": 16, "val": 2})
    cfg = tiny(data, tmp_path / "run", config=config, init=TrainConfig().init, epochs=4, lr=0.02)
    train(cfg)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"], [e["train_loss"] for e in epochs]
    record = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert record["init"] == "he" and "every configuration learns" in record["init_reason"]


def test_class_folders_alone_are_not_their_own_validation_split(data, tmp_path):
    with pytest.raises(UserError, match=r"no validation split \(val/ or test/\).*--val-split"):
        train(tiny(data / "train", tmp_path / "run"))
    assert train(tiny(data / "train", tmp_path / "held", val_split=8)) is not None


def test_a_validation_split_without_a_class_folder_names_it(tmp_path):
    root = write_dataset(tmp_path / "data", {"train": 4, "val": 1})
    shutil.rmtree(root / "val" / "class2")
    with pytest.raises(UserError, match=r"validation lacks the classes class2 \(a class without validation images "
                                        r"needs an empty folder\)"):
        train(tiny(root, tmp_path / "run", batch_size=4))
    shutil.copytree(root / "val" / "class1", root / "val" / "other")  # and one more: both named in one line
    with pytest.raises(UserError, match=r"validation lacks the classes class2 \(a class without validation "
                                        r"images needs an empty folder\); validation has class folders training "
                                        r"lacks: other$"):
        train(tiny(root, tmp_path / "run", batch_size=4))


def test_class_folders_named_in_two_unicode_spellings_are_named_so_by_train_and_features(tmp_path, capsys):
    """macOS writes folder names decomposed: "Ü" as U and a combining diaeresis. The same-looking names differ; the
    error says so in ASCII, where printing both as they are would show one name twice."""
    import unicodedata

    root = write_dataset(tmp_path / "data", {"train": 4, "val": 1})
    composed = unicodedata.normalize("NFC", "Über")
    for split in ("train", "val"):
        spelling = composed if split == "train" else unicodedata.normalize("NFD", composed)
        (root / split / "class2").rename(root / split / spelling)
    said = r"'\\xdcber' and 'U\\u0308ber' are one name in two Unicode spellings \(rename one\)"
    with pytest.raises(UserError, match=said):
        train(tiny(root, tmp_path / "run", batch_size=4))
    assert main(["features", "--weights", str(write_classifier(tmp_path / "net.pt", classes=4)), "--data", str(root),
                 "--out", str(tmp_path / "f.npz"), "--device", "cpu", "--workers", "0", "--no-progress"]) == 2
    assert re.search(said, capsys.readouterr().err)


def test_a_flat_validation_folder_without_a_class_says_where_its_classes_come_from(tmp_path):
    synsets = ["n00000001", "n00000002", "n00000003"]
    for i in range(12):
        save(photo(40, 40, seed=i), tmp_path / "data" / "train" / synsets[i % 3] / f"{i}.jpg")
    for i in range(4):
        save(photo(40, 40, seed=i), tmp_path / "data" / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    (tmp_path / "data" / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{synsets[i % 2]} 1 1 9 9\n" for i in range(4)))
    with pytest.raises(UserError, match=r"validation lacks the classes n00000003 \(list every training class in a "
                                        r"synset list beside it, LOC_synset_mapping\.txt\)"):
        train(tiny(tmp_path / "data", tmp_path / "run", batch_size=4))


def test_tiny_imagenet_s_own_layout_trains_its_val_images_labelled_by_val_annotations(tmp_path):
    from verydeep.data.splits import open_split

    synsets, root = ["n01443537", "n01629819", "n01641577"], tmp_path / "tiny"
    for i in range(12):
        save(photo(40, 40, seed=i), root / "train" / synsets[i % 3] / "images" / f"{synsets[i % 3]}_{i}.JPEG")
    for synset in synsets:
        (root / "train" / synset / f"{synset}_boxes.txt").write_text("")
    for i in range(6):
        save(photo(40, 40, seed=20 + i), root / "val" / "images" / f"val_{i}.JPEG")
    (root / "val" / "val_annotations.txt").write_text("".join(f"val_{i}.JPEG\t{synsets[(i + 1) % 3]}\t0\t0\t9\t9\n"
                                                              for i in range(6)))
    (root / "words.txt").write_text("n01443537\tgoldfish\nn01629819\tsalamander\nn01641577\tbullfrog\n")
    val = open_split(root / "val", None)
    assert val.classes == synsets and val.targets == [(i + 1) % 3 for i in range(6)]
    assert val.class_names == ["goldfish", "salamander", "bullfrog"]  # words.txt, at the root beside train/
    train(tiny(root, tmp_path / "run", batch_size=4))
    record = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert record["classes"] == synsets and record["validation"]["images"] == 6


def test_a_step_none_of_whose_images_could_be_read_logs_no_loss(tmp_path):
    data = write_dataset(tmp_path / "data", {"train": 4, "val": 2})
    for path in (data / "train" / "class3").glob("*.png"):
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = train(tiny(data, tmp_path / "run", batch_size=1))  # 16 steps of one image, 4 of them unreadable
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps, epoch = [r for r in records if r["kind"] == "step"], records[-1]
    assert summary.steps == 16 and epoch["skipped"] == 4 and epoch["precision"] == "float32"  # as it ran
    assert len(steps) == 12 and all(r["loss"] > 0 and r["img_s"] > 0 for r in steps)


def test_the_default_training_scale_follows_another_crop_as_256_follows_224(data, tmp_path, capsys):
    """S = 256 is for crops of 224 (Sec. 3.1): for crops of 32 without --scale, S = 36, not crops of an eighth of
    the image, from random weights or from weights of another crop; a scale given, or the default crop, keeps its
    own."""
    common = ["train", "--data", str(data), "--width", "0.0625", "--epochs", "1", "--batch-size", "16", "--workers",
              "0", "--no-progress", "--limit-train", "16", "--limit-val", "4"]
    for flags, scale in ((["--crop", "32"], [36, 36]), (["--crop", "64"], [73, 73]),
                         (["--crop", "32", "--scale", "40:48"], [40, 48])):
        run = tmp_path / "-".join(flags)
        assert main([*common, *flags, "--out", str(run)]) == 0
        assert json.loads((run / "recipe.json").read_text())["scale"] == scale
    from_64 = tmp_path / "from-64"  # weights of crops of 64 trained on crops of 32: their S is not for 32 either
    assert main([*common, "--weights", str(tmp_path / "--crop-64"), "--crop", "32", "--out", str(from_64)]) == 0
    assert json.loads((from_64 / "recipe.json").read_text())["scale"] == [36, 36]
    assert main([*common, "--crop", "64", "--scale", "256", "--out", str(tmp_path / "s256")]) == 0
    for restated in ([], ["--crop", "64"]):  # weights of crops of 64 trained at S = 256 bring their S, 256
        tuned = tmp_path / f"tuned{len(restated)}"
        assert main([*common, "--weights", str(tmp_path / "s256"), *restated, "--out", str(tuned)]) == 0
        assert json.loads((tuned / "recipe.json").read_text())["scale"] == [256, 256]
    capsys.readouterr()
    assert TrainConfig().scale == (256, 256)  # the crop of 224's own
    huge = TrainConfig(data=str(data), out=str(tmp_path / "huge"), crop=1856)
    assert checked_settings(huge, {"crop": "--crop"})[0].scale == (2048, 2048)  # at most the largest side


def test_a_call_from_python_is_untouched_by_the_callers_modes_and_leaves_its_rng(data, tmp_path):
    """From a notebook: the caller's bf16 autocast does not turn an fp32 run into bf16, nor its no_grad leave the
    run without gradients; the caller's RNG continues as if train() had not drawn; inference_mode, which nothing
    can lift, is refused in one line."""
    reference = train(tiny(data, tmp_path / "plain"))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert train(tiny(data, tmp_path / "modes")).best == reference.best
    for name, value in weights(tmp_path / "plain").items():
        assert torch.equal(value, weights(tmp_path / "modes")[name]), name
    import random

    def draws() -> tuple[list[float], float, float]:
        return torch.rand(3).tolist(), random.random(), float(np.random.random())

    for resume in (False, True):  # a resume sets every global RNG from its checkpoint (saved under other seeds)
        torch.manual_seed(1234 + resume), random.seed(1234 + resume), np.random.seed(1234 + resume)
        expected = draws()
        torch.manual_seed(1234 + resume), random.seed(1234 + resume), np.random.seed(1234 + resume)
        train(tiny(data, tmp_path / "rng", epochs=1 + resume, resume=resume))
        assert draws() == expected, resume
    with torch.inference_mode(), pytest.raises(UserError, match=r"^training needs gradients, which "
                                                                r"torch.inference_mode\(\) around the call rules out"):
        train(tiny(data, tmp_path / "inference"))


def test_a_resume_refused_lets_the_run_go_though_its_error_is_kept(data, tmp_path):
    """A notebook keeps the last exception, and with it the refused Trainer: its lock on the run must not stay
    with it, or the corrected call would be refused as another training writing the run."""
    from verydeep.io.checkpoint import save_checkpoint

    train(tiny(data, tmp_path, epochs=2, checkpoint_every=1, stop_after_steps=2))
    last = tmp_path / "checkpoints" / "last.pt"
    good = load_checkpoint(last)
    save_checkpoint({**good, "micro_batch": 0}, last)
    with pytest.raises(UserError, match="micro_batch is 0") as refused:
        train(tiny(data, tmp_path, epochs=2, resume=True))
    save_checkpoint(good, last)
    assert train(tiny(data, tmp_path, epochs=2, resume=True)).epochs == 2 and refused.value is not None
