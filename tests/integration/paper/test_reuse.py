"""A reproduction's --out reused: its nets and evaluations only when this run would make them alike."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_dataset

from verydeep.cli import main
from verydeep.paper import measure, train_nets
from verydeep.paper.presets import PRESETS

#: Whole reproductions, if tiny ones (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow


def command(data: Path, out: Path, *extra: str) -> list[str]:
    """``verydeep reproduce`` of net A (and its seed-1 replica) at width 1/16 for one epoch, with ``extra``'s
    flags and values (in pairs) in place of these or after them."""
    argv = ["reproduce", "--data", str(data), "--out", str(out), "--nets", "A", "--protocol", "scratch", "--budget",
            "1", "--width", "0.0625", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress"]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def forbid_training_and_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training or evaluation fail the test: what is reused must not be redone."""
    def refuse(*args, **kwargs):
        raise AssertionError("trained or evaluated again")

    monkeypatch.setattr(train_nets, "train", refuse)
    monkeypatch.setattr(measure, "evaluate", refuse)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """Two tiny datasets, and a reproduction of the first in an --out."""
    tmp = tmp_path_factory.mktemp("reuse")
    data, other = (write_dataset(tmp / name, {"train": 4, "val": 2}, size=(36, 36), ext="jpg")
                   for name in ("ds", "other"))
    assert main(command(data, tmp / "out")) == 0
    return data, other, tmp / "out"


@pytest.mark.parametrize(("flag", "value", "change"), [
    ("--budget", "2", "epochs 1, but this run would use epochs 2"),
    ("--width", "0.125", "width 0.0625, but this run would use width 0.125"),
    ("--limit-test", "4", "limit_test None, but this run would use limit_test 4"),
    ("--data", None, None),  # the other dataset
])
def test_a_rerun_with_other_settings_is_refused_in_one_line_and_leaves_out_as_it_was(reproduced, capsys, flag, value,
                                                                                      change):
    data, other, out = reproduced
    if flag == "--data":
        was, now = str(data.resolve()), str(other.resolve())
        value, change = str(other), f"data {was!r}, but this run would use data {now!r}"
    before = files(out)
    capsys.readouterr()
    assert main(command(data, out, flag, value)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--out {out}:" in err and f"with {change}; give another --out, or delete" in err
    assert files(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_there_is_refused_before_the_plots_are_redrawn(reproduced, capsys):
    data, _, out = reproduced
    before = files(out)
    capsys.readouterr()
    assert main(command(data, out, "--device", "cuda")) == 2
    assert capsys.readouterr().err.strip().endswith("error: --device cuda: CUDA is not available on this machine")
    assert files(out) == before


def test_a_rerun_with_the_same_settings_reuses_every_net_and_evaluation(reproduced, tmp_path, monkeypatch):
    data, _, first = reproduced
    out = shutil.copytree(first, tmp_path / "out")
    nets = {name: content for name, content in files(out).items() if name.startswith(("nets", "eval"))}
    forbid_training_and_evaluation(monkeypatch)
    assert main(command(data, out, "--workers", "1")) == 0  # how a net runs may change
    assert {name: content for name, content in files(out).items() if name.startswith(("nets", "eval"))} == nets


def test_a_rerun_from_another_folder_or_through_a_link_reuses_the_nets(reproduced, tmp_path, monkeypatch):
    data, _, _ = reproduced
    (tmp_path / "sub").mkdir()
    shutil.copytree(data, tmp_path / "ds")
    monkeypatch.chdir(tmp_path / "sub")
    assert main(command(Path("../ds"), Path("../out"))) == 0
    forbid_training_and_evaluation(monkeypatch)
    monkeypatch.chdir(tmp_path)  # the same data and --out, named from their parent
    assert main(command(Path("ds"), Path("out"))) == 0
    (tmp_path / "link").symlink_to(tmp_path / "out")
    monkeypatch.chdir(tmp_path / "sub")
    assert main(command(Path("../ds"), Path("../link"))) == 0


def test_an_interrupted_net_resumes_and_its_stale_evaluation_is_measured_again(reproduced, tmp_path):
    data, _, first = reproduced
    out = shutil.copytree(first, tmp_path / "out")
    (out / "nets" / "A-s1" / "train_summary.json").unlink()  # cut short after its last checkpoint
    kept = files(out / "nets" / "A")
    assert main(command(data, out)) == 0
    assert files(out / "nets" / "A") == kept
    summary = (out / "nets" / "A-s1" / "train_summary.json").read_bytes()
    settings = json.loads((out / "eval" / "A-s1" / "settings.json").read_text())
    assert settings["trained"] == train_nets.hashlib.sha256(summary).hexdigest()[:16]
    assert (out / "eval" / "A-s1" / "results.json").stat().st_mtime_ns > (out / "nets" / "A-s1" /
                                                                          "train_summary.json").stat().st_mtime_ns


def test_a_cached_evaluation_s_numbers_are_scored_again_and_a_lost_run_record_read_from_the_checkpoint(
        reproduced, tmp_path, monkeypatch):
    data, _, first = reproduced
    out = shutil.copytree(first, tmp_path / "out")
    cached = out / "eval" / "A" / "results.json"
    saved = json.loads(cached.read_text())
    saved["rows"][0].update(top1_error=7.0, top5_error=float("nan"), images=0)
    cached.write_text(json.dumps(saved))
    (out / "nets" / "A" / "recipe.json").unlink()
    forbid_training_and_evaluation(monkeypatch)
    assert main(command(data, out)) == 0
    tables = [json.loads((run / "results.json").read_text())["tables"] for run in (first, out)]
    assert tables[0] == tables[1]


def test_a_damaged_cached_evaluation_is_one_line_naming_it(reproduced, tmp_path, capsys):
    data, _, first = reproduced
    out = shutil.copytree(first, tmp_path / "out")
    cached = out / "eval" / "A" / "results.json"
    cached.write_text("")
    capsys.readouterr()
    assert main(command(data, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cached}: damaged cached evaluation (JSONDecodeError" in err
    assert f"delete {cached.parent} to evaluate again" in err


def test_shards_train_into_one_out_and_the_report_reuses_their_nets(reproduced, tmp_path, monkeypatch, capsys):
    data, _, _ = reproduced
    out = tmp_path / "out"
    for part in ("1/2", "2/2"):
        assert main([*command(data, out), "--shard", part]) == 0
    assert {p.name for p in (out / "nets").iterdir()} == {"A", "A-s1"}
    forbid_training_and_evaluation(monkeypatch)
    assert main(command(data, out)) == 0
    report = (out / "REPRODUCTION.md").read_text()  # a budget of 1 epoch: the preset's early stop is not in force
    assert "a net stops once validation" not in report and "divided by 10" in report
    capsys.readouterr()
    assert main(command(data, out, "--shard", "2/2", "--budget", "2")) == 2  # a shard is checked too
    assert "net A-s1 was trained with epochs 1" in capsys.readouterr().err


def test_demo_reuses_its_net_only_at_the_same_epochs(tmp_path, monkeypatch, capsys):
    tiny = dict(width=1 / 16, limit_train=40, limit_test=20, batch_size=20, workers=0, fixed_protocols=("dense",))
    monkeypatch.setitem(PRESETS, "digits", replace(PRESETS["digits"], **tiny))
    demo = ["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "--no-progress", "--epochs"]
    assert main([*demo, "1"]) == 0
    recorded = f"command: `verydeep demo --out {tmp_path / 'demo'} --device cpu --no-progress --epochs 1`"
    assert recorded in (tmp_path / "demo" / "REPRODUCTION.md").read_text()  # as run, to be run again
    before = files(tmp_path / "demo")
    capsys.readouterr()
    assert main([*demo, "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "net A was trained with epochs 1, but this run would use epochs 2" in err
    assert files(tmp_path / "demo") == before
    forbid_training_and_evaluation(monkeypatch)
    assert main([*demo, "1"]) == 0
    shutil.copytree(tmp_path / "demo", tmp_path / "copy")  # its data inside its --out, copied along
    assert main(["demo", "--out", str(tmp_path / "copy"), "--device", "cpu", "--no-progress", "--epochs", "1"]) == 0


@pytest.mark.parametrize(("split", "change"), [("train", "net A was trained with training images"),
                                               ("val", "the evaluation of net A was measured with images")])
def test_a_rerun_on_images_changed_in_the_same_folder_is_refused(reproduced, capsys, split, change):
    data, _, out = reproduced
    image, moved = data / split / "class1" / "0.jpg", data / split / "class2" / "99.jpg"
    before = files(out)
    image.rename(moved)  # the same folder, one image now of another class
    try:
        capsys.readouterr()
        assert main(command(data, out)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--out {out}: {change}" in err
    finally:
        moved.rename(image)
    assert files(out) == before
