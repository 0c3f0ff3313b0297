"""The demo's and the reproduction's whole path, on a tiny budget."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, save

from verydeep.cli import main
from verydeep.data import carve_validation
from verydeep.errors import UserError
from verydeep.eval.evaluate import evaluate
from verydeep.eval.metrics import paired_difference
from verydeep.eval.rows import EvalRow
from verydeep.io.checkpoint import load_weights
from verydeep.paper.claims import claims
from verydeep.paper.demo import DIGIT_NAMES, write_digits
from verydeep.paper.figures import single_test_scale
from verydeep.paper.measure import Measured, evaluate_net, fuse, fusions
from verydeep.paper.plot import read_metrics
from verydeep.paper.presets import NETS, PRESETS, Net, Preset, within_budget
from verydeep.paper.reproduce import reproduce
from verydeep.paper.reproduction_plots import ERROR_BARS, errors_figure
from verydeep.paper.reproduction_report import _settings_lines
from verydeep.paper.train_nets import shard_of
from verydeep.runtime.processes import Processes
from verydeep.train import Trainer, train

#: Processes, servers or whole training runs: minutes on two cores (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow


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
    assert PRESETS["imagenette"].scale((256, 512)) == (146, 292)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_net_of_every_preset_has_settings_train_accepts(name, tmp_path):
    preset = PRESETS[name]
    by_name = {net.name: net for net in preset.members()}
    for net in by_name.values():
        preset.train_config(net, by_name, tmp_path / "data", tmp_path / "nets", "cpu", False).check()


def measured(name, wrong, images=1000, classes=10):
    """A net's dense row at Q = 36 whose top-1 is wrong on exactly the images of the mask ``wrong``."""
    wrong = np.asarray(wrong, dtype=bool)
    targets = np.arange(len(wrong)) % classes
    predicted = np.where(wrong, (targets + 1) % classes, targets)
    posteriors = np.full((len(wrong), classes), 0.01, dtype=np.float32)
    posteriors[np.arange(len(wrong)), predicted] = 0.91
    row = EvalRow(f"{name}: dense Q=36", "dense", [36], [name], multi_scale=False, fusion=False,
                  top1_error=float(wrong.mean()), top5_error=0.0, images=len(wrong))
    return Measured(row, posteriors, targets, np.array([f"img{i}.png" for i in range(len(wrong))]))


def row(nets, protocol, error, scales=None, fusion=False):
    """A measured row of ``protocol``: at one test scale ``scales[0]``, or multi-scale when ``scales`` is None."""
    spec = EvalRow(f"{' + '.join(nets)}: {protocol}", protocol, scales or [32, 36, 41], nets,
                   multi_scale=scales is None, fusion=fusion, top1_error=error, top5_error=0.0, images=1000)
    return Measured(spec, np.zeros((1, 10), dtype=np.float32), np.zeros(1, dtype=np.int64), np.array(["x.png"]))


def test_errors_png_draws_every_row_of_tables_3_to_6_on_bars_from_zero():
    preset = Preset(crop=32, width=1, epochs=1)
    nets = [Net("A", "A", (256, 256)), Net("D-jitter", "D", (256, 512), parent="A")]
    q = {net.name: single_test_scale(*preset.scale(net.scale)) for net in nets}
    rows = [row(["A"], "dense", 0.43, [q["A"]]), row(["A"], "dense", 0.40),  # Tables 3 and 4 only
            row(["D-jitter"], "dense", 0.37, [q["D-jitter"]]), row(["D-jitter"], "dense", 0.36),
            row(["D-jitter"], "multicrop", 0.34), row(["D-jitter"], "dense+multicrop", 0.31),  # Table 5
            *(row(["A", "D-jitter"], protocol, error, fusion=True)  # Table 6
              for protocol, error in (("dense", 0.35), ("multicrop", 0.33), ("dense+multicrop", 0.30)))]
    ax = errors_figure(rows, nets, preset).axes[0]
    assert ax.get_ylim()[0] == 0  # a bar's length is its error, 30% a tenth shorter than 33%
    heights = sorted(round(bar.get_height(), 6) for bar in ax.patches)
    assert heights == sorted(round(100 * m.row.top1_error, 6) for m in rows)  # every row, once
    assert [label.get_text() for label in ax.get_xticklabels()] == ["A", "D-jitter", "A + D-jitter (fused, Table 6)"]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [legend for *_, legend in ERROR_BARS]
    assert not any("Table" in legend for *_, legend in ERROR_BARS)  # a fusion's bars are Table 6's, not 4's or 5's
    series = {bars.get_label(): [round(bar.get_height(), 6) for bar in bars] for bars in ax.containers}
    single, multi, multicrop, both = (legend for *_, legend in ERROR_BARS)
    assert series == {single: [43.0, 37.0], multi: [40.0, 36.0, 35.0], multicrop: [34.0, 33.0], both: [31.0, 30.0]}


def test_claims_are_judged_by_the_paired_test_in_the_papers_direction():
    preset = Preset(crop=32, width=1, epochs=1)
    nets = [Net("A", "A", (256, 256)), Net("B", "B", (256, 256), parent="A")]
    rng = np.random.default_rng(0)
    a_wrong = rng.random(1000) < 0.30
    b_wrong = a_wrong & (rng.random(1000) < 0.8)  # B gets right a fifth of A's mistakes and nothing else changes
    held = claims([measured("A", a_wrong), measured("B", b_wrong)], nets, preset)
    depth = next(c for c in held if c.claim.startswith("Error falls with depth: B beats A"))
    assert depth.verdict == "held" and depth.difference == pytest.approx(100 * (a_wrong.mean() - b_wrong.mean()))
    reversed_ = claims([measured("A", b_wrong), measured("B", a_wrong)], nets, preset)
    assert next(c for c in reversed_ if c.claim.startswith("Error falls")).verdict == "did not hold"
    # ten images apart on a thousand: significant when the nets agree elsewhere, not when they swap many
    close_b = a_wrong.copy()
    close_b[np.flatnonzero(a_wrong)[:10]] = False
    assert next(c for c in claims([measured("A", a_wrong), measured("B", close_b)], nets, preset)
                if c.claim.startswith("Error falls")).verdict == "held"
    swapped = close_b.copy()
    swapped[np.flatnonzero(~a_wrong)[:60]] = True
    swapped[np.flatnonzero(a_wrong)[10:70]] = False
    assert next(c for c in claims([measured("A", a_wrong), measured("B", swapped)], nets, preset)
                if c.claim.startswith("Error falls")).verdict.startswith("inconclusive")


def test_a_claim_holds_across_seeds_only_when_every_seed_says_so():
    preset = Preset(crop=32, width=1, epochs=1)
    nets = [Net("A", "A", (256, 256)), Net("D", "D", (256, 256), parent="A")]
    nets += [net.replica(1, ("A", "D")) for net in nets]
    rng = np.random.default_rng(1)
    a_wrong = rng.random(1000) < 0.30
    better = a_wrong & (rng.random(1000) < 0.8)

    def depth(d_wrong_seed1):
        rows = [measured("A", a_wrong), measured("D", better), measured("A-s1", a_wrong),
                measured("D-s1", d_wrong_seed1)]
        return next(c for c in claims(rows, nets, preset) if c.claim == "Error falls with depth: D beats A")

    agreed = depth(better)
    assert agreed.verdict == "held (each of 2 seeds)" and agreed.seed_spread.startswith("difference over 2 seeds")
    split = depth(a_wrong | (rng.random(1000) < 0.1))  # seed 1: D clearly worse than A
    assert split.verdict.startswith("inconclusive (seeds disagree") and split.difference > split.margin


def test_the_paired_difference_and_its_standard_error_by_hand():
    a = np.array([1, 1, 1, 0, 1, 0, 1, 1], dtype=bool)  # right/wrong per image
    b = np.array([1, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    test = paired_difference(a, b)
    d = np.array([0, 1, 1, 0, 0, -1, 1, 0])  # a right where b is wrong: +1
    assert test.difference == pytest.approx(100 * d.mean())  # 25 points
    assert test.standard_error == pytest.approx(100 * d.std(ddof=1) / np.sqrt(8))  # 0.1637...
    assert test.margin == pytest.approx(2 * test.standard_error) and test.images == 8
    assert test.significant == (abs(test.difference) > test.margin)
    assert paired_difference(a, a).difference == 0 and not paired_difference(a, a).significant
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(a, b[:5])


def test_fusion_averages_the_posteriors_of_the_images_both_nets_saw():
    one, two = measured("A", [True, False, True, False]), measured("A-s1", [False, False, True, True])
    two = replace(two, posteriors=two.posteriors[::-1].copy(), targets=two.targets[::-1].copy(),
                  paths=two.paths[::-1].copy())  # the same images in another order
    fused = fuse([one, two])
    assert fused.row.nets == ["A", "A-s1"] and fused.row.fusion and fused.row.images == 4
    assert fused.row.name == "fusion of A + A-s1: dense"  # as eval names it (verydeep.eval.rows.fuse_rows)
    np.testing.assert_array_equal(fused.posteriors, (one.posteriors + two.posteriors[::-1]) / 2)
    # image 2 is wrong for both; on images 0 and 3 one net is right, and the fused true class ties with
    # the other's class: half right each
    assert fused.row.top1_error == pytest.approx(0.5)


def test_the_papers_d_plus_e_is_fused_on_its_own_beside_all_the_jittered_nets():
    nets = [n for n in NETS if n.name in ("C-jitter", "D-jitter", "E-jitter")]
    rows = [measured(n.name, [i == j for j in range(4)]) for i, n in enumerate(nets)]
    rows = [replace(m, row=replace(m.row, multi_scale=True)) for m in rows]  # each net over its scales
    assert [f.row.nets for f in fusions(rows, nets)] == [["D-jitter", "E-jitter"], ["C-jitter", "D-jitter", "E-jitter"]]
    assert [f.row.nets for f in fusions(rows[1:], nets[1:])] == [["D-jitter", "E-jitter"]]  # the pair is all


def test_the_papers_protocol_trains_parents_first_and_replicas_share_no_training():
    preset = replace(PRESETS["cifar10"], nets=("E-jitter", "A-LRN"), seeds=2, seeded=("A", "E"))
    assert [n.name for n in preset.members()] == ["A", "E", "E-384", "E-jitter", "A-LRN", "A-s1", "E-s1"]
    replicas = {n.name: n for n in preset.members()}
    assert replicas["E-s1"].parent == "A-s1" and replicas["E-s1"].seed == 1 and replicas["E-s1"].base == "E"
    scratch = replace(preset, protocol="scratch", seeds=1)
    assert [n.name for n in scratch.members()] == ["E-jitter", "A-LRN"]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A paper-protocol reproduction on the digits: nets A and D (two seeds each), D-384, D-jitter."""
    tmp = tmp_path_factory.mktemp("reproduce")
    data = write_digits(tmp / "data")
    preset = replace(PRESETS["digits"], epochs=1, finetune_epochs=1, width=1 / 16, nets=("A", "D-jitter"),
                     workers=0, limit_train=120, limit_test=40, batch_size=32, seeds=2, fixed_protocols=("dense",))
    return data, preset, tmp / "run", reproduce(data, preset, "digits", tmp / "run", progress=False)


def _trainer_before_first_step(preset, name, data, out, tmp_path):
    """The model of net ``name`` as the reproduction's trainer builds it, before any step."""
    by_name = {n.name: n for n in preset.members()}
    cfg = preset.train_config(by_name[name], by_name, data, out / "nets", "cpu", progress=False)
    return Trainer(replace(cfg, out=str(tmp_path / name), resume=False), Processes.from_env()).model, cfg


def test_deeper_nets_start_from_as_trained_layers_and_jittered_from_s384(reproduced, tmp_path):
    data, preset, out, _ = reproduced
    a_weights, _ = load_weights(out / "nets" / "A" / "checkpoints" / "last.pt")
    d, cfg = _trainer_before_first_step(preset, "D", data, out, tmp_path)
    assert cfg.weights == str(out / "nets" / "A" / "checkpoints" / "last.pt") and cfg.lr == preset.lr
    assert cfg.warm_start
    a_convs = ["features.0", "features.3", "features.6", "features.8"]  # A's conv1_1, conv2_1, conv3_1, conv3_2
    for name, a_layer in zip(["conv1_1", "conv2_1", "conv3_1", "conv3_2"], a_convs, strict=True):
        assert torch.equal(d.conv_layers()[name].weight, a_weights[f"{a_layer}.weight"]), name
    assert not torch.equal(d.conv_layers()["conv1_2"].weight[:, :, 1, 1], torch.zeros_like(
        d.conv_layers()["conv1_2"].weight[:, :, 1, 1]))  # D's own layers are random, not zero
    jitter, cfg = _trainer_before_first_step(preset, "D-jitter", data, out, tmp_path)
    assert cfg.weights.endswith("D-384/checkpoints/last.pt") and cfg.lr == preset.finetune_lr
    assert not cfg.warm_start
    d384, _ = load_weights(out / "nets" / "D-384" / "checkpoints" / "last.pt")
    assert all(torch.equal(v, d384[k]) for k, v in jitter.state_dict().items())
    assert json.loads((out / "nets" / "D" / "recipe.json").read_text())["weights"].endswith("A/checkpoints/last.pt")


def test_a_seed_reproduces_its_net_and_another_seed_changes_it(reproduced, tmp_path):
    data, preset, out, _ = reproduced
    by_name = {n.name: n for n in preset.members()}
    cfg = preset.train_config(by_name["A"], by_name, data, out / "nets", "cpu", progress=False)
    train(replace(cfg, out=str(tmp_path / "again"), resume=False))
    again, _ = load_weights(tmp_path / "again" / "checkpoints" / "last.pt")
    first, _ = load_weights(out / "nets" / "A" / "checkpoints" / "last.pt")
    other, _ = load_weights(out / "nets" / "A-s1" / "checkpoints" / "last.pt")
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert not torch.equal(other["features.0.weight"], first["features.0.weight"])


def test_reproduction_runs_end_to_end_and_resumes(reproduced):
    data, preset, out, result = reproduced
    assert set(result.tables) == {
        "Table 3: single test scale", "Table 4: multiple test scales",
        "Table 5: dense vs multi-crop vs both (multi-scale)", "Table 6: fusion",
    }
    table3 = result.tables["Table 3: single test scale"].rows
    assert [r.nets for r in table3] == [["A"], ["A-s1"], ["D"], ["D-s1"], ["D-384"], ["D-jitter"]]
    assert [r.scales for r in table3] == [[36], [36], [36], [36], [54], [54]]
    assert all(r.images == 40 for r in table3)
    table5 = result.tables["Table 5: dense vs multi-crop vs both (multi-scale)"].rows
    assert [(r.nets, r.protocol) for r in table5] == [
        (["D-jitter"], "dense"), (["D-jitter"], "multicrop"), (["D-jitter"], "dense+multicrop")]
    fused = [(r.nets, r.protocol) for r in result.tables["Table 6: fusion"].rows]
    assert fused == [(["A", "A-s1"], "dense"), (["D", "D-s1"], "dense")]  # replicas: nets that share no training
    # the paper's figures stand beside ours: A at 256, D at 384, D jittered (Table 5)
    assert "| 29.6 / 10.4 |" in result.tables["Table 3: single test scale"].markdown
    assert "| 26.8 / 8.7 |" in result.tables["Table 3: single test scale"].markdown
    assert "| 24.4 / 7.2 |" in result.tables["Table 5: dense vs multi-crop vs both (multi-scale)"].markdown
    depth = next(c for c in result.claims if c.claim == "Error falls with depth: D beats A")
    assert depth.seed_spread.startswith("difference over 2 seeds") and depth.margin is not None
    for name in ("REPRODUCTION.md", "learning_curves.png", "errors.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert "protocol `paper`" in (out / "REPRODUCTION.md").read_text()
    # a second run finds every net trained and evaluated: nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("nets/*/checkpoints/last.pt")}
    assert len(stamps) == 6
    again = reproduce(data, preset, "digits", out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.tables == result.tables  # the second run's rows come back from the cache
    assert json.loads((out / "results.json").read_text())["tables"] == json.loads(json.dumps(again.to_dict()))["tables"]


def test_a_nets_cached_evaluation_is_its_evaluation_exactly(reproduced):
    data, preset, out, _ = reproduced
    cache = out / "eval" / "D-jitter"
    # eval --out's files, and what they were measured with
    assert sorted(p.name for p in cache.iterdir()) == ["posteriors.npz", "results.json", "results.md", "settings.json"]
    saved = json.loads((cache / "results.json").read_text())
    measured, seconds = evaluate_net("D-jitter", out / "nets" / "D-jitter", None, (), None, out, "cpu", 0, False)
    fresh = evaluate([out / "nets" / "D-jitter"], saved["data"], protocols=saved["protocols"], limit=preset.limit_test,
                     device="cpu", progress=False, keep_posteriors=True)
    assert seconds == saved["timing"]["seconds"] and len(measured) == len(fresh.rows) == 9
    readable = fresh.posteriors.readable
    for m, row in zip(measured, fresh.rows, strict=True):
        assert m.row == replace(row, nets=["D-jitter"])
        assert m.posteriors.dtype == np.float32 and np.array_equal(m.posteriors, fresh.posteriors.rows[row.name])
        assert np.array_equal(m.targets, fresh.posteriors.targets[readable])
        assert m.paths.tolist() == np.array(fresh.posteriors.paths)[readable].tolist()


def test_reproduce_cli_rejects_unknown_nets(tmp_path, capsys):
    assert main(["reproduce", "--data", str(tmp_path), "--nets", "A,Z"]) == 2
    assert "--nets: unknown Z" in capsys.readouterr().err
    assert {n.name for n in NETS} >= set(PRESETS["cifar10"].nets)


def test_the_settings_name_the_nets_trained_again_and_the_time_as_summed_not_wall():
    from verydeep.paper.reproduction_report import _settings_lines

    preset = replace(PRESETS["cifar10"], protocol="scratch", nets=("A", "A-LRN"), seeds=2, seeded=("A", "D"))
    lines = _settings_lines(preset, Path("data"), "cpu", "verydeep reproduce", {"training": 90.0, "evaluation": 30.0})
    assert any(line.startswith("- seeds: 2 (A trained 2 times;") for line in lines)  # D is seeded, not trained
    assert any("compute time 2.0 min, summed over the nets (not wall time" in line for line in lines)
    assert not any("fine-tuned at another S" in line for line in lines)  # every net from random weights


def test_the_settings_give_a_fine_tuned_net_s_own_budget_and_the_test_limit_as_a_bound():
    preset = replace(PRESETS["cifar10"], nets=("C-jitter",), epochs=1, limit_test=1000)  # C-256 -> C-384 -> C-jitter
    lines = "\n".join(_settings_lines(preset, Path("data"), "cpu", "verydeep reproduce", {"training": 60.0}))
    assert f"at most 1 epochs ({preset.finetune_epochs} for a net fine-tuned at another S)" in lines
    assert "errors on at most 1000 (class-balanced) test images (the claims below give how many)" in lines


def test_fewer_than_two_test_images_are_refused_before_any_training(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["reproduce", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--limit-test",
                 "1"]) == 2
    assert "--limit-test 1: the paired test of two nets needs 2 images at least" in capsys.readouterr().err
    for split, count in (("train", 4), ("test", 1)):
        for i in range(count):
            save(photo(40, 36, seed=i), tmp_path / "data" / split / "a" / f"{i}.png")
    assert main(["reproduce", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--nets", "A",
                 "--no-progress", "--device", "cpu"]) == 2
    assert "test: 1 test image(s); the paired test of two nets needs 2 at least" in capsys.readouterr().err
    assert not (tmp_path / "out" / "nets").exists()


def test_the_seed_mean_must_pass_its_own_margin_before_a_claim_holds_across_seeds():
    preset = Preset(crop=32, width=1, epochs=1)
    nets = [Net("A", "A", (256, 256)), Net("D", "D", (256, 256), parent="A")]
    nets += [net.replica(seed, ("A", "D")) for seed in (1, 2) for net in nets[:2]]
    a_wrong = np.arange(1000) < 300

    def depth(*d_wrong_per_seed):
        rows = []
        for seed, d_wrong in enumerate(d_wrong_per_seed):
            suffix = f"-s{seed}" if seed else ""
            rows += [measured(f"A{suffix}", a_wrong), measured(f"D{suffix}", d_wrong)]
        return next(c for c in claims(rows, nets, preset) if c.claim == "Error falls with depth: D beats A")

    # each seed's paired test holds (D fixes some of A's mistakes, makes none), by 20, 2 and 2 points:
    # the mean over seeds, 8 points, lies within two of its standard errors (12 points)
    spread = depth(np.arange(1000) < 100, np.arange(1000) < 280, np.arange(1000) < 280)
    assert spread.verdict.startswith("inconclusive (each seed held, but the mean over seeds +8.00 pp")
    assert "per seed +20.00, +2.00, +2.00" in spread.seed_spread
    steady = depth(np.arange(1000) < 270, np.arange(1000) < 280, np.arange(1000) < 260)
    assert steady.verdict == "held (each of 3 seeds)"


def test_validation_is_carved_from_training_class_balanced_and_fixed_by_the_seed():
    targets = [c for c in range(4) for _ in range(10)] + [4] * 3  # the last class is small
    train0, val0 = carve_validation(targets, 12, seed=0)
    assert sorted(train0 + val0) == list(range(len(targets))) and not set(train0) & set(val0)
    per_class = np.bincount([targets[i] for i in val0], minlength=5)
    assert per_class.tolist() == [3, 3, 2, 2, 2]  # round-robin over the classes
    assert carve_validation(targets, 12, seed=0) == (train0, val0)
    assert carve_validation(targets, 12, seed=1)[1] != val0
    with pytest.raises(UserError, match="--val-split"):
        carve_validation(targets, len(targets), seed=0)



def test_carving_validation_leaves_every_class_a_training_image():
    targets = [0] * 4 + [1] * 4 + [2]  # class 2 has one image: it must train, never be held out
    for seed in range(5):
        train, held = carve_validation(targets, 3, seed=seed)
        assert {targets[i] for i in train} == {0, 1, 2} and 8 in train
    assert len(carve_validation(targets, 6, seed=0)[1]) == 6  # 9 images less one of each of the 3 classes
    with pytest.raises(UserError, match="--val-split must be between 1 and 6 "):
        carve_validation(targets, 7, seed=0)

def test_a_held_out_validation_split_decides_the_schedule_and_no_test_image_does(tmp_path, monkeypatch):
    data = write_digits(tmp_path / "data")
    test_images = {str(p) for p in (data / "val").rglob("*.png")}
    read_by_validation: set[str] = set()
    real_validate = Trainer.validate

    def watched(self):
        read_by_validation.update(str(self.data.val_set.samples[i][0]) for i in self.data.val_indices)
        return real_validate(self)

    monkeypatch.setattr(Trainer, "validate", watched)
    preset = replace(PRESETS["cifar10-depth"], epochs=2, milestones=(1,), width=1 / 16, nets=("A",), seeds=2,
                     workers=0, limit_train=100, limit_test=30, batch_size=25, val_split=20)
    result = reproduce(data, preset, "cifar10-depth", tmp_path / "run", device="cpu", progress=False)
    assert read_by_validation and not read_by_validation & test_images
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for net in saved["nets"]:
        run_dir = tmp_path / "run" / "nets" / net["name"]
        record = json.loads((run_dir / "recipe.json").read_text())
        held = {str(data / "train" / p) for p in net["validation"]["paths"]}
        assert net["validation"]["images"] == 20 and len(held) == 20 and held <= read_by_validation
        assert net["training"]["images"] == 100 and record["val_split"] == 20
        assert all(r["val_images"] == 20 for r in read_metrics(run_dir)[1])
        assert [r["lr"] for r in read_metrics(run_dir)[1]] == [0.01, 0.001]  # the milestone, not the plateau
    assert saved["nets"][0]["validation"]["paths"] != saved["nets"][1]["validation"]["paths"]  # seeds 0 and 1
    assert [n.test_top1_error is not None for n in result.nets] == [True, True]
    assert "The nets as trained" in (tmp_path / "run" / "REPRODUCTION.md").read_text()


def test_shards_split_a_seeded_reproduction_by_seed_with_parents_inside():
    preset = replace(PRESETS["cifar10-depth"], seeds=3)
    one, two = shard_of(preset, 1, 2), shard_of(preset, 2, 2)
    assert [n.name for n in one] == ["A", "D", "B", "E", "A-s2", "D-s2", "B-s2", "E-s2"]
    assert [n.name for n in two] == ["A-s1", "D-s1", "B-s1", "E-s1"]
    for part in (one, two):
        names = [n.name for n in part]
        assert all(names.index(n.parent) < names.index(n.name) for n in part if n.parent)


def test_reproduce_refuses_a_milestone_past_the_budget(tmp_path, capsys):
    args = ["reproduce", "--data", str(tmp_path), "--preset", "cifar10-depth", "--budget", "10", "--milestones", "5,10"]
    assert main(args) == 2
    assert "--milestones 5,10: each must be below the epoch budget 10" in capsys.readouterr().err
    assert main(args[:-2]) == 2  # the preset's own milestones, which no flag gave
    assert ("--preset cifar10-depth's milestones 25,35,40: each must be below the epoch budget 10 (--budget); raise "
            "--budget, or give --milestones") in capsys.readouterr().err


def test_a_preset_s_early_stop_that_a_short_budget_leaves_idle_is_neither_used_nor_reported():
    """The demo's and reproduce's budget: a net validates once an epoch, so a stop after more epochs than the
    budget could never act; the report describes only the rules in force, and only the nets trained."""
    preset = within_budget(replace(PRESETS["digits"], epochs=2, stop_patience=4))
    assert preset.stop_patience is None and within_budget(replace(preset, epochs=5, stop_patience=4)).stop_patience == 4
    lines = "\n".join(_settings_lines(preset, Path("data"), "cpu", "verydeep demo", {"A": 1.0}))
    assert "stops once validation" not in lines and "every net from random weights" in lines and "B-E" not in lines


@pytest.mark.parametrize("options, message", [
    (["--nets", "B", "--protocol", "scratch", "--seeds", "3"],
     "--seeds 3: repeats only A, D, none of the nets trained (B)"),
    (["--nets", "A", "--protocol", "scratch", "--finetune-budget", "3"],
     "--finetune-budget: no net trained (A) is fine-tuned from its own configuration under --protocol scratch"),
    (["--nets", "D", "--finetune-budget", "3"], "--finetune-budget: no net trained (A, D) is fine-tuned"),
])
def test_reproduce_refuses_options_that_would_do_nothing(tmp_path, capsys, options, message):
    assert main(["reproduce", "--data", str(tmp_path), "--preset", "cifar10", *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_nets_evaluation_reads_with_the_presets_loader_processes(tmp_path, monkeypatch):
    """``reproduce --workers`` sets the evaluation's loader processes too, not only training's."""
    import verydeep.paper.measure as measure

    asked = {}

    def evaluate_seen(*args, **kwargs):
        asked.update(kwargs)
        raise KeyboardInterrupt  # what the evaluation was asked is all this test needs

    monkeypatch.setattr(measure, "evaluate", evaluate_seen)
    with pytest.raises(KeyboardInterrupt):
        evaluate_net("A", tmp_path / "A", tmp_path, ("dense",), None, tmp_path, "cpu", 0, False)
    assert asked["workers"] == 0


def test_a_trained_nets_log_without_its_epoch_records_is_one_line_and_the_report_stays(reproduced, tmp_path):
    """A log whose last records a crash cut (or an editor emptied) leaves a finished net nothing to report: one
    line naming the file, before any of the report's files is written again."""
    data, preset, out, _ = reproduced
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    log = copy / "nets" / "A" / "metrics.jsonl"
    log.write_text("".join(line for line in log.read_text().splitlines(keepends=True) if '"epoch"}' not in line
                           and '"kind": "epoch"' not in line))
    written = {path: path.stat().st_mtime_ns for path in copy.iterdir() if path.is_file()}
    with pytest.raises(UserError, match=f"{log}: no epoch record of a trained net"):
        reproduce(data, preset, "digits", copy, progress=False)
    assert {path: path.stat().st_mtime_ns for path in copy.iterdir() if path.is_file()} == written



def test_a_report_of_fewer_nets_than_out_holds_says_which_it_leaves_out(reproduced, tmp_path, capsys):
    data, preset, out, _ = reproduced
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "nets" / ".ipynb_checkpoints").mkdir()  # no net, nor a folder without a run
    (copy / "nets" / "notes").mkdir()
    fewer = reproduce(data, replace(preset, nets=("A",)), "digits", copy, progress=False)
    assert {net.name for net in fewer.nets} == {"A", "A-s1"}
    held = sorted(path.name for path in (copy / "nets").iterdir() if path.name not in ("A", "A-s1", "notes")
                  and not path.name.startswith("."))
    assert held and f"left out of the report: {', '.join(held)}" in capsys.readouterr().err
