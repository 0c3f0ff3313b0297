"""Testing on several processes (Sec. 3.3's data parallelism, verydeep.runtime.sharding): ``eval``, ``features`` and
``localize eval`` on two gloo processes under torchrun give one process's JSON, posteriors and descriptors,
with shards of uneven size, images of several sizes and an unreadable image skipped by name; only the first
process prints and writes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import photo, save, write_dataset

from verydeep.cli import main
from verydeep.data import IMAGENET
from verydeep.errors import UserError
from verydeep.eval import feature_passes as passes
from verydeep.io.checkpoint import model_from_recipe, save_checkpoint
from verydeep.runtime import sharding

#: Processes, servers or whole training runs: minutes on two cores (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

CLASSES = ["class0", "class1", "class2", "class3"]
RECIPE = {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
          "scale": [32, 32], "preprocess": IMAGENET.to_dict(), "classes": CLASSES, "class_names": CLASSES}
#: Three image sizes (so batches are grouped by size at every Q) and a file that does not decode.
SIZES = [(36, 36), (48, 40), (40, 52)]
BROKEN = b"\x89PNG\r\n\x1a\n truncated"


def share(rank: int, port: int, out: Path) -> None:
    """One of two processes: its share of five items, every process's rows gathered (a float and a bool
    array, of uneven shares), counts summed, names joined, the first's choice taken."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with sharding.process_group("cpu"):
        mine = sharding.shard(range(5))
        values, done = np.full((5, 2), np.nan, np.float32), np.zeros(5, dtype=bool)
        values[mine], done[mine] = [[i, rank] for i in mine], True
        sharding.gather_rows(values, mine)
        sharding.gather_rows(done, mine)
        found = {"mine": mine, "rounds": sharding.rounds(5), "values": values.tolist(), "done": done.tolist(),
                 "total": sharding.total(torch.tensor([1.0, rank])).tolist(),
                 "union": sorted(sharding.union({f"skipped-by-{rank}"})), "agreed": sharding.agreed(rank)}
    (out / f"{rank}.json").write_text(json.dumps(found))


def test_two_processes_share_the_items_and_gather_every_row(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(share, args=(port, tmp_path), nprocs=2)
    first, second = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert first["mine"] == [0, 2, 4] and second["mine"] == [1, 3] and first["rounds"] == second["rounds"] == 3
    for found in (first, second):  # each process holds every row, as its owner computed it
        assert found["values"] == [[i, i % 2] for i in range(5)] and all(found["done"])
        assert found["total"] == [2.0, 1.0] and found["union"] == ["skipped-by-0", "skipped-by-1"]
        assert found["agreed"] == 0
    assert sharding.shard(range(5)) == list(range(5)) and sharding.rounds(5) == 5  # one process: all of it


def fail_on_one(rank: int, port: int, out: Path) -> None:
    """One of two processes; the second meets an error in its share of the work, the first none."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with sharding.process_group("cpu"):
        try:
            with sharding.failing_together():
                if rank == 1:
                    raise UserError("img.png: unreadable image")
            said = "no error"
        except UserError as error:
            said = str(error)
        total = sharding.total(torch.tensor([1.0])).item()  # the group still works for what follows
    (out / f"{rank}.txt").write_text(f"{said} {total}")


def test_an_error_in_one_process_s_share_is_every_process_s(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fail_on_one, args=(port, tmp_path), nprocs=2)
    assert [(tmp_path / f"{rank}.txt").read_text() for rank in (0, 1)] == ["img.png: unreadable image 2.0"] * 2


def torchrun(*argv: str) -> str:
    """``verydeep ARGV`` on two gloo processes under torchrun, one thread each; its standard output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "verydeep.cli", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """This process computes as each of torchrun's does: on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_process(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``verydeep ARGV`` in this process; its standard output."""
    capsys.readouterr()
    with one_thread():
        assert main(list(argv)) == 0
    return capsys.readouterr().out


def last_json(out: str) -> dict:
    """The one JSON line of ``out`` (there must be exactly one: the first process's)."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def net(path: Path, seed: int = 0, gain: float = 1.0, **recipe) -> Path:
    """A random width-1/16 net A of 32-pixel crops, its last layer's weights times ``gain``, saved as a checkpoint."""
    torch.manual_seed(seed)
    recipe = {**RECIPE, **recipe}
    state = model_from_recipe(recipe).state_dict()
    state["classifier.6.weight"] *= gain
    return save_checkpoint({"model": state, "recipe": recipe}, path)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """val/ of 4 classes x 3 images of three sizes and an unreadable one: seven batches of 2 at each Q,
    so the two processes' shares differ in size."""
    root = tmp_path_factory.mktemp("images")
    for i in range(12):
        save(photo(*SIZES[i % 3], seed=i), root / "val" / CLASSES[i % 4] / f"{i}.png")
    (root / "val" / "class1" / "broken.png").write_bytes(BROKEN)
    return root


def test_eval_dense_and_multicrop_at_two_scales_on_two_processes_is_one_process(images, tmp_path, capsys):
    checkpoint = net(tmp_path / "net.pt")
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(images), "--scales", "32,40", "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--no-progress", "--json"]
    one = last_json(one_process(capsys, *argv, "--out", str(tmp_path / "one")))
    two = last_json(torchrun(*argv, "--out", str(tmp_path / "two")))
    assert one["skipped"] == two["skipped"] == [str(images / "val" / "class1" / "broken.png")]
    assert {row["protocol"] for row in one["rows"]} == {"dense", "multicrop", "dense+multicrop"}
    assert one["images"] == 12 and 0 < one["rows"][0]["top1_error"] < 1
    del one["timing"], two["timing"]
    assert two == one
    assert json.loads((tmp_path / "two" / "results.json").read_text())["rows"] == one["rows"]
    with np.load(tmp_path / "one" / "posteriors.npz") as a, np.load(tmp_path / "two" / "posteriors.npz") as b:
        assert sorted(a.files) == sorted(b.files) and "net0_multicrop_Q40" in a.files
        assert (a["paths"] == b["paths"]).all() and (a["targets"] == b["targets"]).all()
        for key in a.files:
            if key.startswith("net"):
                np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)  # NaN rows (unread) in both


def test_features_on_two_processes_continue_one_processs_and_merge_at_every_save(tmp_path, capsys, monkeypatch):
    """One process stopped (Ctrl-C) after three batches leaves OUT.partial; two processes continue it, merging
    their work at every save, and end with the descriptors of one uninterrupted process."""
    root = tmp_path / "photos"
    for i in range(9):
        part, label = ("train", "test")[i % 2], f"c{i % 3 % 2}"
        save(photo(*SIZES[i % 3], seed=i), root / part / label / f"{i}.png")
    (root / "test" / "c0" / "broken.png").write_bytes(BROKEN)
    source = net(tmp_path / "net.pt")
    argv = ["features", "--weights", str(source), "--data", str(root), "--scales", "32,40", "--batch-size", "2",
            "--checkpoint-every", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--no-progress"]
    one_process(capsys, *argv, "--out", str(tmp_path / "one.npz"))
    describe, calls = passes.describe_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        describe(*args, **kwargs)

    monkeypatch.setattr(passes, "describe_batch", interrupted)
    with one_thread():
        assert main([*argv, "--out", str(tmp_path / "two.npz")]) == 130
    with np.load(tmp_path / "two.npz.partial") as partial:
        assert 3 <= partial["done"][0].sum() < 10 and not partial["done"][1].any()  # three batches done
    out = torchrun(*argv, "--out", str(tmp_path / "two.npz"))
    assert out.count("two.npz:") == 1 and "9 images" in out and "1 skipped" in out
    assert not (tmp_path / "two.npz.partial").exists()
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            if key == "features":
                assert a[key].shape == (9, 2 * 4096 // 16)
                np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
            else:
                assert (a[key] == b[key]).all(), key
        assert list(b["skipped"]) == [str(root / "test" / "c0" / "broken.png")]


@pytest.fixture(scope="module")
def boxed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Data with a box in every image (12 validation images), a random SCR localisation net whose boxes
    scatter around the true one, and a random classifier of the same classes."""
    root = write_dataset(tmp_path_factory.mktemp("boxed"), {"train": 1, "val": 3})
    lines = [f"{path.relative_to(root).as_posix()} 8 6 35 33" for path in sorted(root.rglob("*.png"))]
    (root / "boxes.txt").write_text("\n".join(lines) + "\n")
    nets = tmp_path_factory.mktemp("nets")
    code = [21.5 / 44, 19.5 / 40, 28 / 44, 28 / 40]  # the true box as (centre, size) in image sides
    locate = net(nets / "locate.pt", seed=1, gain=1000, task="localisation-scr", outputs=4,
                 box_targets="standardised", box_code_mean=code, box_code_std=[1.0] * 4)
    return root, locate, net(nets / "classify.pt", seed=2)


@pytest.mark.parametrize("protocol", [["--batch-size", "5"], ["--protocol", "dense", "--scales", "32,40",
                                                              "--batch-size", "2"]], ids=["center", "dense"])
def test_localize_eval_on_two_processes_is_one_process(boxed, protocol, capsys):
    root, locate, classifier = boxed
    argv = ["localize", "eval", "--checkpoint", str(locate), "--data", str(root), "--device", "cpu", "--json",
            *protocol, *(["--classifier", str(classifier)] if "dense" in protocol else [])]
    one = last_json(one_process(capsys, *argv))
    assert one["images"] == 12 and 0 < one["localisation_error"] < 100  # some boxes right, some wrong
    assert last_json(torchrun(*argv)) == one
