"""Checkpoints: atomic writes, safe loading, recipe round trip."""

import os
import stat
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import verydeep
from verydeep.errors import UserError
from verydeep.io.atomic import UMASK, _temp_prefix, atomic_write, remove_temp_files
from verydeep.io.checkpoint import (
    export_safetensors,
    load_checkpoint,
    load_weights,
    model_from_recipe,
    save_checkpoint,
)

RECIPE = {"config": "B", "num_classes": 5, "batch_norm": False, "width": 1 / 16, "dropout": 0.5,
          "crop": 32, "scale": [36, 73], "classes": list("abcde")}


def test_round_trip_through_checkpoint_and_safetensors(tmp_path):
    torch.manual_seed(0)
    model = model_from_recipe(RECIPE).eval()
    save_checkpoint({"model": model.state_dict(), "recipe": RECIPE, "epoch": 3}, tmp_path / "c.pt")
    export_safetensors(model, RECIPE, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    for path in (tmp_path / "c.pt", tmp_path / "w.safetensors"):
        net = verydeep.load(path)
        loaded, recipe = net.model, net.recipe
        assert recipe == RECIPE and not loaded.training
        weights = model.state_dict()  # bit for bit; the outputs as close as channels_last allows
        assert all(torch.equal(value, weights[key]) for key, value in loaded.state_dict().items())
        torch.testing.assert_close(loaded(x), model(x))
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_keeps_last_good_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "recipe": RECIPE, "epoch": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(UserError, match=r"last\.pt: cannot be written \(disk full\); the previous file is intact"):
        save_checkpoint({"model": {}, "recipe": RECIPE, "x": Unsaveable()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable verydeep checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), tmp_path / "scripted.pt")  # an `export` output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="scripted.pt: not a readable verydeep checkpoint"):
            load_checkpoint(tmp_path / "scripted.pt")
    assert not caught  # torch's own two-line warning would come before the one-line error
    with pytest.raises(FileNotFoundError, match="no checkpoints/best.pt"):
        load_checkpoint(tmp_path)


def test_an_atomic_write_has_the_permissions_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write(tmp_path / "atomic.txt", lambda tmp: Path(tmp).write_text("x"))
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~UMASK
    exported = export_safetensors(model_from_recipe(RECIPE), RECIPE, tmp_path / "w.safetensors")
    assert stat.S_IMODE(exported.stat().st_mode) == 0o666 & ~UMASK  # safetensors makes its file 0600


def test_a_name_of_up_to_255_bytes_is_written_and_its_leftovers_found(tmp_path):
    """The temporary file beside a file repeats its name cut to fit: a name the file system takes is written."""
    for name in ("r" * 251 + ".pt", "é" * 125 + ".pt", "[x]*" + "r" * 245 + ".pt"):
        path = atomic_write(tmp_path / name, lambda tmp: Path(tmp).write_text("x"))
        assert path.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == [name]
        path.unlink()
        fd, left = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=".tmp", dir=tmp_path)  # a write cut short
        os.close(fd)
        (tmp_path / "other.txt").write_text("y")
        assert remove_temp_files(tmp_path, of=name) == [Path(left)] and [p.name for p in tmp_path.iterdir()] == [
            "other.txt"]
        (tmp_path / "other.txt").unlink()


def test_a_file_where_a_folder_goes_is_named(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    for path in (tmp_path / "runs" / "a" / "results.json", tmp_path / "runs" / "results.json"):
        with pytest.raises(UserError, match=rf"^{path}: cannot be written \({tmp_path / 'runs'}: a file, where a "
                                            r"folder is needed\)$"):
            atomic_write(path, lambda tmp: Path(tmp).write_text("x"))
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_a_class_listed_twice_is_refused_where_a_name_shown_twice_is_not(tmp_path):
    """Each class is one output: a repeated class would score its images against another's output."""
    model = model_from_recipe(RECIPE)
    shown_twice = {**RECIPE, "class_names": ["crane", "crane", "c", "d", "e"]}  # ImageNet's two cranes
    assert load_weights(export_safetensors(model, shown_twice, tmp_path / "ok.safetensors"))[1][
        "class_names"][:2] == ["crane", "crane"]
    twice = {**RECIPE, "classes": list("abcbe")}
    for path, load in ((export_safetensors(model, twice, tmp_path / "w.safetensors"), load_weights),
                       (save_checkpoint({"model": model.state_dict(), "recipe": twice, "epoch": 1}, tmp_path / "c.pt"),
                        load_checkpoint)):
        with pytest.raises(UserError, match=rf"^{path}: recipe classes lists 'b' twice; each class is one output$"):
            load(path)


def test_a_set_of_files_one_of_which_cannot_be_written_leaves_every_file_as_it_was(tmp_path):
    """A name too long or a folder where a file goes is found before any file of the set is replaced."""
    from verydeep.io.atomic import atomic_write_all

    results = tmp_path / "results.json"
    results.write_text("previous")
    (tmp_path / "posteriors.npz").mkdir()
    for bad, reason in ((tmp_path / ("a" * 256), "File name too long"),
                        (tmp_path / "posteriors.npz", "a folder of that name is there")):
        with pytest.raises(UserError, match=rf"^{bad}: cannot be written \({reason}\)$"):
            atomic_write_all({results: lambda tmp: Path(tmp).write_text("new"),
                              bad: lambda tmp: Path(tmp).write_text("x")})
        assert results.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == [
            "posteriors.npz", "results.json"]
    with pytest.raises(UserError, match=r"cannot be written \(File name too long\)$"):
        atomic_write(tmp_path / ("f" * 300) / "x.json", lambda tmp: Path(tmp).write_text("x"))


def test_a_set_cut_short_between_its_renames_leaves_no_temporary_file_and_the_next_write_clears_old_ones(
        tmp_path, monkeypatch):
    from verydeep.io import atomic

    left = tmp_path / ".results.md.k1ll3d00.tmp"  # what a kill during an earlier write of results.md left
    left.write_text("half")
    renames = []

    def interrupted(source, target):
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt  # Ctrl-C between the two renames
        os.rename(source, target)

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    writes = {tmp_path / name: lambda tmp: Path(tmp).write_text("new") for name in ("results.json", "results.md")}
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_all(writes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # the old leftover and the new temp gone


def test_a_write_that_fails_for_space_in_torch_s_words_says_the_disk_is_full(tmp_path, monkeypatch):
    from verydeep.io import atomic

    def torch_full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 78016 vs 77904")

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: shutil_usage(total=10, used=10, free=0))
    with pytest.raises(UserError, match=r"last\.pt: cannot be written \(No space left on device\); the previous"):
        atomic.atomic_write(tmp_path / "last.pt", torch_full)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: shutil_usage(total=10, used=0, free=10 << 30))
    with pytest.raises(UserError, match=r"cannot be written \(\[enforce fail at inline_container"):
        atomic.atomic_write(tmp_path / "last.pt", torch_full)  # space left: torch's own words


def shutil_usage(total: int, used: int, free: int):
    import shutil

    return shutil._ntuple_diskusage(total, used, free)


def test_a_write_in_progress_elsewhere_is_not_taken_for_a_leftover(tmp_path):
    """Two writes of one file at once (two commands with one --out): the second leaves the first's temporary file,
    which a lock marks as live, and both renames succeed, the last one's file staying."""
    import threading

    target, started, release = tmp_path / "results.json", threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow(tmp):
        Path(tmp).write_text("first")
        started.set()
        release.wait(10)

    def first():
        try:
            atomic_write(target, slow)
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    started.wait(10)
    atomic_write(target, lambda tmp: Path(tmp).write_text("second"))
    release.set()
    thread.join()
    assert not errors and target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
