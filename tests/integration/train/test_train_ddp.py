"""DDP (Sec. 3.3): two CPU processes under torchrun reach the parameters of one process on the same global batches,
with the paper's dropout too, and a run of two processes resumed on one ends where one process ends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny, weights, write_dataset

from verydeep.io.checkpoint import load_checkpoint, save_checkpoint
from verydeep.train import train

#: Processes, servers or whole training runs: minutes on two cores (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(data: Path, out: Path, dropout: float, *extra: str, script: Path | None = None) -> None:
    """``verydeep train`` on two gloo processes with :func:`conftest.tiny`'s settings, 2 steps of 16 an epoch (fp32
    unless ``extra`` gives --precision); ``script`` runs the command line instead of ``-m verydeep.cli``."""
    precision = [] if "--precision" in extra else ["--precision", "fp32"]
    flags = ["--data", str(data), "--out", str(out), "--width", "0.0625", "--crop", "32", "--scale", "32:40",
             "--batch-size", "16", "--micro-batch", "4", "--init", "xavier", "--lr", "0.05", "--epochs", "1",
             "--workers", "0", *precision, "--device", "cpu", "--patience", "100", "--dropout",
             str(dropout), "--no-progress", *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *([str(script)] if script else ["-m", "verydeep.cli"]), "train",
               *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_weights(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)


def test_two_gloo_processes_match_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", {"train": 8, "val": 2})
    options = dict(dropout=0.0, epochs=1, micro_batch=4, checkpoint_every=0)  # 2 steps of 16, fp32
    train(tiny(data, tmp_path / "one", **options))
    torchrun_train(data, tmp_path / "two", 0.0)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))


def test_processes_that_would_choose_other_precisions_train_in_the_first_one_s(tmp_path):
    """``--precision auto`` is measured (or set) on each machine: a second process that would pick bf16 trains in
    the first one's fp32, as one process does, not half of each batch in another precision."""
    data = write_dataset(tmp_path / "data", {"train": 8, "val": 2})
    train(tiny(data, tmp_path / "one", dropout=0.0, epochs=1, micro_batch=4, checkpoint_every=0))  # fp32
    launcher = tmp_path / "launch.py"  # each process its own machine's choice: fp32 on the first, bf16 on the second
    launcher.write_text("import os, sys\n"
                        "os.environ['VERYDEEP_PRECISION'] = 'fp32' if os.environ['RANK'] == '0' else 'bf16'\n"
                        "from verydeep.cli import main\n"
                        "sys.exit(main(sys.argv[1:]))\n")
    torchrun_train(data, tmp_path / "two", 0.0, "--precision", "auto", script=launcher)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))


def test_with_dropout_two_processes_match_one_and_resume_on_one(tmp_path):
    """Each image's dropout masks come from its own seed, so they are the same whichever process or micro-batch
    draws them: two processes equal one at the paper's dropout 0.5, and so does a run of two processes stopped
    after a step and resumed on one."""
    data = write_dataset(tmp_path / "data", {"train": 8, "val": 2})
    options = dict(dropout=0.5, epochs=1, micro_batch=4, checkpoint_every=1)  # 2 steps of 16, fp32
    train(tiny(data, tmp_path / "one", stop_after_steps=1, **options))
    torchrun_train(data, tmp_path / "two", 0.5, "--checkpoint-every", "1", "--stop-after-steps", "1")
    assert load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["world"] == 2
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))  # step 1 on two processes
    for run in ("one", "two"):
        assert train(tiny(data, tmp_path / run, resume=True, **options)).steps == 2
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))  # step 2 of both on one process


def test_a_resume_on_another_number_of_processes_draws_the_same_dropout_masks(data, tmp_path):
    """Bitwise, at the paper's dropout 0.5: a one-process checkpoint relabelled as two processes' reseeds the
    processes' global RNG when resumed on one, and ends bitwise where the plain resume ends, since each
    image's masks come from its own seed, not from a process's RNG."""
    options = dict(dropout=0.5, epochs=2, checkpoint_every=2)  # 4 steps of 16 an epoch
    train(tiny(data, tmp_path / "one", stop_after_steps=3, **options))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    last = tmp_path / "two" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    save_checkpoint({**state, "world": 2, "rng": state["rng"] * 2}, last)
    for run in ("one", "two"):
        assert train(tiny(data, tmp_path / run, resume=True, **options)).steps == 8
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.equal(value, two[key]) for key, value in one.items())
