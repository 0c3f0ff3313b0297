"""run_ahead: work done one item ahead of its consumer, in order, errors raised to the consumer."""

from __future__ import annotations

import threading

import pytest
import torch

from verydeep.runtime.ahead import run_ahead


def test_results_come_in_order_and_each_is_computed_before_the_consumer_asks_for_the_next():
    done: list[int] = []
    seen: list[tuple[int, list[int]]] = []

    def work(i: int) -> torch.Tensor:
        done.append(i)
        return torch.full((2,), i)

    for result in run_ahead(range(5), work, torch.device("cpu")):
        seen.append((int(result[0]), list(done)))
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    # when result i reaches the consumer, item i + 1 has been handed to the worker (and never more than that)
    for i, started in seen:
        assert started[: i + 1] == list(range(i + 1))
        assert len(started) <= i + 2


def test_work_runs_off_the_consumers_thread():
    threads = set(run_ahead(range(3), lambda _: threading.get_ident(), torch.device("cpu")))
    assert threading.get_ident() not in threads


def test_an_error_in_the_work_reaches_the_consumer_after_the_results_before_it():
    def work(i: int) -> int:
        if i == 2:
            raise ValueError("bad item 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 2"):
        for result in run_ahead(range(4), work, torch.device("cpu")):
            got.append(result)
    assert got == [0, 1]


def test_a_consumer_that_stops_early_leaves_no_work_running():
    def work(i: int) -> int:
        return i

    results = run_ahead(iter(range(100)), work, torch.device("cpu"))
    assert next(results) == 0
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("verydeep-ahead")]


def test_no_items_no_results():
    assert list(run_ahead([], lambda i: i, torch.device("cpu"))) == []


@pytest.mark.gpu
def test_on_cuda_the_results_are_the_works_own_and_ready_on_the_callers_stream():
    device = torch.device("cuda")

    def work(i: int) -> torch.Tensor:
        x = torch.full((1024, 1024), float(i), device=device)
        for _ in range(20):  # long enough that the caller would see it unfinished without the stream's wait
            x = x @ torch.eye(1024, device=device)
        return x

    sums = [float(r.sum()) for r in run_ahead(range(4), work, device)]
    assert sums == [float(i * 1024 * 1024) for i in range(4)]
