"""The demo's and the reproduction's whole path, on a tiny budget."""

import json
from dataclasses import replace

import pytest

from verydeep.cli import main
from verydeep.demo import DIGIT_NAMES, write_digits
from verydeep.evaluate import EvalRow
from verydeep.reproduce import NETS, PRESETS, Net, Preset, claims, reproduce


def test_digits_are_written_once_as_an_image_folder(tmp_path):
    root = write_digits(tmp_path / "digits")
    train = sorted(p.name for p in (root / "train").iterdir())
    assert train == sorted(DIGIT_NAMES)
    n_train = len(list((root / "train").rglob("*.png")))
    n_val = len(list((root / "val").rglob("*.png")))
    assert (n_train, n_val) == (1797 - 359, 359)
    stamp = (root / "val" / "zero").stat().st_mtime_ns
    write_digits(root)
    assert (root / "val" / "zero").stat().st_mtime_ns == stamp


def test_preset_scales_follow_the_crop():
    assert PRESETS["cifar10"].scale((256, 512)) == (36, 73)
    assert PRESETS["cifar10"].scale((384, 384)) == (54, 54)
    assert PRESETS["imagenette"].scale((256, 512)) == (128, 256)


def test_claims_compare_in_the_papers_direction():
    preset = Preset(crop=32, width=1, epochs=1)
    nets = [Net("A", "A", (256, 256)), Net("B", "B", (256, 256))]

    def row(name, err):
        return EvalRow(f"{name}: dense Q=36", "dense", [36], [name], multi_scale=False, fusion=False, top1_error=err,
                       top5_error=0.0, images=10000)

    held = claims([row("A", 0.30), row("B", 0.20)], nets, preset)
    assert held[0].claim.startswith("Error falls with depth: B beats A") and held[0].verdict == "held"
    reversed_ = claims([row("A", 0.20), row("B", 0.30)], nets, preset)
    assert reversed_[0].verdict == "did not hold"
    close = claims([row("A", 0.200), row("B", 0.199)], nets, preset)
    assert close[0].verdict.startswith("inconclusive")


@pytest.mark.timeout(420)
def test_reproduction_runs_end_to_end_and_resumes(tmp_path, capsys):
    data = write_digits(tmp_path / "data")
    preset = replace(PRESETS["digits"], epochs=1, width=1 / 16, nets=("A", "D-jitter", "E-jitter"), workers=0,
                     limit_train=120, limit_test=40, batch_size=32)
    out = tmp_path / "run"
    result = reproduce(data, preset, "digits", out, progress=False)
    assert set(result.tables) == {
        "Table 3: single test scale", "Table 4: multiple test scales",
        "Table 5: dense vs multi-crop vs both (multi-scale)", "Table 6: fusion",
    }
    table3 = result.tables["Table 3: single test scale"].rows
    assert [r.nets for r in table3] == [["A"], ["D-jitter"], ["E-jitter"]]
    assert [r.scales for r in table3] == [[36], [54], [54]]
    assert all(r.images == 40 for r in table3)
    table5 = result.tables["Table 5: dense vs multi-crop vs both (multi-scale)"].rows
    assert [(r.nets, r.protocol) for r in table5][:3] == [
        (["A"], "dense"), (["A"], "multicrop"), (["A"], "dense+multicrop")]  # the digits preset: every protocol for A
    assert len(table5) == 9
    assert len(result.tables["Table 6: fusion"].rows) == 3
    # the paper's figures stand beside ours: A at 256, D jittered (Table 5), D + E fused (Table 6)
    assert "| 29.6 / 10.4 |" in result.tables["Table 3: single test scale"].markdown
    assert "| 24.4 / 7.2 |" in result.tables["Table 5: dense vs multi-crop vs both (multi-scale)"].markdown
    assert "| 23.7 / 6.8 |" in result.tables["Table 6: fusion"].markdown
    assert result.claims and all(c.verdict for c in result.claims)
    for name in ("REPRODUCTION.md", "learning_curves.png", "errors.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert "Table 6: fusion" in (out / "REPRODUCTION.md").read_text()
    # a second run finds every net trained and evaluated: nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("nets/*/checkpoints/last.pt")}
    assert len(stamps) == 3
    again = reproduce(data, preset, "digits", out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.tables == result.tables  # the second run's rows come back from the cached JSON
    assert json.loads((out / "results.json").read_text())["tables"] == json.loads(json.dumps(again.to_dict()))["tables"]


def test_reproduce_cli_rejects_unknown_nets(tmp_path, capsys):
    assert main(["reproduce", "--data", str(tmp_path), "--nets", "A,Z"]) == 2
    assert "--nets: unknown Z" in capsys.readouterr().err
    assert {n.name for n in NETS} >= set(PRESETS["cifar10"].nets)
