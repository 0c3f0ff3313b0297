"""The CPU allocator keeps freed memory for reuse (``runtime.memory.keep_freed_memory``): large blocks too, with the
same results."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest

#: A training step whose weight gradient (64 MiB, above glibc's 32 MiB cap of the mapping threshold) is
#: allocated afresh each step; prints each step's page faults and loss, then the weights' sum.
STEPS = """
import ctypes, resource, sys, torch
from verydeep.runtime.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # the mapping threshold at its cap alone: blocks above it still mapped afresh
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-1, 2**31 - 1) and libc.mallopt(-3, 32 << 20)  # M_TRIM_, M_MMAP_THRESHOLD
torch.set_num_threads(1)  # every allocation from this thread
torch.manual_seed(0)
fc = torch.nn.Linear(4096, 4096)
x = torch.randn(8, 4096)
optimizer = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9)
def step():
    optimizer.zero_grad(set_to_none=True)
    loss = fc(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss.item()
for _ in range(2):  # warm-up: the heap's high-water mark
    step()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss = step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, loss.hex())
print(fc.weight.double().sum().item().hex())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_large_blocks_are_reused_with_the_same_results() -> None:
    """A 64 MiB gradient each step: with the threshold alone, thousands of fresh pages a step; kept, next to
    none; the losses and the weights bit for bit the same."""

    def run(mode: str) -> tuple[float, list[str]]:
        done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        *steps, weights = done.stdout.split("\n")[:-1]
        faults = statistics.median(int(line.split()[0]) for line in steps)
        return faults, [line.split()[1] for line in steps] + [weights]

    (mapped, mapped_results), (kept, kept_results) = run("threshold"), run("keep")
    assert mapped > 8000  # 16,384 pages of 4 KiB a gradient
    assert kept < mapped / 10
    assert kept_results == mapped_results
