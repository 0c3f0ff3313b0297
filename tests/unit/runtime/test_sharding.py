"""The process group of ``torchrun``'s processes: a process of it lost is one line in those left."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from torch import distributed as dist

from verydeep.runtime.sharding import lost_process

#: One process of two: the second leaves the group while the first waits for it in a collective.
PROCESS = """
import os, sys, torch
from verydeep.errors import UserError
from verydeep.runtime import sharding
try:
    with sharding.process_group("cpu"):
        if os.environ["RANK"] == "1":
            os._exit(3)  # a crash, a kill -9: no word to the others
        sharding.total(torch.ones(1, dtype=torch.float64))
except UserError as error:
    print(error, file=sys.stderr)
    sys.exit(2)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="this build of torch has no torch.distributed")
def test_a_process_lost_from_the_group_is_one_line_in_the_one_left(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS], stderr=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    try:
        errors = [process.communicate(timeout=120)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [2, 3]
    lines = errors[0].strip().splitlines()
    assert len(lines) == 1 and re.match(r"another process of this run stopped \(.*Connection (closed|reset) by peer",
                                        lines[0]), errors[0]  # gloo's words, whichever way it found out
    assert lines[0].endswith("so this one stops too; what the run had written stands (train --resume continues from "
                             "its last checkpoint)")


def test_only_a_backends_word_of_a_process_gone_counts_as_one_lost():
    assert lost_process(RuntimeError("[/x/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer"))
    assert lost_process(dist.DistBackendError("NCCL error: remote process exited or there was a network error"))
    assert not lost_process(RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"))  # a bug
    # a process stuck elsewhere, not gone: a bug whose traceback says where
    assert not lost_process(RuntimeError("[/x/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                                         "5000ms for recv operation to complete"))
    assert not lost_process(dist.DistBackendError("Watchdog caught collective operation timeout"))
