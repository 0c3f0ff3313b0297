"""Runs survive what happens to real runs: kill -9 at any moment (in checkpoint writes too), full and
read-only disks, a process of a torchrun job dying. ``VERYDEEP_RELIABILITY=full`` (``make reliability``)
runs the longer series; ``pytest -s`` shows the figures."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny, weights, write_dataset

import verydeep
from verydeep.errors import UserError
from verydeep.io.checkpoint import load_checkpoint
from verydeep.train import train
from verydeep.train.recipe import TrainConfig

#: Processes, servers or whole training runs: minutes on two cores (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

FULL = os.environ.get("VERYDEEP_RELIABILITY") == "full"

#: Runs ``verydeep`` with faults injected by the test: SIGKILL at the N-th file replacement, i.e. inside
#: an atomic write, after the temporary file is written and before it replaces the old one
#: (VERYDEEP_KILL_AT_WRITE=N); SIGKILL of rank 1 after its N-th checkpoint, on torchrun's first attempt
#: only, leaving a file ``killed-rank1`` (VERYDEEP_KILL_RANK1_AT=N); a pause in every training step, so
#: that a kill at a random moment lands among the steps (VERYDEEP_STEP_SECONDS).
HARNESS = """
import os, signal, sys, time
from pathlib import Path
import verydeep.io.atomic as atomic
from verydeep.train.checkpointing import Checkpoints
from verydeep.train.step import Stepper

writes = 0
real_replace = os.replace

def replace_or_die(src, dst):
    global writes
    writes += 1
    if writes == int(os.environ.get("VERYDEEP_KILL_AT_WRITE", 0)):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

atomic.os.replace = replace_or_die
real_save_last = Checkpoints.save_last
saves = 0

def save_last_or_die(self, state):
    global saves
    real_save_last(self, state)
    saves += 1
    first_try = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_try and self.procs.rank == 1 and saves == int(os.environ.get("VERYDEEP_KILL_RANK1_AT", 0)):
        (self.run_dir / "killed-rank1").touch()
        os.kill(os.getpid(), signal.SIGKILL)

Checkpoints.save_last = save_last_or_die
real_micro_step = Stepper.micro_step

def slow_micro_step(self, *args, **kwargs):
    time.sleep(float(os.environ.get("VERYDEEP_STEP_SECONDS", 0)))
    return real_micro_step(self, *args, **kwargs)

Stepper.micro_step = slow_micro_step
from verydeep.cli import main

sys.exit(main())
"""

FLAGS = ["--width", "0.0625", "--crop", "32", "--scale", "32:40", "--batch-size", "16", "--init", "xavier",
         "--lr", "0.05", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--patience", "100",
         "--checkpoint-every", "1", "--no-progress"]


@pytest.fixture
def harness(tmp_path: Path) -> Path:
    path = tmp_path / "harness.py"
    path.write_text(HARNESS)
    return path


def run_cli(harness: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(harness), *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def steps_logged(run: Path) -> int:
    """The last step in ``metrics.jsonl`` (a line cut by the kill does not count)."""
    steps = [0]
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        steps.append(record["step"] if record["kind"] == "step" else 0)
    return max(steps)


def kill_at_random(harness: Path, command: list[str], run: Path, rng: random.Random) -> tuple[bool, int]:
    """Start a run and SIGKILL it after a random delay; returns (killed before it ended, steps lost)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VERYDEEP_STEP_SECONDS": "0.15"}
    process = subprocess.Popen([sys.executable, str(harness), *command], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    time.sleep(rng.uniform(1.0, 4.0))  # start-up takes a second or two; then a step every 0.15 s or so
    killed = process.poll() is None
    process.kill()
    process.wait()
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["step"] if (run / "checkpoints/last.pt").is_file() else 0
    return killed, max(0, steps_logged(run) - saved)


def test_kill_9_at_any_moment_then_resume_ends_bitwise_equal(tmp_path, harness):
    data = write_dataset(tmp_path / "data", {"train": 16, "val": 2})
    epochs = 6 if FULL else 3
    run = tmp_path / "killed"
    command = ["train", "--data", str(data), "--out", str(run), *FLAGS, "--epochs", str(epochs)]
    straight = run_cli(harness, [*command[:3], "--out", str(tmp_path / "straight"), *command[5:]])  # same settings
    assert straight.returncode == 0, straight.stderr[-2000:]
    rng = random.Random(0)
    write_kills = [3, 7, 12, 20] if FULL else [3, 9]  # the N-th checkpoint write of an attempt
    timer_kills = 12 if FULL else 3
    lost, kills = [], 0
    for n in write_kills:
        first = not (run / "checkpoints" / "last.pt").is_file()
        done = run_cli(harness, [*command, *([] if first else ["--resume"])], {"VERYDEEP_KILL_AT_WRITE": str(n)})
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        kills += 1
        assert list((run / "checkpoints").glob(".*.tmp")), "the kill should leave a half-done write behind"
    for _ in range(timer_kills):
        killed, steps = kill_at_random(harness, [*command, "--resume"], run, rng)
        kills += killed
        lost.append(steps)
    final = run_cli(harness, [*command, "--resume"])
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list(run.rglob(".*.tmp"))  # what the kills left half-written is gone
    straight, resumed = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(value, resumed[key]) for key, value in straight.items())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 4 * epochs + 1))
    print(f"\nreliability: {kills} kill -9 survived ({len(write_kills)} inside checkpoint writes), final weights "
          f"bitwise equal to an uninterrupted run; steps lost per timed kill: {lost} (checkpoint every step)")


def test_a_full_disk_or_read_only_folder_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    train(tiny(data, tmp_path, epochs=1))
    before = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    import verydeep.io.atomic as atomic
    import verydeep.io.checkpoint as checkpoint

    def full_disk(state, path):  # half the file is written, then the disk is full
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    no_space = r"epoch-0002\.pt: cannot be written .No space left on device.; the previous file is intact"
    with pytest.raises(UserError, match=no_space):
        train(tiny(data, tmp_path, epochs=2, resume=True))
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match="cannot be written .Read-only file system."):
        train(tiny(data, tmp_path, epochs=2, resume=True))
    monkeypatch.undo()
    real_open = open

    def full_log(path, mode="r", *args, **kwargs):  # the log's append, not the checkpoints' writes
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_log)
    with pytest.raises(UserError, match=r"metrics\.jsonl: cannot be written .No space left on device.; the last good"):
        train(tiny(data, tmp_path, epochs=2, resume=True))
    monkeypatch.undo()
    after = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert after["step"] == before["step"] and not list(tmp_path.rglob(".*.tmp"))
    assert all(torch.equal(value, after["model"][key]) for key, value in before["model"].items())
    assert train(tiny(data, tmp_path, epochs=2, resume=True)).epochs == 2  # space again: the run goes on
    print("\nreliability: a full disk and a read-only folder during a checkpoint write: one-line errors, "
          "the previous checkpoint intact, the run resumed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not FULL, reason="make reliability (VERYDEEP_RELIABILITY=full) runs it: on a busy 2-core "
                    "machine gloo's re-connection after a restart can stall for minutes")
def test_torchrun_restarts_a_killed_process_from_the_last_checkpoint(tmp_path, harness):
    data = write_dataset(tmp_path / "data", {"train": 8, "val": 2})
    options = dict(dropout=0.0, epochs=2, micro_batch=4, checkpoint_every=1)  # 2 steps of 16 an epoch
    train(tiny(data, tmp_path / "one", **options))
    flags = [*FLAGS, "--data", str(data), "--out", str(tmp_path / "two"), "--epochs", "2", "--micro-batch", "4",
             "--dropout", "0"]
    # more restarts than the one kill needs: on a busy machine gloo's connection set-up after a restart can
    # time out, and torchrun then restarts again, as it would in production
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "3",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(harness), "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VERYDEEP_KILL_RANK1_AT": "2"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    finally:  # torchrun's workers too, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    assert (tmp_path / "two" / "killed-rank1").is_file()  # rank 1 did die, and torchrun went on
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    print("\nreliability: one of 2 torchrun processes killed after its 2nd checkpoint; the restart resumed and "
          "ended with the weights of an uninterrupted run (within 1e-5)")


# ---- each way a run was lost or silently wrong, fixed --------------------------------------------


def test_a_kill_between_the_epoch_files_never_leaves_stale_best_weights(data, tmp_path, monkeypatch):
    import verydeep.train.checkpointing as train_module

    real_export, calls = train_module.export_safetensors, []

    def export_then_die(*args, **kwargs):  # killed after best.pt, before model.safetensors
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_export(*args, **kwargs)

    monkeypatch.setattr(train_module, "export_safetensors", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, tmp_path, epochs=3, lr=0.01, batch_norm=True))
    monkeypatch.undo()
    train(tiny(data, tmp_path, epochs=3, lr=0.01, batch_norm=True, resume=True))
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    exported = verydeep.load(tmp_path / "model.safetensors").model
    assert all(torch.equal(value, best["model"][key]) for key, value in exported.state_dict().items())
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "epoch\"" in line]
    top1 = {r["epoch"]: r["val_top1"] for r in epochs if r["kind"] == "epoch"}
    assert best["epoch"] == max(top1, key=lambda e: (top1[e], -e))  # the first epoch with the best top-1


def test_a_new_run_in_an_old_run_directory_is_refused_or_overwritten(data, tmp_path, capsys):
    from verydeep.cli import main

    train(tiny(data, tmp_path, epochs=2))
    with pytest.raises(UserError, match="holds a run.*--resume.*--overwrite"):
        train(tiny(data, tmp_path, epochs=1))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2  # nothing was touched
    kept = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for refused in (dict(batch_size=1000), dict(val_split=10_000)):  # refused once the data is read
        with pytest.raises(UserError, match="--batch-size 1000|--val-split must be"):
            train(tiny(data, tmp_path, epochs=1, overwrite=True, **refused))
        assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == kept
    train(tiny(data, tmp_path, epochs=1, overwrite=True))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in records) == 1 and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.pt", "epoch-0001.pt", "last.pt"]
    (tmp_path / "file").write_text("x")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "file"), "--crop", "32", "--scale", "32"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_finished_run_says_so_and_does_nothing(data, tmp_path, capsys):
    stopped = train(tiny(data, tmp_path, lr=1e-9, patience=1, max_drops=0, epochs=10))
    assert stopped.stopped == "plateau"
    log = (tmp_path / "metrics.jsonl").read_text()
    again = train(tiny(data, tmp_path, lr=1e-9, patience=1, max_drops=0, epochs=10, resume=True, progress=True))
    assert again.stopped == "plateau" and again.steps == stopped.steps and again.epochs == stopped.epochs
    assert (tmp_path / "metrics.jsonl").read_text() == log and "has finished" in capsys.readouterr().err


def test_a_finished_run_resumed_with_milestones_reports_the_lr_it_ended_with_and_says_so_without_progress(
        data, tmp_path, capsys):
    plateau = dict(patience=TrainConfig.patience)  # tiny's patience would be refused beside the milestones
    ended = train(tiny(data, tmp_path, epochs=2, **plateau))
    again = train(tiny(data, tmp_path, epochs=2, milestones=[1], resume=True, progress=False, **plateau))
    assert (again.stopped, again.epochs, again.lr) == ("epochs", 2, ended.lr) and ended.lr == pytest.approx(0.05)
    assert "the run has finished (--epochs is 2 after epoch 2); nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize("cut", [b'{"kind": "step", "epoch": 2, "st', b'{"kind": "st\xff'])
def test_leftovers_of_a_crash_do_not_block_resume(data, tmp_path, capsys, cut):
    from verydeep.cli import main

    train(tiny(data, tmp_path, epochs=1, checkpoint_every=1))
    (tmp_path / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"\0" * 100)
    (tmp_path / ".tmpX7q2Zk").write_bytes(b"\0" * 100)  # safetensors' own, of model.safetensors
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(cut)  # the crash cut the last line, maybe inside a character
    (tmp_path / "recipe.json").unlink()  # and lost the run record: the checkpoint holds a copy
    assert main(["train", "--out", str(tmp_path), "--resume", "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "damaged record" in err and "metrics.jsonl:" in err
    assert not list(tmp_path.rglob(".*.tmp")) and (tmp_path / "recipe.json").is_file()
    assert not (tmp_path / ".tmpX7q2Zk").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line]
    assert steps == list(range(1, 9))
    (tmp_path / "recipe.json").write_text("{not json")
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    assert "recipe.json: damaged run record" in capsys.readouterr().err


def test_flags_given_with_resume_are_applied_or_refused(data, tmp_path, capsys):
    from verydeep.cli import main

    train(tiny(data, tmp_path, epochs=1))
    assert main(["train", "--out", str(tmp_path), "--resume", "--lr", "0.5"]) == 2
    assert "--lr cannot change when resuming" in capsys.readouterr().err
    for flag in ("--limit-val", "--val-split"):  # they choose the images: named, not the --data they change
        assert main(["train", "--out", str(tmp_path), "--resume", flag, "2"]) == 2
        assert f"{flag} cannot change when resuming" in capsys.readouterr().err
    crop = json.loads((tmp_path / "recipe.json").read_text())["crop"]
    assert main(["train", "--out", str(tmp_path), "--resume", "--crop", str(2 * crop)]) == 2  # not the scale blamed
    assert f"--crop cannot change when resuming {tmp_path} (trained with {crop}, given {2 * crop})" in (
        capsys.readouterr().err)
    assert main(["train", "--out", str(tmp_path), "--resume", "--freeze", "features"]) == 2  # not --weights blamed
    assert "--freeze cannot change when resuming" in capsys.readouterr().err
    recipe = tmp_path / "wider.toml"
    recipe.write_text(f"width = {2 * json.loads((tmp_path / 'recipe.json').read_text())['width']}\n")
    assert main(["train", "--out", str(tmp_path), "--resume", "--recipe", str(recipe)]) == 2  # named by the recipe
    assert f"--recipe {recipe}'s width cannot change when resuming" in capsys.readouterr().err
    recipe.write_text('scale = "96"\n')  # a structured setting's text, compared as the record stores it
    assert main(["train", "--out", str(tmp_path), "--resume", "--recipe", str(recipe)]) == 2
    assert f"--recipe {recipe}'s scale cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--resume", "--scale", "96"]) == 2
    err = capsys.readouterr().err
    assert "--scale cannot change when resuming" in err and "given 96)" in err  # the flag's text as typed
    assert main(["train", "--out", str(tmp_path), "--resume", "--config", "vgg11", "--no-progress"]) == 0  # A's alias
    assert main(["train", "--out", str(tmp_path), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "recipe.json").read_text())["epochs"] == 2  # applied, and recorded


def test_a_torchrun_restart_replaces_the_old_run_that_overwrite_named_and_resumes_its_own(data, tmp_path,
                                                                                           monkeypatch):
    train(tiny(data, tmp_path, epochs=3))  # an old, finished run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a process failed before clearing it
    new = train(tiny(data, tmp_path, epochs=2, overwrite=True))
    assert (new.epochs, new.stopped) == (2, "epochs") and load_checkpoint(tmp_path / "checkpoints" / "last.pt")[
        "recipe"]["epochs"] == 2
    options = dict(epochs=2, overwrite=True, checkpoint_every=1)
    assert train(tiny(data, tmp_path / "b", stop_after_steps=5, **options)).steps == 5
    first_epoch = tmp_path / "b" / "checkpoints" / "epoch-0001.pt"
    written = first_epoch.stat().st_mtime_ns
    assert train(tiny(data, tmp_path / "b", **options)).steps == 8  # its own run: continued from step 5
    assert first_epoch.stat().st_mtime_ns == written  # not trained anew
    derived = dict(options, scale=TrainConfig.scale)  # S not given: 256 scaled with the crop of 32, as recorded
    assert train(tiny(data, tmp_path / "c", stop_after_steps=5, **derived)).steps == 5
    first_epoch = tmp_path / "c" / "checkpoints" / "epoch-0001.pt"
    written = first_epoch.stat().st_mtime_ns
    assert train(tiny(data, tmp_path / "c", **derived)).steps == 8 and first_epoch.stat().st_mtime_ns == written


def test_a_second_training_into_a_run_being_written_is_refused_and_leaves_it(data, tmp_path):
    import subprocess
    import sys

    from verydeep.train.checkpointing import RunLock

    train(tiny(data, tmp_path, epochs=2, checkpoint_every=2, stop_after_steps=7))  # logged past last.pt's step 6
    before, log = ((tmp_path / name).read_bytes() for name in ("checkpoints/last.pt", "metrics.jsonl"))
    code = (f"import sys; from verydeep.train.checkpointing import RunLock; lock = RunLock({str(tmp_path)!r}); "
            "lock.acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another training writes the run now
        for options in (dict(resume=True, epochs=2), dict(overwrite=True)):
            with pytest.raises(UserError, match="another training is writing this run now"):
                train(tiny(data, tmp_path, **options))
        assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
        assert (tmp_path / "metrics.jsonl").read_bytes() == log  # a resume refused cuts nothing from the live log
    finally:
        holder.communicate("")
    assert train(tiny(data, tmp_path, resume=True, epochs=2)).epochs == 2  # its lock gone with it
    lock = RunLock(tmp_path)
    lock.acquire()  # and this process's own trainings released theirs
    lock.release()


def test_a_run_whose_last_checkpoint_is_gone_keeps_its_other_weights_unless_overwritten(data, tmp_path):
    train(tiny(data, tmp_path, epochs=2))
    (tmp_path / "checkpoints" / "last.pt").unlink()
    kept = sorted(p.name for p in tmp_path.rglob("*") if p.suffix in (".pt", ".safetensors"))
    assert "best.pt" in kept and "model.safetensors" in kept
    with pytest.raises(UserError, match="holds a run's weights .* though not checkpoints/last.pt to resume from"):
        train(tiny(data, tmp_path, epochs=1))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.suffix in (".pt", ".safetensors")) == kept
    assert train(tiny(data, tmp_path, epochs=1, overwrite=True)).epochs == 1


def test_resuming_on_other_images_is_refused_on_moved_ones_allowed(data, tmp_path, capsys):
    from verydeep.cli import main

    run = tmp_path / "run"
    train(tiny(data, run, epochs=1))
    names = ("renamed", "fewer", "relabelled", "revalidated", "moved")
    renamed, fewer, relabelled, revalidated, moved = (shutil.copytree(data, tmp_path / name) for name in names)
    (renamed / "train" / "class0").rename(renamed / "train" / "class9")
    (renamed / "val" / "class0").rename(renamed / "val" / "class9")
    (fewer / "train" / "class1" / "0.png").unlink()
    (relabelled / "train" / "class1" / "0.png").rename(relabelled / "train" / "class2" / "99.png")
    (revalidated / "val" / "class1" / "0.png").rename(revalidated / "val" / "class2" / "99.png")
    resume = ["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress", "--data"]
    assert main([*resume, str(renamed)]) == 2
    assert "its classes (class1, class2, class3, class9) are not those" in capsys.readouterr().err
    assert main([*resume, str(fewer)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "63 training images, where" in err and "was trained on 64" in err
    for changed, split in ((relabelled, "training"), (revalidated, "validation")):
        assert main([*resume, str(changed)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"its {split} images (their names or classes) are not those" in err
    assert main([*resume, str(moved)]) == 0
    assert json.loads((run / "recipe.json").read_text())["data"] == str(moved)


def test_resuming_on_a_flat_validation_folder_whose_labels_changed_is_refused(tmp_path, capsys):
    from conftest import photo, save

    from verydeep.cli import main

    synsets, root = ["n00000001", "n00000002"], tmp_path / "data"
    for i in range(8):
        save(photo(40, 40, seed=i), root / "train" / synsets[i % 2] / f"{i}.jpg")
        save(photo(40, 40, seed=10 + i), root / "val" / f"v{i}.jpg")
    labels = root / "val" / "val.txt"
    labels.write_text("".join(f"v{i}.jpg {i % 2}\n" for i in range(8)))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{s} {s}\n" for s in synsets))
    train(tiny(root, tmp_path / "run", batch_size=4))
    labels.write_text("".join(f"v{i}.jpg {(i + 1) % 2}\n" for i in range(8)))  # every image in the other class
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its validation images (their names or classes) are not those" in err


def test_a_bad_value_in_the_run_record_names_the_file_on_resume(data, tmp_path, capsys):
    """Values read from recipe.json are checked naming it; values given as flags name the flag."""
    from verydeep.cli import main

    train(tiny(data, tmp_path, epochs=1))
    record = tmp_path / "recipe.json"
    settings = json.loads(record.read_text())
    resume = ["train", "--out", str(tmp_path), "--resume", "--epochs", "2", "--no-progress"]
    for damage, message in [({"lr": float("nan")}, "lr must be positive; got nan"),
                            ({"milestones": [1, 1]}, "milestones: --milestones 1,1: an epoch is listed twice")]:
        record.write_text(json.dumps({**settings, **damage}, indent=2))
        assert main(resume) == 2
        err = capsys.readouterr().err
        line = next(n for n, text in enumerate(record.read_text().splitlines(), 1)
                    if text.startswith(f'  "{[*damage][0]}"'))
        assert err.count("\n") == 1 and err.startswith(f"verydeep train: error: {record}:{line}: {message}"), err
    record.write_text(json.dumps({key: value for key, value in settings.items() if key != "data"}))
    assert main(resume) == 2
    assert capsys.readouterr().err == (f"verydeep train: error: {record}: names no training data (a damaged run "
                                       "record?); give --data\n")
    record.write_text(json.dumps(settings))
    assert main([*resume, "--micro-batch", "0"]) == 2
    assert capsys.readouterr().err.startswith("verydeep train: error: --micro-batch must be at least 1")


@pytest.mark.parametrize(("damage", "said"), [
    (lambda s: s.update(micro_batch=0), "micro_batch is 0, where the run needs a whole number of at least 1"),
    (lambda s: s.update(epoch=-3), "epoch is -3, where the run needs a whole number of at least 0"),
    (lambda s: s.update(step_in_epoch=3), r"its place \(epoch, step, step_in_epoch\) is \(0, 2, 3\), where the run "
                                          r"needs step = epoch x 4 steps an epoch \+ step_in_epoch <= 4"),
    (lambda s: s["schedule"].update(lr=-1.0), r"schedule lr is -1.0, where the run needs --lr 0.05 divided by 10 for "
                                              "each of its 0 drops"),
    (lambda s: s["schedule"].update(lr=float("nan")), "schedule lr is nan"),
    (lambda s: s["schedule"].update(best=float("nan")), "schedule best is nan"),
    (lambda s: s["schedule"].update(stopped=1), "schedule stopped is 1, where the run needs true or false"),
    (lambda s: s["partial"].update(images=-5.0), "partial is"),
    (lambda s: s.update(rng=[]), "rng is list, where the run needs one RNG state for each of its 1 processes"),
    (lambda s: s.pop("world"), "world is None, where the run needs a whole number of at least 1"),
    (lambda s: s["partial"].update(foo=1.0), "partial is"),
    (lambda s: s.update(rng=[{"x": 1}]), "process 0's RNG state is damaged, where the run needs torch's, Python's"),
    (lambda s: s["rng"][0]["numpy"][1].__setitem__(0, -1), "process 0's RNG state is damaged"),  # beyond uint32
    (lambda s: s["schedule"].update(drops=10**12), "schedule drops is 1000000000000, where the run needs at most one "
                                                   "an epoch, of the 0 done"),
    (lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=5.0),
     r"optimizer group 0's weight_decay is 5.0, where the run needs 0.0005 \(recipe.json\)"),
])
def test_a_checkpoint_whose_numbers_are_out_of_range_or_disagree_with_the_run_is_refused_on_resume(
        data, tmp_path, capsys, damage, said):
    """Every number last.pt places or steers a resumed run by is checked, naming the file: a micro-batch of 0, an lr
    of -1 (gradient ascent), a place beyond the epoch's steps (the rest of it skipped) or an optimizer's decay
    other than the run's would otherwise be taken as they are."""
    from verydeep.cli import main
    from verydeep.io.checkpoint import save_checkpoint

    train(tiny(data, tmp_path, epochs=2, checkpoint_every=1, stop_after_steps=2))
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    damage(state)
    save_checkpoint(state, last)
    assert main(["train", "--out", str(tmp_path), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(f"error: {re.escape(str(last))}: {said}", err), err


def test_non_finite_weights_are_never_saved_nor_loaded(data, tmp_path):
    from verydeep.io.checkpoint import save_checkpoint

    with pytest.raises(UserError, match=r"(loss is|gradients are|weights became) (nan|inf|non-finite)"):
        train(tiny(data, tmp_path, lr=1e30, dropout=0.0, epochs=3, checkpoint_every=1))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(value.isfinite().all() for value in state["model"].values())
    state["model"]["classifier.6.weight"][0, 0] = float("nan")
    save_checkpoint(state, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="nan.pt: weights are not finite"):
        verydeep.load(tmp_path / "nan.pt")


def test_damaged_or_mismatched_weights_are_one_line_errors(data, tmp_path):
    from verydeep.io.checkpoint import save_checkpoint

    train(tiny(data, tmp_path, epochs=1))
    (tmp_path / "random.safetensors").write_bytes(os.urandom(2000))
    with pytest.raises(UserError, match="random.safetensors: not a readable safetensors file"):
        verydeep.load(tmp_path / "random.safetensors")
    cut = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(UserError, match="cut.safetensors: not a readable safetensors file"):
        verydeep.load(tmp_path / "cut.safetensors")
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    del state["model"]["features.0.bias"]
    state["recipe"]["width"] = 1 / 8
    save_checkpoint(state, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="wrong.pt: weights do not fit the model"):
        verydeep.load(tmp_path / "wrong.pt")


def test_weights_from_an_exported_safetensors_and_validation_skips_are_counted(tmp_path):
    data = write_dataset(tmp_path / "data", {"train": 16, "val": 4})
    train(tiny(data, tmp_path / "first", epochs=1))
    (data / "val" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    summary = train(tiny(data, tmp_path / "second", epochs=1, weights=str(tmp_path / "first/model.safetensors")))
    first, second = load_checkpoint(tmp_path / "first/checkpoints/last.pt"), weights(tmp_path / "second")
    assert summary.epochs == 1 and first["model"].keys() == second.keys()
    epoch = [json.loads(line) for line in (tmp_path / "second/metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["val_images"] == 16 and epoch["val_skipped"] == 1
