"""DDP (Sec. 3.3): two CPU processes under torchrun reach the parameters of one process on the same global batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from conftest import tiny, weights, write_dataset

from verydeep.train import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", {"train": 8, "val": 2})
    options = dict(dropout=0.0, epochs=1, micro_batch=4, checkpoint_every=0)  # 2 steps of 16, fp32
    train(tiny(data, tmp_path / "one", **options))
    flags = ["--data", str(data), "--out", str(tmp_path / "two"), "--width", "0.0625", "--crop", "32",
             "--scale", "32:40", "--batch-size", "16", "--micro-batch", "4", "--init", "xavier", "--lr", "0.05",
             "--epochs", "1", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--patience", "100",
             "--dropout", "0", "--no-progress"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "verydeep.cli", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
