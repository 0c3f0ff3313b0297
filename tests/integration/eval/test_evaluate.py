"""Evaluation: crop grid, dense form, spatial and flip averaging, top-k ties, fusion, scales, CLI."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from PIL import Image

from verydeep.cli import main
from verydeep.data import IMAGENET, balanced_subset, grid_crops, save_preprocess
from verydeep.errors import UserError
from verydeep.eval.evaluate import evaluate, write_outputs
from verydeep.eval.metrics import per_class_accuracy, topk_correct, topk_error
from verydeep.eval.nets import Net, derive_scales, load_nets, net_scales
from verydeep.eval.posteriors_file import load_posteriors, save_posteriors
from verydeep.eval.rows import EvalResult, EvalRow, PaperFigures, RowSpec, fuse_rows, paper_figures
from verydeep.eval.sweep import dense_posteriors, multicrop_posteriors
from verydeep.io.checkpoint import model_from_recipe, save_checkpoint
from verydeep.paper import figures
from verydeep.paper.report import (
    PAIRED,
    SEPARATE,
    Column,
    Row,
    Table,
    error_table,
    eval_tables,
    join_markdown,
    rows_table,
)

CLASSES = ["blue", "green", "red"]
RECIPE = {"config": "A", "num_classes": 3, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
          "scale": [36, 36], "preprocess": IMAGENET.to_dict(), "classes": CLASSES, "class_names": CLASSES}
CIFAR = SHARED / "cifar10" / "test"
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def tiny_model(seed: int = 0, **changes):
    torch.manual_seed(seed)
    return model_from_recipe({**RECIPE, **changes}).eval()


def make_folder(root: Path, per_class: int) -> Path:
    """val/<class>/ with noisy single-colour images of two sizes (so batches group by size)."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / "val" / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (40, 48) if i % 2 else (36, 36)
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "val" / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"), per_class=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "net.pt"
    save_checkpoint({"model": tiny_model().state_dict(), "recipe": RECIPE}, path)
    return path


@pytest.fixture(scope="module")
def second(tmp_path_factory) -> Path:
    """Another net of the same configuration and classes (another seed)."""
    path = tmp_path_factory.mktemp("ckpt") / "second.pt"
    save_checkpoint({"model": tiny_model(seed=1).state_dict(), "recipe": RECIPE}, path)
    return path


# ---- crops, dense form, averaging ---------------------------------------------------------


def test_grid_is_50_crops_with_corners_and_mirrors():
    h, w, crop = 40, 52, 32
    image = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).expand(1, 3, h, w)
    crops = grid_crops(image, crop)
    assert crops.shape == (1, 50, 3, crop, crop)
    tops, lefts = [0, 2, 4, 6, 8], [0, 5, 10, 15, 20]  # evenly spaced, both ends included
    origins = [(t, left) for t in tops for left in lefts]
    for k, (top, left) in enumerate(origins):
        torch.testing.assert_close(crops[0, k], image[0, :, top : top + crop, left : left + crop])
        torch.testing.assert_close(crops[0, 25 + k], crops[0, k].flip(-1))
    assert crops[0, 0, 0, 0, 0] == 0  # top-left corner
    assert crops[0, 24, 0, -1, -1] == h * w - 1  # bottom-right corner


def test_dense_on_a_crop_sized_input_equals_the_plain_net():
    model = tiny_model()
    x = torch.randn(4, 3, 32, 32)
    plain = model(x).softmax(1)
    torch.testing.assert_close(dense_posteriors(model.dense(), x, flip=False), plain, atol=1e-6, rtol=1e-5)


def test_dense_averages_scores_spatially_then_softmax_then_averages_the_flip():
    model = tiny_model(seed=1)
    x = torch.randn(2, 3, 96, 128)
    scores = model.dense()(x)  # (2, 3, 3, 4) class score map
    flipped = model.dense()(x.flip(-1))
    assert scores.shape[-2:] == (3, 4)
    expected = (scores.mean((2, 3)).softmax(1) + flipped.mean((2, 3)).softmax(1)) / 2
    torch.testing.assert_close(dense_posteriors(model.dense(), x, flip=True), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected, scores.softmax(1).mean((2, 3)))  # posteriors are not averaged per cell


def test_multicrop_averages_posteriors_over_the_50_crops():
    model = tiny_model(seed=2)
    x = torch.randn(3, 3, 40, 36)
    crops = grid_crops(x, 32)
    expected = model(crops.flatten(0, 1)).softmax(1).view(3, 50, -1).mean(1)
    torch.testing.assert_close(multicrop_posteriors(model, x, 32, chunk=60), expected, atol=1e-6, rtol=1e-5)


# ---- metrics ------------------------------------------------------------------------------


def test_topk_ties_count_as_the_chance_of_a_random_order_of_the_tied_classes():
    posteriors = torch.tensor([
        [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],  # four-way tie at the top: 1/4 correct at top-1, 3/4 at top-3
        [0.5, 0.2, 0.1, 0.1, 0.05, 0.05],  # true class 5 ties with class 4; four score higher
        [0.3, 0.3, 0.1, 0.1, 0.1, 0.1],  # true class 2: two strictly higher, tied with three others
        [0.1, 0.7, 0.2, 0.0, 0.0, float("nan")],  # true class 1 alone on top, beside a NaN
    ])
    targets = torch.tensor([3, 5, 2, 1])
    assert topk_correct(posteriors, targets, 1).tolist() == [0.25, 0.0, 0.0, 1.0]
    assert topk_correct(posteriors, targets, 3).tolist() == [0.75, 0.0, 0.25, 1.0]
    assert topk_correct(posteriors, targets, 5).tolist() == [1.0, 0.5, 0.75, 1.0]
    assert topk_error(posteriors, targets, 1) == pytest.approx(1 - 1.25 / 4)
    assert topk_error(posteriors, targets, 5) == pytest.approx(1 - 3.25 / 4)
    assert per_class_accuracy(posteriors, targets, 6) == [None, 1.0, 0.0, 0.25, None, 0.0]


def test_a_constant_output_is_right_once_in_as_many_classes_and_a_nan_score_never():
    targets = torch.arange(8) % 4
    assert topk_error(torch.full((8, 4), 1e-3), targets, 1) == pytest.approx(0.75)
    assert topk_error(torch.full((8, 4), float("nan")), targets, 1) == 1.0


def test_bf16_ties_leave_the_error_of_fp32_within_sampling_noise():
    logits = torch.randn(20_000, 1000, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.where(torch.arange(20_000) % 2 == 0, logits.argmax(1), logits.topk(2).indices[:, 1])
    fp32, bf16 = topk_error(logits, targets, 1), topk_error(logits.bfloat16().float(), targets, 1)
    assert fp32 == 0.5 and abs(bf16 - fp32) < 0.005  # ties for the true class would give about 0.485


def test_scales_from_the_recipe():
    assert derive_scales({"crop": 224, "scale": [256, 256]}) == [224, 256, 288]
    assert derive_scales({"crop": 224, "scale": [384, 384]}) == [352, 384, 416]
    assert derive_scales({"crop": 224, "scale": [256, 512]}) == [256, 384, 512]
    assert derive_scales({"crop": 32, "scale": [40, 40]}) == [35, 40, 45]  # offset 32 * 32/224 = 5
    assert derive_scales({"crop": 32, "scale": [36, 36]}) == [32, 36, 41]  # never below the crop
    assert derive_scales({"crop": 32, "scale": [36, 73]}) == [36, 54, 73]


def test_scales_without_a_training_scale_are_the_papers_scaled_by_the_crop():
    no_scale = {"crop": 32, "scale": None}
    assert net_scales({**no_scale, "crop": 224}, 224, None, "x.pth") == [256, 384, 512]
    assert net_scales(no_scale, 32, None, "x.pth") == [37, 55, 73]
    assert net_scales(no_scale, 32, [48, 40, 48], "x.pth") == [40, 48]
    assert net_scales(RECIPE, 32, None, "x.pt") == derive_scales(RECIPE)
    with pytest.raises(UserError, match=r"--scales \[24\] smaller than the crop 32 of x.pth"):
        net_scales(no_scale, 32, [24, 40], "x.pth")


def test_the_weights_convention_wins_over_the_data_folders_statistics(folder, tmp_path):
    caffe = replace(IMAGENET, std=(1.0, 1.0, 1.0), channels="BGR", value_scale=255.0)
    stats = replace(IMAGENET, mean=(0.3, 0.3, 0.3))
    save_preprocess(stats, tmp_path)
    with_convention, without = tmp_path / "caffe.pt", tmp_path / "plain.pt"
    save_checkpoint({"model": tiny_model().state_dict(), "recipe": {**RECIPE, "preprocess": caffe.to_dict()}},
                    with_convention)
    save_checkpoint({"model": tiny_model().state_dict(), "recipe": {**RECIPE, "preprocess": None}}, without)
    nets = load_nets([with_convention, without], None, tmp_path, torch.device("cpu"))
    assert [net.preprocess for net in nets] == [caffe, stats]
    assert load_nets([without], None, None, torch.device("cpu"))[0].preprocess == IMAGENET


def test_weights_without_a_classifier_are_refused(monkeypatch):
    import verydeep.io.sources
    import verydeep.io.weights

    model = tiny_model()
    headless = verydeep.io.weights.Published(model, {**RECIPE, "head": "random"}, "keras", "notop.h5")
    monkeypatch.setattr(verydeep.io.sources, "load_published", lambda source, weights_dir=None: headless)
    with pytest.raises(UserError, match="notop.h5: holds no classifier"):
        load_nets(["notop.h5"], None, None, torch.device("cpu"))


def test_balanced_subset_takes_classes_in_turn():
    targets = [0] * 5 + [1] * 3 + [2] * 4
    assert balanced_subset(targets, 7) == [0, 1, 2, 5, 6, 8, 9]
    assert balanced_subset(targets, None) == list(range(12))


# ---- evaluate() ---------------------------------------------------------------------------


def run(checkpoints, folder, **kwargs):
    return evaluate(checkpoints, folder, workers=0, progress=False, batch_size=4, **kwargs)


def test_evaluate_rows_and_fusion_of_two_nets(folder, checkpoint, second):
    protocols = ("dense", "multicrop", "dense+multicrop", "center")
    result = run([checkpoint, second], folder, protocols=protocols, keep_posteriors=True)
    assert [n.name for n in result.nets] == ["A S=36 #1", "A S=36 #2"]
    first = [r for r in result.rows if r.nets == ["A S=36 #1"]]
    assert [r.name.removeprefix("A S=36 #1: ") for r in first] == [
        "dense Q=32", "dense Q=36", "dense Q=41", "dense Q={32,36,41}",
        "multi-crop Q=32", "multi-crop Q=36", "multi-crop Q=41", "multi-crop Q={32,36,41}",
        "multi-crop & dense Q={32,36,41}", "centre crop 37/32",
    ]
    assert all(r.images == 12 and 0 <= r.top1_error <= 1 and r.top5_error == 0 for r in result.rows)
    fused = {r.protocol: r for r in result.rows if r.fusion}
    assert set(fused) == set(protocols) and result.main == fused["dense+multicrop"].name
    rows = result.posteriors.rows
    for protocol, row in fused.items():  # each fusion row: the average of the two nets' rows of its protocol
        members = [next(r for r in result.rows if r.nets == [net] and r.protocol == protocol and
                        r.scales == row.scales) for net in ("A S=36 #1", "A S=36 #2")]
        np.testing.assert_allclose(rows[row.name], (rows[members[0].name] + rows[members[1].name]) / 2, atol=1e-6)
    assert set(result.per_class_accuracy) == set(CLASSES)
    assert not result.imagenet_sized and all(r.paper is None for r in result.rows)
    tables = join_markdown(eval_tables(result))
    assert "Table 6" in tables and "fusion of A S=36 #1 + A S=36 #2" in rows_table(result).markdown()
    assert "| A S=36 #1 | multi-crop |" in tables and "(S=36) |" not in tables  # a twin's S said once


def test_the_same_weights_given_twice_are_refused(folder, checkpoint, tmp_path, capsys):
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    for again in (checkpoint, copy):
        assert main(["eval", "--weights", str(checkpoint), "--weights", str(again), "--data", str(folder),
                     "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--weights {again}: the weights of --weights {checkpoint} again" in err


def test_fusion_is_the_hand_average_of_the_members_posteriors_scored():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(40, 8, generator=g).softmax(1) for _ in range(3))
    targets = torch.randint(0, 8, (40,), generator=g)

    def member(net, scales):
        return RowSpec(f"{net}: multi-crop", "multicrop", scales, [net], len(scales) > 1, False)

    row, fused = fuse_rows([(member("A", [32, 36]), a), (member("B", [36, 41]), b), (member("C", [36]), c)], targets)
    hand = (a + b + c) / 3
    assert torch.equal(fused, hand)
    above = (hand > hand.gather(1, targets[:, None])).sum(1)  # classes scoring strictly higher than the truth
    assert (row.top1_error, row.top5_error) == (int((above >= 1).sum()) / 40, int((above >= 5).sum()) / 40)
    assert 0 < row.top1_error and 0 < row.top5_error < row.top1_error
    assert (row.name, row.protocol, row.nets, row.scales) == (
        "fusion of A + B + C: multi-crop", "multicrop", ["A", "B", "C"], [32, 36, 41])
    assert row.multi_scale and row.fusion and row.images == 40 and row.paper is None
    with pytest.raises(ValueError, match="one protocol"):
        fuse_rows([(member("A", [36]), a), (replace(member("B", [36]), protocol="dense"), b)], targets)


def test_eval_s_outputs_are_replaced_as_one_set_or_not_at_all(folder, checkpoint, second, tmp_path, monkeypatch):
    """A write that fails (here the posteriors', as on a full disk) leaves the three files of the last evaluation,
    not two of the new one beside the old posteriors."""
    from verydeep.eval import evaluate as evaluate_module

    first = run([checkpoint], folder, protocols=("dense",), scales=[36], keep_posteriors=True)
    write_outputs(first, tmp_path / "out")
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    second_result = run([checkpoint, second], folder, protocols=("dense",), scales=[36], keep_posteriors=True)

    def full(*_, **__):
        def write(tmp: str) -> None:
            raise OSError(28, "No space left on device")
        return write

    monkeypatch.setattr(evaluate_module, "posteriors_writer", full)
    with pytest.raises(UserError, match=r"posteriors\.npz: cannot be written \(No space left on device\)"):
        write_outputs(second_result, tmp_path / "out")
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before  # no temporary left


def test_the_posteriors_file_round_trips(folder, checkpoint, second, tmp_path):
    result = run([checkpoint, second], folder, protocols=("dense", "center"), keep_posteriors=True)
    kept = result.posteriors
    kept.readable[3] = False  # as an unread image would be: its rows NaN, and no row of its own in the rows'
    for array in kept.arrays.values():
        array[3] = np.nan
    kept.rows = {name: np.delete(posteriors, 3, axis=0) for name, posteriors in kept.rows.items()}
    write_outputs(result, tmp_path / "arrays")
    save_posteriors(tmp_path / "rows.npz", kept, rows=True)
    arrays_only = load_posteriors(tmp_path / "arrays" / "posteriors.npz")  # eval --out's file: no rows
    for saved, rows in ((arrays_only, {}), (load_posteriors(tmp_path / "rows.npz"), kept.rows)):
        assert saved.paths == kept.paths and np.array_equal(saved.targets, kept.targets)
        assert np.array_equal(saved.readable, kept.readable) and saved.readable.dtype == bool
        assert list(saved.arrays) == list(kept.arrays) and sorted(saved.arrays) == [
            f"net{i}_{kind}" for i in (0, 1) for kind in ("center_Q37", "dense_Q32", "dense_Q36", "dense_Q41")]
        for key, array in kept.arrays.items():  # every pass's posteriors as computed: float16 would tie classes
            assert saved.arrays[key].dtype == np.float32 and np.array_equal(saved.arrays[key], array, equal_nan=True)
        assert list(saved.rows) == list(rows)  # the rows' own posteriors exactly, in their order
        assert all(saved.rows[name].dtype == np.float32 and np.array_equal(saved.rows[name], rows[name])
                   for name in rows)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes((tmp_path / "rows.npz").read_bytes()[:500])
    with pytest.raises(UserError, match=r"damaged\.npz: not a readable \.npz file"):
        load_posteriors(damaged)
    np.savez(tmp_path / "foreign.npz", targets=kept.targets)
    with pytest.raises(UserError, match=r"foreign\.npz: not a verydeep posteriors file \(no paths, readable"):
        load_posteriors(tmp_path / "foreign.npz")
    with np.load(tmp_path / "rows.npz") as npz:
        good = dict(npz)
    for change, message in [
            ({"row0": np.where(good["row0"] == good["row0"].max(), np.inf, good["row0"])}, r"row0 holds posteriors "
             "that are not finite numbers in \\[0, 1\\]"),
            ({"net1_dense_Q36": -good["net1_dense_Q36"]}, "net1_dense_Q36 holds posteriors that are not finite"),
            ({"targets": np.where(np.arange(len(good["targets"])) == 0, 99, good["targets"])},
             r"targets outside the 3 classes of net0_dense_Q32: from 0 to 99"),
            ({"targets": good["targets"] + 0.5}, "readable must be booleans and targets integers; got bool and float"),
            ({"readable": good["readable"][:5]}, r"targets, paths, readable and row_names must be lists, the first"),
            ({"row1": good["row1"][:3]}, r"row1 must be 11 rows of class posteriors; got float32 of shape \(3, 3\)"),
            ({"net0_dense_Q32": good["net0_dense_Q32"].ravel()}, r"net0_dense_Q32 must be 12 rows of class"),
            ({"row_names": good["row_names"][None]}, "targets, paths, readable and row_names must be lists")]:
        np.savez(tmp_path / "bad.npz", **(good | change))
        with pytest.raises(UserError, match=r"^\S*bad\.npz: " + message):
            load_posteriors(tmp_path / "bad.npz")


def test_given_scales_limit_and_class_mismatch(folder, checkpoint, tmp_path):
    result = run([checkpoint], folder / "val", protocols=("dense",), scales=[48], limit=5)
    assert [r.name for r in result.rows] == ["dense Q=48"]
    assert result.images == 5
    other = tmp_path / "other.pt"
    save_checkpoint({"model": tiny_model().state_dict(),
                     "recipe": {**RECIPE, "classes": ["a", "b", "c"], "class_names": ["x", "y", "z"]}}, other)
    with pytest.raises(ValueError, match="other.pt: the data's class blue .blue. is not among the net's 3 classes"):
        run([other], folder)
    with pytest.raises(ValueError, match="the nets to fuse predict different classes: .*other.pt's are not .*net.pt's"):
        run([checkpoint, other], folder)
    with pytest.raises(ValueError, match="smaller than the crop"):
        run([checkpoint], folder, scales=[24])


def test_python_arguments_are_checked_as_their_flags_and_numpy_scales_give_json(folder, checkpoint):
    from verydeep.eval.predict import predict

    image = str(next((folder / "val").rglob("*.png")))
    for call, error, message in [
        (lambda: run(str(checkpoint), folder), TypeError, "sources: expected a list, got the single str"),
        (lambda: run([checkpoint], folder, protocols="dense"), TypeError, "protocols: expected a list"),
        (lambda: run([checkpoint], folder, scales=[40.5]), UserError, "--scales must be a whole number; got 40.5"),
        (lambda: run([checkpoint], folder, scales=[]), UserError, "--scales: give at least one scale"),
        (lambda: run([checkpoint], folder, limit=2.5), UserError, "--limit must be a whole number"),
        (lambda: predict(checkpoint, [], device="cpu"), UserError, "no image given"),
        (lambda: predict(checkpoint, image, device="cpu"), TypeError, "images: expected a list"),
        (lambda: predict(checkpoint, [image], topk=1.5), UserError, "--topk must be a whole number"),
    ]:
        with pytest.raises(error, match=message):
            call()
    result = run([checkpoint], folder, protocols=("dense",), scales=np.array([40, 48]), limit=np.int64(4))
    assert json.loads(json.dumps(result.to_dict()))["nets"][0]["scales"] == [40, 48] and result.images == 4
    prediction = predict(checkpoint, [image], scales=[np.int64(40)], device="cpu")
    assert json.loads(json.dumps(prediction.to_dict()))["scales"] == [40]


def test_unreadable_images_are_skipped_and_named(checkpoint, tmp_path):
    root = make_folder(tmp_path, per_class=2)
    (root / "val" / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run([checkpoint], root, protocols=("dense", "center"))
    assert result.skipped == [str(root / "val" / "green" / "broken.png")]
    assert result.images == 6 and all(r.images == 6 for r in result.rows)
    # over the images read, not the unreadable one (7 would be 14% off); each figure rounded to the millisecond
    assert all(t.seconds_per_image * 6 == pytest.approx(t.seconds, abs=6e-4) for t in [result.timing,
                                                                                        *result.timing.passes])


def papers_nets(names_configs, **recipe):
    """Full-width ImageNet nets trained at S in [256, 512] (built on the meta device: shapes, no memory)."""
    recipe = {**RECIPE, "config": "D", "num_classes": 1000, "crop": 224, "scale": [256, 512], "classes": None,
              "width": 1.0, **recipe}
    with torch.device("meta"):
        return [Net(name, "x.pt", model_from_recipe({**recipe, "config": c}), {**recipe, "config": c},
                    [256, 384, 512], IMAGENET) for name, c in names_configs]


def row(protocol, scales, members):
    return RowSpec("", protocol, scales, members, multi_scale=len(scales) > 1, fusion=len(members) > 1)


def test_paper_figures_stand_beside_imagenet_sized_rows():
    nets = papers_nets((("D S=256;512", "D"), ("E S=256;512", "E")))

    d = ["D S=256;512"]
    assert paper_figures(row("dense", [384], d), nets) == PaperFigures("Table 3", top1_error=0.256, top5_error=0.081)
    assert paper_figures(row("dense", [256], d), nets) is None  # the paper's single scale is 384
    assert paper_figures(row("dense", [256, 384, 512], d), nets).table == "Table 4"
    assert paper_figures(row("multicrop", [256, 384, 512], d), nets).top1_error == pytest.approx(0.246)
    assert paper_figures(row("dense", [224, 256, 288], d), nets) is None  # not the paper's test scales
    fused = paper_figures(row("dense+multicrop", [256, 384, 512], [n.name for n in nets]), nets)
    assert fused == PaperFigures("Table 6", top1_error=0.237, top5_error=0.068)


def test_rows_not_counted_as_the_paper_counts_carry_no_paper_figures():
    from verydeep.eval.rows import score_rows

    nets = papers_nets((("D S=256;512", "D"),))
    posteriors = {(0, "dense", q): torch.full((2, 1000), 1e-3) for q in (256, 384, 512)}
    valid, targets = torch.ones(2, dtype=torch.bool), torch.tensor([0, 1])
    as_paper, _ = score_rows(nets, posteriors, ["dense"], targets, valid)  # flipped, over the 1000 classes
    assert [r.paper.table for r in as_paper if r.paper] == ["Table 3", "Table 4"]
    unflipped, _ = score_rows(nets, posteriors, ["dense"], targets, valid, as_paper=False)  # --no-flip, a subset
    assert [r.paper for r in unflipped] == [None] * len(unflipped) and len(unflipped) == len(as_paper)


def test_paper_figures_stand_only_beside_nets_and_fusions_of_the_papers_kind():
    d = ["D S=256;512"]
    for recipe in ({"batch_norm": True}, {"width": 1 / 16}):  # not the nets the paper measured
        assert paper_figures(row("dense", [384], d), papers_nets((("D S=256;512", "D"),), **recipe)) is None
    three = papers_nets((("D S=256;512", "D"), ("E S=256;512", "E"), ("E2 S=256;512", "E")))
    assert paper_figures(row("dense", [256, 384, 512], [n.name for n in three]), three) is None  # not D + E


def test_table_7_s_figures_are_those_paper_md_states():
    paper = SHARED.parent / "PAPER.md"
    if not paper.is_file():
        pytest.skip(f"{paper} (the paper restated) is not beside the repository")
    text = " ".join(paper.read_text().split())
    best = figures.classification_errors(5, [figures.E_JITTERED], "dense+multicrop")
    assert f"the best single net, {best.top1:.1f}/{best.top5:.1f} ({best.test_top5:.1f} on test)" in text
    submission = figures.ILSVRC_SUBMISSION
    assert (f"7-net ILSVRC submission {submission.top1:.1f}/{submission.top5:.1f} ({submission.test_top5:.1f} top-5 on "
            "test)") in text


def test_the_papers_tables_as_data():
    assert figures.classification_errors(3, [figures.A_256]) == figures.TopErrors(29.6, 10.4)
    assert figures.classification_errors(4, [figures.A_256]) is None  # Table 4 starts at B
    assert figures.classification_errors(3, [figures.D_JITTERED], "multicrop") is None  # Tables 3 and 4 are dense
    assert figures.classification_errors(5, [figures.E_JITTERED], "multicrop") == figures.TopErrors(24.6, 7.4)
    fused = figures.classification_errors(6, [figures.E_JITTERED, figures.D_JITTERED], "dense+multicrop")
    assert fused == figures.TopErrors(23.7, 6.8, test_top5=6.8)  # the order of the fused nets does not matter
    assert figures.classification_errors(6, [figures.D_JITTERED, figures.D_JITTERED], "dense") is None
    assert figures.PaperNet.trained_at("D", 256, 512) == figures.D_JITTERED
    assert figures.classification_table("dense", multi_scale=False, fusion=False) == 3
    assert figures.classification_table("center", multi_scale=False, fusion=False) is None
    assert figures.TABLE_9[figures.LocalisationScales(384, (352, 384))] == figures.ValTest(27.5)
    assert figures.TABLE_11[("D", "E")].caltech256_recall == figures.Recall(86.2, 0.3)


def test_report_puts_the_papers_figures_beside_ours_in_their_row():
    def row(name, top1, top5, figures=None):
        return EvalRow(name, "dense", [384], [name], False, False, top1, top5, images=50, paper=figures)

    a, d = row("A", 0.30, 0.11), row("D", 0.27, 0.09, PaperFigures.lookup(3, [figures.D_JITTERED]))
    table = error_table("Table 3", ("ConvNet",), [(["A"], a), (["D"], d)], SEPARATE)
    assert table.markdown("###").splitlines() == [
        "### Table 3",
        "",
        "| ConvNet | top-1 val. error (%) | top-5 val. error (%) | paper top-1 | paper top-5 |",
        "|---|---:|---:|---:|---:|",
        "| A | 30.0 | 11.0 |  |  |",
        "| D | 27.0 | 9.0 | 25.6 | 8.1 |",
    ]
    assert table.to_dict()["rows"] == [["A", "30.0", "11.0", "", ""], ["D", "27.0", "9.0", "25.6", "8.1"]]
    paired = error_table("Table 3", ("ConvNet",), [(["A"], a), (["D"], d)], PAIRED).markdown().splitlines()
    assert paired[2:] == ["| A | 30.0 / 11.0 | - |", "| D | 27.0 / 9.0 | 25.6 / 8.1 |"]
    assert "paper" not in error_table("Table 3", ("ConvNet",), [(["A"], a)], SEPARATE).markdown()
    empty = Table("Table 6", [Column("fused nets")], empty="(one net: no fusion rows)")
    assert empty.markdown("###") == "### Table 6\n\n(one net: no fusion rows)"
    plain = Table("t", [Column("x"), Column("n", numeric=True)], [Row(("a", "1"))])
    assert plain.markdown() == "| x | n |\n|---|---:|\n| a | 1 |"


def test_result_to_dict_is_json_and_round_trips_rows(folder, checkpoint):
    result = run([checkpoint], folder, protocols=("dense", "center"), keep_posteriors=True)
    figures = PaperFigures("Table 3", top1_error=0.296, top5_error=0.104)
    result = replace(result, rows=[replace(result.rows[0], paper=figures), *result.rows[1:]])
    public = json.loads(json.dumps(result.to_dict()))
    assert "posteriors" not in public and public["timing"]["passes"][0]["pass"] == "Q=32"
    assert public["rows"][0]["paper"] == {"table": "Table 3", "top1_error": 0.296, "top5_error": 0.104}
    assert [EvalRow.from_dict(r) for r in public["rows"]] == result.rows
    assert isinstance(result, EvalResult) and public["nets"][0]["train_scale"] == [36, 36]


@pytest.mark.real_data("cifar10/test")
def test_real_cifar10_split_with_limit(tmp_path):
    classes = sorted(p.name for p in CIFAR.iterdir() if p.is_dir())
    recipe = {**RECIPE, "num_classes": 10, "classes": classes, "class_names": classes}
    path = tmp_path / "cifar.pt"
    save_checkpoint({"model": model_from_recipe(recipe).state_dict(), "recipe": recipe}, path)
    result = run([path], CIFAR.parent, limit=20, protocols=("dense", "center"))
    assert result.data == str(CIFAR) and result.images == 20
    assert [r.name for r in result.rows][-2:] == ["dense Q={32,36,41}", "centre crop 37/32"]


# ---- command line -------------------------------------------------------------------------


def test_cli_json_end_to_end(folder, checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "verydeep.cli", "eval", "--checkpoint", str(checkpoint), "--data", str(folder),
         "--scales", "32,40", "--workers", "0", "--json", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["protocol"] for r in result["rows"]} == {"dense", "multicrop", "dense+multicrop"}
    assert all({"top1_error", "top5_error", "images"} <= set(r) for r in result["rows"])
    assert result["main"] == "multi-crop & dense Q={32,40}" and set(result["per_class_accuracy"]) == set(CLASSES)
    assert "Table 3" in proc.stdout and "| dense Q=40 |" in proc.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]
    assert "Table 5" in (out / "results.md").read_text() and "not averaged in" not in (out / "results.md").read_text()
    assert np.load(out / "posteriors.npz")["net0_multicrop_Q40"].shape == (12, 3)
    unflipped = run([checkpoint], folder, protocols=("dense",), flip=False)
    report = write_outputs(unflipped, tmp_path / "unflipped") / "results.md"
    assert "The mirrored images were not averaged in (--no-flip)." in report.read_text()


def test_cli_weights_and_checkpoint_are_one_option_and_fuse(folder, checkpoint, second, capsys):
    argv = ["eval", "--weights", str(checkpoint), "--checkpoint", str(second), "--data", str(folder),
            "--protocol", "dense", "--scales", "36", "--workers", "0", "--no-progress", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [n["checkpoint"] for n in result["nets"]] == [str(checkpoint), str(second)]
    assert result["main"] == "fusion of A S=36 #1 + A S=36 #2: dense"
    assert main(["eval", "--data", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == "verydeep eval: error: give --weights SOURCE (or --checkpoint)"


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "missing.pt"], "missing.pt: no such file or folder"),
    (["--protocol", "tencrop"], "unknown protocol tencrop"),
    (["--scales", "256,x"], "expected comma-separated integers"),
    (["--scales", "32,40,32"], "a scale is listed twice in '32,40,32'"),
    (["--protocol", "center", "--scales", "64"], "--protocol center is one unflipped centre crop"),
    (["--protocol", "center", "--no-flip"], "so --no-flip would be ignored"),
])
def test_cli_errors_are_one_line(folder, checkpoint, capsys, argv, message):
    base = {"--checkpoint": str(checkpoint), "--data": str(folder)}
    args = ["eval", "--no-progress", "--workers", "0"]
    for flag, value in base.items():
        if flag not in argv:
            args += [flag, value]
    try:
        code = main(args + argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("batch_norm", [False, True])
def test_nets_held_in_bf16_give_the_posteriors_of_autocast(tmp_path, batch_norm):
    """Convolution and linear weights cast once for inference give every protocol's posteriors exactly as
    autocast casting them on each forward pass does; batch norm stays in fp32, as under autocast."""
    torch.manual_seed(0)
    recipe = {**RECIPE, "batch_norm": batch_norm}
    model = model_from_recipe(recipe)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics a training would have left
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    save_checkpoint({"model": model.state_dict(), "recipe": recipe}, tmp_path / "net.pt")
    cpu = torch.device("cpu")
    held = load_nets([tmp_path / "net.pt"], None, None, cpu, dtype=torch.bfloat16)[0]
    cast_each_pass = load_nets([tmp_path / "net.pt"], None, None, cpu)[0]
    for module in held.model.modules():
        expected = torch.bfloat16 if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) else torch.float32
        assert all(p.dtype == expected for p in module.parameters(recurse=False)), module
    assert {p.dtype for p in cast_each_pass.model.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 48, 40).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert held.dense(x).dtype == cast_each_pass.dense(x).dtype == torch.bfloat16
        torch.testing.assert_close(dense_posteriors(held.dense, x), dense_posteriors(cast_each_pass.dense, x),
                                   atol=0, rtol=0)
        torch.testing.assert_close(multicrop_posteriors(held.model, x, 32), multicrop_posteriors(
            cast_each_pass.model, x, 32), atol=0, rtol=0)


def test_evaluate_holds_the_nets_in_the_precision_it_runs(folder, checkpoint, monkeypatch):
    import verydeep.eval.evaluate as evaluate_module

    held = []
    loader = evaluate_module.load_nets

    def spy(*args, **kwargs):
        nets = loader(*args, **kwargs)
        held.append(nets[0].model.classifier[0].weight.dtype)
        return nets

    monkeypatch.setattr(evaluate_module, "load_nets", spy)
    for precision in ("bf16", "fp32"):
        assert run([checkpoint], folder, precision=precision).precision == precision
    assert held == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_nets_give_the_eager_posteriors(folder, checkpoint, monkeypatch, device):
    """``eval --compile``: every protocol's posteriors through ``torch.compile``d nets (whole images of several
    sizes included), equal to the eager ones up to rounding."""
    torch._dynamo.reset()
    compiled: list[Net] = []
    monkeypatch.setattr(Net, "compile", lambda net, original=Net.compile: (compiled.append(net), original(net)))
    protocols = ("dense", "multicrop", "center")
    options = {"protocols": protocols, "scales": [36], "device": device, "precision": "fp32", "keep_posteriors": True}
    eager = run([checkpoint], folder, **options)
    assert not compiled
    result = run([checkpoint], folder, **options, compile=True)
    assert len(compiled) == 1 and isinstance(compiled[0].run_dense, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the crops' net and the dense one
    for key, expected in eager.posteriors.arrays.items():
        np.testing.assert_allclose(result.posteriors.arrays[key], expected, atol=2e-3 if device == "cuda" else 1e-5,
                                   err_msg=key)
    assert [r.top1_error for r in result.rows] == [r.top1_error for r in eager.rows]


@pytest.mark.gpu
def test_cuda_posteriors_match_cpu(folder, checkpoint):
    cpu = run([checkpoint], folder, device="cpu", keep_posteriors=True)
    for precision, tolerance in (("fp32", 2e-3), ("bf16", 3e-2)):  # fp32 convs may use TF32 on the GPU
        gpu = run([checkpoint], folder, device="cuda", precision=precision, keep_posteriors=True)
        assert gpu.device.startswith("cuda") and gpu.precision == precision
        for key, expected in cpu.posteriors.arrays.items():
            np.testing.assert_allclose(gpu.posteriors.arrays[key], expected, atol=tolerance, err_msg=key)


@pytest.mark.gpu
def test_jpegs_decoded_on_the_gpu_give_the_cpu_posteriors(folder, checkpoint, tmp_path):
    for png in folder.rglob("*.png"):  # the same images as JPEGs, which nvJPEG decodes
        target = tmp_path / png.relative_to(folder).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).save(target, quality=95)
    on_cpu, on_gpu = (run([checkpoint], tmp_path, device="cuda", precision="fp32", decode=decode,
                          keep_posteriors=True) for decode in ("cpu", "gpu"))
    for key, expected in on_cpu.posteriors.arrays.items():  # decoders may differ by a grey level
        np.testing.assert_allclose(on_gpu.posteriors.arrays[key], expected, atol=2e-2, err_msg=key)


# ---- a net of more classes than the data's -------------------------------------------------------


def wide_net(tmp_path: Path) -> Path:
    """A net of six classes (the data's three among them, in another order, one found by name only)."""
    classes = ["n00", "red", "n02", "blue", "n04", "n05"]
    names = ["a", "red", "c", "blue", "e", "GREEN"]
    recipe = {**RECIPE, "num_classes": 6, "classes": classes, "class_names": names}
    path = tmp_path / "wide.pt"
    save_checkpoint({"model": tiny_model(seed=4, num_classes=6).state_dict(), "recipe": recipe}, path)
    return path


def test_a_net_of_more_classes_is_scored_over_its_softmax_or_over_the_datas_classes(folder, tmp_path):
    wide = wide_net(tmp_path)
    options = dict(protocols=["dense"], scales=[36], device="cpu", workers=0, progress=False, keep_posteriors=True)
    full = evaluate([wide], folder, **options)
    ours = evaluate([wide], folder, over_data_classes=True, **options)
    columns = [3, 5, 1]  # blue, green (by name), red among the net's six
    full_post = torch.from_numpy(full.posteriors.rows[full.main]).float()
    ours_post = torch.from_numpy(ours.posteriors.rows[ours.main]).float()
    assert full_post.shape == (12, 6) and ours_post.shape == (12, 3)
    torch.testing.assert_close(ours_post, full_post[:, columns] / full_post[:, columns].sum(1, keepdim=True),
                               atol=1e-3, rtol=1e-3)  # the kept posteriors are float16
    labels = torch.tensor([i // 4 for i in range(12)])
    assert full.rows[0].top1_error == pytest.approx(topk_error(full_post, torch.tensor(columns)[labels], 1))
    assert ours.rows[0].top1_error == pytest.approx(topk_error(ours_post, labels, 1))
    assert set(full.per_class_accuracy) == set(CLASSES)
    assert "full softmax of 6 classes" in full.scored and "data's 3 classes" in ours.scored
    assert "top-5 error is 0" not in full.scored and ours.scored.endswith("; top-5 error is 0 over 3 classes")


def test_a_data_class_the_net_does_not_know_is_refused_by_name(folder, tmp_path, capsys):
    path = tmp_path / "other.pt"
    recipe = {**RECIPE, "num_classes": 6, "classes": [f"n{i}" for i in range(6)],
              "class_names": [f"x{i}" for i in range(6)]}
    save_checkpoint({"model": tiny_model(num_classes=6).state_dict(), "recipe": recipe}, path)
    assert main(["eval", "--weights", str(path), "--data", str(folder), "--device", "cpu"]) == 2
    assert "the data's class blue (blue) is not among the net's 6 classes" in capsys.readouterr().err


def test_over_data_classes_is_refused_for_a_net_of_the_datas_classes(folder, checkpoint, tmp_path, capsys):
    argv = ["eval", "--weights", str(checkpoint), "--data", str(folder), "--device", "cpu", "--over-data-classes"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--over-data-classes: the net's 3 classes are the data's" in err
    permuted = tmp_path / "permuted.pt"  # the data's classes in another order: renormalising keeps them as they are
    recipe = {**RECIPE, "classes": ["red", "blue", "green"], "class_names": ["red", "blue", "green"]}
    save_checkpoint({"model": tiny_model().state_dict(), "recipe": recipe}, permuted)
    with pytest.raises(UserError, match="--over-data-classes: the net's 3 classes are the data's"):
        evaluate([permuted], folder, over_data_classes=True, protocols=["dense"], device="cpu", progress=False)


def permuted_copy(model, path: Path, order: list[int]) -> Path:
    """``model`` saved with its outputs, and its recipe's classes, in ``order``: the same net."""
    state = model.state_dict()
    for key in ("classifier.6.weight", "classifier.6.bias"):
        state[key] = state[key][order]
    save_checkpoint({"model": state, "recipe": {**RECIPE, "classes": [CLASSES[i] for i in order],
                                                "class_names": [CLASSES[i] for i in order]}}, path)
    return path


def test_nets_of_the_same_classes_in_another_order_fuse_class_by_class(folder, checkpoint, second, tmp_path,
                                                                      capsys):
    permuted = permuted_copy(tiny_model(seed=1), tmp_path / "permuted.pt", [2, 0, 1])  # outputs red, blue, green
    result = run([checkpoint, permuted], folder, protocols=("dense",), scales=[36], keep_posteriors=True)
    as_given = run([checkpoint, second], folder, protocols=("dense",), scales=[36], keep_posteriors=True)
    arrays = result.posteriors.arrays  # each net's posteriors in the first net's class order
    np.testing.assert_allclose(arrays["net1_dense_Q36"], as_given.posteriors.arrays["net1_dense_Q36"], atol=1e-6)
    assert not np.allclose(arrays["net0_dense_Q36"], arrays["net1_dense_Q36"], atol=1e-5)  # two nets
    assert [(r.top1_error, r.top5_error) for r in result.rows] == [(r.top1_error, r.top5_error)
                                                                   for r in as_given.rows]
    itself = permuted_copy(tiny_model(), tmp_path / "itself.pt", [2, 0, 1])  # the first net, its classes reordered
    assert main(["eval", "--weights", str(checkpoint), "--weights", str(itself), "--data", str(folder),
                 "--device", "cpu"]) == 2
    assert f"--weights {itself}: the weights of --weights {checkpoint} again" in capsys.readouterr().err
    alone = run([itself], folder, protocols=("dense",), scales=[36])
    assert alone.scored == ("over the 3 classes of the net and the data (the net's in another order); top-5 error "
                            "is 0 over 3 classes")
    other = tmp_path / "other.pt"  # a net of other classes is still refused
    recipe = {**RECIPE, "classes": ["a", "b", "c"], "class_names": ["a", "b", "c"]}
    save_checkpoint({"model": tiny_model().state_dict(), "recipe": recipe}, other)
    assert main(["eval", "--weights", str(checkpoint), "--weights", str(other), "--data", str(folder),
                 "--device", "cpu"]) == 2
    assert "the nets to fuse predict different classes" in capsys.readouterr().err


def test_scales_from_python_are_an_ordered_list_of_whole_numbers():
    from verydeep.options import whole_scales

    assert whole_scales(np.array([256, 384])) == whole_scales(torch.tensor([256, 384])) == [256, 384]
    for single in (256, np.int64(256), np.array(256), bytearray(b"ab")):
        with pytest.raises(TypeError, match="--scales: expected a list, got the single"):
            whole_scales(single)
    with pytest.raises(TypeError, match="expected an ordered list, got a set"):
        whole_scales({512, 256})
    for value in ([True], [256.0], [torch.tensor(True)]):
        with pytest.raises(UserError, match="--scales must be a whole number"):
            whole_scales(value)


def test_topk_takes_any_integer_targets_and_refuses_a_k_below_one_or_no_image():
    posteriors = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert topk_error(posteriors, torch.tensor([1, 0], dtype=torch.uint8), 1) == 0.0
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be a whole number of at least 1"):
            topk_correct(posteriors, torch.tensor([1, 0]), k)
    with pytest.raises(ValueError, match="over no image"):
        topk_error(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 1)


def test_a_class_name_matches_exactly_before_case_aside_and_a_shared_name_is_refused():
    from verydeep.eval.classmap import columns_of

    net_classes = ["n02113186", "n02963159", "n03000684", "n02012849", "n03126707"]
    net_names = ["Cardigan", "cardigan", "chain saw", "crane", "crane"]  # as torchvision's ImageNet names
    assert columns_of(net_classes, net_names, ["Cardigan", "cardigan"], ["Cardigan", "cardigan"], "x") == (0, 1)
    assert columns_of(net_classes, net_names, ["Chain Saw"], ["Chain Saw"], "x") == (2,)
    assert columns_of(net_classes, net_names, ["n03126707"], ["crane"], "x") == (4,)  # the synset decides
    with pytest.raises(UserError, match=r"x: the data's class crane \(crane\) is named as 2 of the net's classes "
                                        r"\(n02012849, n03126707\): name its folder by synset id"):
        columns_of(net_classes, net_names, ["crane"], ["crane"], "x")
    with pytest.raises(UserError, match="the data's class CARDIGAN .* is named as 2"):
        columns_of(net_classes, net_names, ["CARDIGAN"], ["CARDIGAN"], "x")
    decomposed = "chain\u0301  saw"  # as macOS names folders (the accent apart), with a double space
    assert columns_of(["a", "b"], ["chain\u0301 saw", "x"], [decomposed], [decomposed], "x") == (0,)
    assert columns_of(["a", "b"], ["café", "x"], ["cafe\u0301"], ["cafe\u0301"], "x") == (0,)


def test_a_state_dict_that_names_no_classes_scores_the_datas_classes_in_their_order(folder, checkpoint, tmp_path):
    """A torchvision state dict of a net fine-tuned on 3 classes numbers its outputs 0, 1, 2: on data whose class
    folders are named otherwise, they are the data's classes in the data's order, as for a recipe listing none
    (and as torchvision's ImageFolder ordered them); the numbers are those of the same net listing the names."""
    torch.save(tiny_model().state_dict(), tmp_path / "fine-tuned.pth")
    results = []
    for source in (tmp_path / "fine-tuned.pth", checkpoint):
        out = tmp_path / source.stem
        assert main(["eval", "--weights", str(source), "--data", str(folder), "--protocol", "dense", "--scales", "36",
                     "--precision", "fp32", "--device", "cpu", "--workers", "0", "--out", str(out), "--json",
                     "--no-progress"]) == 0
        results.append(json.loads((out / "results.json").read_text())["rows"])
    assert [(r["top1_error"], r["top5_error"], r["images"]) for r in results[0]] == [
        (r["top1_error"], r["top5_error"], r["images"]) for r in results[1]]
    numbered = tmp_path / "numbered.pt"  # a run of ours, trained on folders named 0, 1, 2: it names its classes
    save_checkpoint({"model": tiny_model().state_dict(), "recipe": {**RECIPE, "classes": ["0", "1", "2"],
                                                                    "class_names": ["0", "1", "2"]}}, numbered)
    assert main(["eval", "--weights", str(numbered), "--data", str(folder), "--protocol", "dense", "--scales", "36",
                 "--device", "cpu", "--workers", "0", "--no-progress"]) == 2


def test_fp32_evaluation_is_fp32_inside_a_callers_autocast(checkpoint, folder):
    """A notebook's bf16 autocast around evaluate() does not reach the fp32 evaluation it asked for."""
    options = dict(protocols=["dense"], scales=[36], device="cpu", workers=0, progress=False, keep_posteriors=True,
                   precision="fp32")
    plain = evaluate([checkpoint], folder, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = evaluate([checkpoint], folder, **options)
    assert plain.posteriors.arrays.keys() == autocast.posteriors.arrays.keys()
    for key, posteriors in plain.posteriors.arrays.items():
        np.testing.assert_array_equal(autocast.posteriors.arrays[key], posteriors, err_msg=key)
