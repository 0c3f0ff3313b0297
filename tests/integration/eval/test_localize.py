"""Localisation (Appendix A): the error criteria, greedy merging, the box regression task trained
through the trainer, and both protocols from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, save, tiny, write_dataset

from verydeep.cli import main
from verydeep.data import BadImageError, Batch, CenterCropTransform, RescaleTransform, SizeGroupedBatchSampler, to_input
from verydeep.data.decode import ImageFile
from verydeep.data.preprocess import Preprocess
from verydeep.data.transforms import render
from verydeep.errors import UserError
from verydeep.eval.localize import dense as dense_module
from verydeep.eval.localize import dense_nets
from verydeep.eval.localize.center import evaluate_center
from verydeep.eval.localize.dense import DenseNetResult, DenseResult, table_9
from verydeep.eval.localize.dense_nets import DenseNets, DenseOutput, inside, ranked
from verydeep.eval.localize.scoring import ilsvrc_wrong, merge_greedily, wrong
from verydeep.eval.localize.task import MIN_CODE_STD, Localisation, boxes_source, task_of
from verydeep.io.checkpoint import load_checkpoint
from verydeep.nn.model import VGG
from verydeep.train import train


def box(*corners: float) -> torch.Tensor:
    return torch.tensor(corners, dtype=torch.float32)


def test_an_image_is_wrong_when_its_box_overlaps_no_true_box_by_more_than_half():
    nan = float("nan")
    truth = torch.tensor([[[0.0, 0, 10, 10], [nan] * 4], [[0, 0, 10, 10], [20, 20, 30, 30]],
                          [[0, 0, 10, 20], [nan] * 4]])
    predicted = torch.stack([box(0, 0, 10, 10), box(21, 20, 30, 30), box(0, 0, 10, 10)])  # IoU 1, 0.9, exactly 0.5
    assert wrong(predicted, truth).tolist() == [False, False, True]


def test_table_8_s_figures_are_those_of_a_net_d_trained_at_s_384_with_the_same_head_and_layers():
    from verydeep.eval.localize.center import papers_figure

    d = {"config": "vgg16", "scale": [96, 96], "crop": 56}  # S = 96 at a 56-pixel crop: 384 at 224
    assert papers_figure(d, "pcr", "all") == 33.1 and papers_figure(d, "scr", "fc") == 36.4
    assert papers_figure(d, "scr", "all") is None  # a row the paper does not have
    for crop, s in ((32, 54), (32, 55), (64, 109), (128, 219)):  # 384 scaled to the crop, rounded either way
        assert papers_figure({**d, "crop": crop, "scale": [s, s]}, "pcr", "all") == 33.1
    for other in ({"config": "A"}, {"scale": [96, 120]}, {"scale": [64, 64]}, {"crop": 32}):
        assert papers_figure({**d, **other}, "pcr", "all") is None


def test_an_iou_of_exactly_a_half_is_wrong_in_a_crop_s_pixels_too():
    """The whole 76 x 116 image against a box of half its width and all its height, both mapped to the 32-pixel
    centre crop of S = 36 in float64, as protocol 1 scores them: in float32 the IoU became 0.5000001."""
    from verydeep.data import CenterCropTransform
    from verydeep.data.boxes import to_crop

    plan = CenterCropTransform(36, 32).plan((76, 116), False)
    half, whole = (to_crop(torch.tensor([corners], dtype=torch.float64), (76, 116), plan)
                   for corners in ([14.0, 0, 52, 116], [0.0, 0, 76, 116]))
    assert wrong(whole, half[None]).tolist() == [True]
    assert wrong(whole * torch.tensor([1, 1, 0.999, 1]), half[None]).tolist() == [False]  # a hair more: right


def test_an_iou_a_hair_above_a_half_is_right_in_a_crop_s_pixels_as_in_the_image_s():
    """A box of 200.001 of a 400-pixel width, all its height, against the whole image: IoU 0.5000025, right by
    the ILSVRC criterion (protocol 2's) and so by protocol 1's too."""
    from verydeep.data import CenterCropTransform
    from verydeep.data.boxes import to_crop

    plan = CenterCropTransform(36, 32).plan((400, 300), False)
    true_box, whole = (to_crop(torch.tensor([corners], dtype=torch.float64), (400, 300), plan)
                       for corners in ([0.0, 0, 200.001, 300], [0.0, 0, 400, 300]))
    assert not ilsvrc_wrong([(0, torch.tensor([0.0, 0, 400, 300]))], [(0, torch.tensor([0.0, 0, 200.001, 300]))])
    assert wrong(whole, true_box[None]).tolist() == [False]


def test_the_ilsvrc_criterion_needs_the_right_class_and_the_right_box_in_the_top_five():
    truth = [(3, box(0, 0, 10, 10))]
    assert not ilsvrc_wrong([(1, box(0, 0, 10, 10)), (3, box(1, 0, 10, 10))], truth)
    assert ilsvrc_wrong([(1, box(0, 0, 10, 10)), (3, box(20, 20, 30, 30))], truth)  # right class, wrong box
    assert ilsvrc_wrong([(c, box(0, 0, 10, 10)) for c in (0, 1, 2, 4, 5)] + [(3, box(0, 0, 10, 10))], truth)


def test_greedy_merging_averages_the_closest_boxes_until_none_overlap_enough():
    boxes = torch.stack([box(0, 0, 10, 10), box(1, 0, 11, 10), box(50, 50, 60, 60), box(0, 1, 10, 11)])
    merged, scores = merge_greedily(boxes, torch.ones(4))
    # (0,0,10,10) and (1,0,11,10) first (IoU 0.82 ties with the third pair; the lower index goes first),
    # then their mean (0.5,0,10.5,10) with (0,1,10,11); the far box stays alone.
    assert scores.tolist() == [3.0, 1.0]
    assert merged.tolist() == [[0.25, 0.5, 10.25, 10.5], [50, 50, 60, 60]]
    alone, _ = merge_greedily(torch.stack([box(0, 0, 10, 10), box(6, 0, 16, 10)]), torch.tensor([1.0, 2.0]))
    assert alone.tolist() == [[6, 0, 16, 10], [0, 0, 10, 10]]  # IoU 0.25: kept apart, best score first


def boxed_batch() -> Batch:
    nan = float("nan")
    boxes = torch.tensor([[[0.0, 0, 16, 16], [nan] * 4], [[8, 8, 32, 32], [0, 0, 4, 4]]])
    frames = torch.tensor([[0.0, 0, 32, 32], [0, 0, 32, 32]])  # each image fills its crop
    return Batch(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 2]), [], boxes, frames)


def test_per_class_regression_learns_the_true_class_box_only():
    task, batch = Localisation("pcr"), boxed_batch()
    targets = task.targets(batch, torch.device("cpu"))
    assert task.outputs(3) == 12 and targets.shape == (2, 2, 9)
    assert targets[1, 0].tolist() == [2, 0.25, 0.25, 1, 1, 0, 0, 1, 1]  # class, box, the image's frame
    outputs = torch.zeros(2, 12)
    outputs[0, 0:4] = torch.tensor([0.25, 0.25, 0.5, 0.5])  # image 0, class 0: exactly its box
    outputs[1, 8:12] = torch.tensor([0.625, 0.625, 0.75, 0.75])  # image 1, class 2: exactly its first box
    assert float(task.loss(outputs, targets)) == pytest.approx(0.0)
    assert task.metric_sums(outputs, targets) == [0.0]
    outputs[1, 8:12] = 0.0
    assert task.metric_sums(outputs, targets) == [100.0]
    assert Localisation("scr").outputs(3) == 4 and Localisation("scr").predicted(outputs, batch.labels).shape == (2, 4)


def test_protocol_one_scores_a_box_clipped_to_its_image():
    """A box that runs over the image's borders is scored as the part inside it, as protocol 2 scores it."""
    task = Localisation("scr")
    frames = torch.tensor([[0.0, 2, 32, 30]])  # the image fills the crop's width, not its height
    batch = Batch(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([0]), [], frames[:, None].clone(), frames)
    over = torch.tensor([[0.5, 0.5, 1.5, 1.5]])  # a box of 48 crop pixels about the centre: the whole image, clipped
    assert task.metric_sums(over, task.targets(batch, torch.device("cpu"))) == [0.0]  # unclipped, IoU 0.39
    outside = torch.tensor([[0.5, 1.2, 0.5, 0.2]])  # below the image: nothing of it inside
    assert task.metric_sums(outside, task.targets(batch, torch.device("cpu"))) == [100.0]


def test_standardised_targets_weigh_each_coordinate_by_its_spread_and_decode_back():
    mean, std = [0.5, 0.5, 0.6, 0.6], [0.1, 0.1, 0.2, 0.4]
    task, batch = Localisation("scr", code_mean=mean, code_std=std), boxed_batch()
    targets = task.targets(batch, torch.device("cpu"))
    torch.testing.assert_close(task.predicted(torch.zeros(2, 4), batch.labels), torch.tensor([mean, mean]))  # the mean
    true_codes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.625, 0.625, 0.75, 0.75]])
    outputs = (true_codes - torch.tensor(mean)) / torch.tensor(std)
    assert float(task.loss(outputs, targets)) == pytest.approx(0.0, abs=1e-10)
    assert task.metric_sums(outputs, targets) == [0.0]
    # an error of 0.1 crop side in x costs (0.1 / 0.1)^2, in height (0.1 / 0.4)^2: each in units of its spread
    off_x, off_h = outputs.clone(), outputs.clone()
    off_x[:, 0] += 1.0
    off_h[:, 3] += 0.25
    assert float(task.loss(off_x, targets)) == pytest.approx(2.0) and float(task.loss(off_h, targets)) == pytest.approx(
        2 * 0.25**2)
    again = task_of({"task": "localisation-scr", **task.record()})
    assert torch.equal(again.codes(outputs), task.codes(outputs))
    assert task_of({"task": "localisation-scr"}).codes(outputs).tolist() == outputs.tolist()  # older runs: raw


def test_a_classification_net_is_not_a_localisation_net():
    with pytest.raises(UserError, match="not a localisation net"):
        task_of({"task": "classification"})
    with pytest.raises(UserError, match="--head"):
        Localisation("xyz")


@pytest.fixture(scope="module")
def boxed(tmp_path_factory: pytest.TempPathFactory):
    """A dataset whose every image has a box (the central square), plus a classification run on it."""
    root = write_dataset(tmp_path_factory.mktemp("boxed"), {"train": 16, "val": 4})
    lines = [f"{path.relative_to(root).as_posix()} 8 6 35 33" for path in sorted(root.rglob("*.png"))]
    (root / "boxes.txt").write_text("\n".join(lines) + "\n")
    classifier = tmp_path_factory.mktemp("classifier")
    train(tiny(root, classifier, epochs=1, batch_norm=True))
    return root, classifier


def test_the_task_trains_from_a_classification_net_and_validates_protocol_one(boxed, tmp_path):
    root, classifier = boxed
    cfg = tiny(root, tmp_path, epochs=2, lr=1e-3, scale=(32, 32), batch_norm=True, weights=str(classifier))
    summary = train(cfg, task=Localisation("pcr"))
    assert summary.metric == "loc_error" and 0 <= summary.best <= 100
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert state["recipe"]["task"] == "localisation-pcr" and state["recipe"]["outputs"] == 16
    copied = state["recipe"]["start"]["copied"]
    assert "features.0.weight" in copied and "classifier.6.weight" not in copied  # FC8 starts random
    result = evaluate_center(tmp_path, root)
    assert result.images == 16 and result.whole_image_error == 100.0 and result.centre_prior_error == 0.0
    # every box: pixels 8..35 and 6..33 inclusive, so edges at 8, 6, 36, 34, in 44 x 40 images; at S = 32 the
    # image is rescaled to 35 x 32 (torchvision's rounding) and cut at its left edge 0..3, flipped or not, so the
    # codes, in crop sides, are a width of 28 x 35/44 / 32, a height of 28 / 40, a centre y of 20 / 40, a centre
    # x of (22 x 35/44 - left) / 32 or its mirror
    mean, std = torch.tensor(state["recipe"]["box_code_mean"]), torch.tensor(state["recipe"]["box_code_std"])
    torch.testing.assert_close(mean, torch.tensor([0.5, 0.5, 0.7, 0.7]), atol=5e-3, rtol=0)
    torch.testing.assert_close(mean[1:], torch.tensor([0.5, 28 * 35 / 44 / 32, 0.7]))
    torch.testing.assert_close(std, torch.tensor([2**0.5 / 40, MIN_CODE_STD, MIN_CODE_STD, MIN_CODE_STD]),
                               atol=2e-3, rtol=0)
    assert state["recipe"]["box_targets"] == "standardised"
    # reading the net on other boxes decodes through its own standardisation, never a refitted one
    other = tmp_path / "other-boxes.txt"
    other.write_text("".join(f"{p.relative_to(root).as_posix()} 0 0 20 20\n" for p in sorted(root.rglob("*.png"))))
    task = task_of(state["recipe"], other)
    train_set, _ = task.open_splits(str(root), CenterCropTransform(32, 32), CenterCropTransform(32, 32))
    task.fit(train_set, range(len(train_set)))
    assert task.code_mean.tolist() == state["recipe"]["box_code_mean"]


def test_protocol_one_clips_the_nets_box_to_the_image_as_the_whole_image_baseline_is(boxed, tmp_path):
    """A net whose one box runs over every image's borders: clipped, it is the whole image, and it is scored as
    the whole-image baseline is (every true box here the whole image: IoU 1 clipped, under 0.5 unclipped)."""
    root, classifier = boxed
    whole = tmp_path / "whole.txt"
    whole.write_text("".join(f"{p.relative_to(root).as_posix()} 0 0 43 39\n" for p in sorted(root.rglob("*.png"))))
    run = tmp_path / "loc"
    train(tiny(root, run, epochs=1, scale=(32, 32), batch_norm=True, weights=str(classifier)),
          task=Localisation("scr", boxes=whole))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    mean, std = torch.tensor(state["recipe"]["box_code_mean"]), torch.tensor(state["recipe"]["box_code_std"])
    state["model"]["classifier.6.weight"].zero_()
    state["model"]["classifier.6.bias"] = (torch.tensor([0.5, 0.5, 1.5, 1.5]) - mean) / std
    torch.save(state, tmp_path / "over.pt")
    result = evaluate_center(tmp_path / "over.pt", root, boxes=whole, progress=False)
    assert result.whole_image_error == 0.0 and result.localisation_error == 0.0


def protocol_one_over_seven(boxed, tmp_path, first_three: str, other_four: str):
    """Protocol 1 of a one-epoch SCR net over 7 validation images, the first three with the box ``first_three``,
    the others ``other_four`` (``x0 y0 x1 y1`` in the 44 x 40 images' pixels); the training images' box central."""
    root, classifier = boxed
    val = sorted((root / "val").rglob("*.png"))[:7]
    lines = [f"{p.relative_to(root).as_posix()} 8 6 35 33" for p in sorted((root / "train").rglob("*.png"))]
    lines += [f"{p.relative_to(root).as_posix()} {first_three if i < 3 else other_four}" for i, p in enumerate(val)]
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("\n".join(lines) + "\n")
    run = tmp_path / "loc"
    train(tiny(root, run, epochs=1, scale=(32, 32), batch_norm=True, weights=str(classifier)),
          task=Localisation("scr", boxes=boxes))
    return evaluate_center(run, root, boxes=boxes, progress=False)


def test_protocol_ones_errors_are_the_fractions_of_the_images_counted(boxed, tmp_path):
    """Over 7 validation images with a box, 3 of them the whole image: the whole-image baseline is wrong on 4/7."""
    result = protocol_one_over_seven(boxed, tmp_path, "0 0 43 39", "8 6 35 33")
    assert result.images == 7 and result.whole_image_error == 100 * 4 / 7
    assert result.localisation_error in {100 * wrong / 7 for wrong in range(8)}


def test_protocol_one_counts_an_iou_a_hair_above_a_half_right_and_exactly_a_half_wrong(boxed, tmp_path):
    """The whole 44 x 40 image against true boxes of all its height and 22.0001 of its width (IoU 0.5000023) on
    3 validation images, of 22 (IoU exactly 0.5) on 4: right on the 3, wrong on the 4, as protocol 2 counts."""
    result = protocol_one_over_seven(boxed, tmp_path, "0 0 21.0001 39", "0 0 21 39")
    assert result.images == 7 and result.whole_image_error == 100 * 4 / 7


def test_the_command_line_trains_and_evaluates_both_protocols(boxed, tmp_path, capsys, monkeypatch):
    root, classifier = boxed
    run = tmp_path / "loc"
    main(["localize", "train", "--data", str(root), "--weights", str(classifier), "--head", "scr", "--crop", "32",
          "--scale", "32", "--batch-size", "16", "--epochs", "1", "--workers", "0", "--device", "cpu",
          "--no-progress", "--freeze", "features", "--out", str(run)])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["metric"] == "loc_error"
    record = json.loads((run / "recipe.json").read_text())
    assert record["boxes"] == str(root / "boxes.txt")
    assert record["config"] == "A" and record["batch_norm"]  # the weights' own configuration, not the paper's D
    main(["localize", "eval", "--checkpoint", str(run), "--data", str(root), "--json"])
    center = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(center) >= {"localisation_error", "whole_image_error", "centre_prior_error"}
    main(["localize", "eval", "--weights", str(run), "--data", str(root), "--fine-tuned", "fc"])  # as eval's
    table = capsys.readouterr().out
    assert "| FC1-FC2 | SCR |" in table and "36.4 |" not in table  # net A at S = 32, not the paper's D at 384
    main(["localize", "eval", "--checkpoint", str(run), "--data", str(root), "--protocol", "dense", "--classifier",
          str(classifier), "--scales", "32,40", "--json"])
    dense = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert dense["images"] == 16 and dense["scales"] == [32, 40] and 0 <= dense["localisation_error"] <= 100
    assert dense["centre_prior_error"] == 0.0 and dense["whole_image_error"] == 100.0  # every box is the same
    calls = iter(range(12))  # of 12 images every one but the 6th and 12th wrong: 10/12, which no float32 is
    monkeypatch.setattr(dense_module, "image_misses", lambda *args: torch.full((4,), float(next(calls) % 6 != 5)))
    main(["localize", "eval", "--checkpoint", str(run), "--data", str(root), "--protocol", "dense", "--classifier",
          str(classifier), "--limit", "12", "--json"])
    twelve = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert twelve["images"] == 12 and twelve["localisation_error"] == twelve["whole_image_error"] == 100 * 10 / 12
    monkeypatch.undo()
    main(["localize", "eval", "--checkpoint", str(run), "--data", str(root), "--protocol", "dense", "--classifier",
          str(classifier)])
    assert "### Table 9" in capsys.readouterr().out
    assert main(["localize", "eval", "--checkpoint", str(run), "--data", str(root), "--protocol", "dense"]) == 2
    assert "--classifier" in capsys.readouterr().err
    image = next((root / "val").rglob("*.png"))
    main(["localize", "predict", str(image), "--checkpoint", str(run), "--classifier", str(classifier), "--top", "2",
          "--out", str(tmp_path / "drawn")])
    predicted = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(predicted["predictions"]) == 2 and (tmp_path / "drawn" / f"{image.stem}.png").is_file()
    assert main(["localize", "eval", "--checkpoint", str(classifier), "--data", str(root)]) == 2
    assert "not a localisation net" in capsys.readouterr().err


def test_the_union_of_several_nets_boxes_is_merged_as_one_set():
    pcr = torch.stack([torch.stack([box(0, 0, 10, 10), box(40, 40, 50, 50)]),  # the first class's boxes
                       torch.stack([box(5, 5, 15, 15), box(6, 5, 16, 15)])])  # the second class's
    scr = torch.stack([box(1, 0, 11, 10), box(40, 41, 50, 51), box(0, 1, 10, 11)])[None]  # one set for all classes
    pcr_scores, scr_scores = torch.tensor([[0.3, 0.2], [0.5, 0.1]]), torch.tensor([[0.2, 0.1, 0.2], [0.1, 0.2, 0.3]])
    output = DenseOutput(torch.tensor([3, 1]), torch.tensor([0.6, 0.3]), [pcr, scr], (64, 64), [pcr_scores, scr_scores])
    guesses = ranked(output)
    assert [(g.label, g.score) for g in guesses] == [(3, pytest.approx(0.6)), (1, pytest.approx(0.3))]
    for rank, guess in enumerate(guesses):  # an SCR box has a score per class
        by_hand = merge_greedily(torch.cat([pcr[rank], scr[0]]), torch.cat([pcr_scores[rank], scr_scores[rank]]))
        assert guess.box.tolist() == by_hand[0][0].tolist()
    assert ranked(output, [0])[0].box.tolist() == merge_greedily(pcr[0], pcr_scores[0])[0][0].tolist()
    assert guesses[0].box.tolist() == [0.25, 0.5, 10.25, 10.5]  # three boxes of two nets, merged into one


def test_the_box_kept_is_the_best_scored_not_the_most_merged():
    lone, pair = box(0, 0, 10, 10), torch.stack([box(40, 40, 50, 50), box(41, 40, 51, 50)])  # the pair: IoU 0.82
    boxes = [torch.cat([lone[None], pair])[None]]  # one SCR net: one set for both classes

    def kept(scores: list[list[float]]) -> list[list[float]]:
        output = DenseOutput(torch.tensor([0, 1]), torch.tensor([0.7, 0.2]), boxes, (64, 64), [torch.tensor(scores)])
        return [guess.box.tolist() for guess in ranked(output)]

    # class 0: the lone box's location is sure of it (0.9 > 0.2 + 0.2); class 1: the pair's locations (0.1 < 0.6)
    assert kept([[0.9, 0.2, 0.2], [0.1, 0.3, 0.3]]) == [[0, 0, 10, 10], [40.5, 40, 50.5, 50]]
    assert kept([[0.3, 0.3, 0.3], [0.3, 0.3, 0.3]]) == [[40.5, 40, 50.5, 50]] * 2  # equal: the merged pair's sum wins


def test_predicted_boxes_are_clipped_to_the_image_and_a_degenerate_one_never_wins():
    degenerate = box(-66.2, -216.4, -66.2, -216.4)  # no area, outside the 71 x 68 image
    boxes = [torch.stack([degenerate, box(-10, 5, 30, 90), box(60, 60, 60.5, 60)])[None]]
    output = DenseOutput(torch.tensor([0]), torch.tensor([1.0]), boxes, (71, 68), [torch.tensor([[1.0, 0.2, 0.9]])])
    assert ranked(output)[0].box.tolist() == [0, 5, 30, 68]  # the only box with an area inside, clipped
    nothing = DenseOutput(torch.tensor([0]), torch.tensor([1.0]), [degenerate[None, None]], (71, 68),
                          [torch.tensor([[1.0]])])
    assert ranked(nothing)[0].box.tolist() == [0, 0, 71, 68]  # no box inside: the whole image


def random_nets(classes: int = 3, classifier_crop: int = 32) -> DenseNets:
    """A random width-1/16 PCR localisation net (net A, 32-pixel crops) and classifier (``classifier_crop``),
    in dense form."""
    torch.manual_seed(0)
    identity = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    pre = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (1.0, 1.0, 1.0), identity)
    locate = VGG("A", 4 * classes, width=1 / 16, input_size=32).eval()
    classify = VGG("A", classes, width=1 / 16, input_size=classifier_crop).eval()
    recipe = {"task": "localisation-pcr", "crop": 32, "preprocess": pre.to_dict()}
    return DenseNets([locate.dense()], classify.dense(), [recipe], {"preprocess": pre.to_dict()}, [pre], pre,
                     torch.device("cpu"))


def random_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Random RGB images of the given (width, height), saved as PNGs."""
    from PIL import Image

    rng, paths = np.random.default_rng(0), []
    for i, (w, h) in enumerate(sizes):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def class_maps(nets: DenseNets, path: Path, scale: int) -> torch.Tensor:
    """By hand: the classifier's dense softmax (classes, h, w) on an image rescaled to ``scale``."""
    file = ImageFile(path)
    image = render(file, RescaleTransform(scale).plan(file.size, False))[None]
    with torch.no_grad():
        return nets.classify(to_input(image, Preprocess.from_dict(nets.classifier_recipe["preprocess"])))[0].softmax(0)


def test_each_location_is_scored_by_the_classifiers_posterior_there(tmp_path):
    paths = random_images(tmp_path, [(44, 40), (36, 48), (44, 40)])
    nets = random_nets()
    for path, output in zip(paths, nets.outputs(paths, [32, 64], top=2), strict=True):
        maps = torch.cat([class_maps(nets, path, q).flatten(1) for q in (32, 64)], dim=1)  # (classes, 1 + 2x2)
        assert output.box_scores[0].shape == (2, 5) and not torch.allclose(maps[:, 1:], maps[:, :1].expand(-1, 4))
        torch.testing.assert_close(output.box_scores[0], maps[output.labels], atol=1e-5, rtol=1e-4)
    # a classifier of 64-pixel crops has a grid one location smaller each way (its FC6 sees 2x2 of the
    # trunk, the loc net's 1x1): each location gets the classifier's posterior averaged over its locations
    nets = random_nets(classifier_crop=64)
    for path, output in zip(paths, nets.outputs(paths, [64, 96], top=2), strict=True):
        maps = [class_maps(nets, path, q) for q in (64, 96)]
        expected = torch.cat([m.mean(dim=(1, 2))[output.labels, None].expand(-1, (m.shape[1] + 1) * (m.shape[2] + 1))
                              for m in maps], dim=1)
        torch.testing.assert_close(output.box_scores[0], expected, atol=1e-5, rtol=1e-4)


def test_images_of_the_same_size_go_through_the_nets_together_as_they_would_one_by_one(tmp_path):
    paths = random_images(tmp_path, [(44, 40), (36, 48), (44, 40), (44, 40), (36, 48)])
    nets, calls = random_nets(), []
    forward = nets.forward
    nets.forward = lambda images: calls.append(len(images)) or forward(images)
    batched = nets.outputs(paths, [32, 64], top=2, batch_size=8)
    assert sorted(calls) == [2, 2, 3, 3]  # two sizes, two scales
    one_by_one = [nets.outputs([path], [32, 64], top=2)[0] for path in paths]
    for a, b in zip(batched, one_by_one, strict=True):
        assert a.labels.tolist() == b.labels.tolist() and a.size == b.size
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
        assert a.boxes[0].shape == b.boxes[0].shape == (2, 5, 4)  # two classes, 1 + 2x2 locations
        assert torch.allclose(a.boxes[0], b.boxes[0], atol=1e-5)
        assert a.box_scores[0].shape == (2, 5) and torch.allclose(a.box_scores[0], b.box_scores[0], atol=1e-5)


def test_each_scale_is_one_pass_batched_by_size_there_and_workers_read_the_same_outputs(tmp_path, monkeypatch):
    paths = random_images(tmp_path, [(44, 40), (36, 48), (45, 40), (46, 40), (44, 40)])
    nets, sampled, calls = random_nets(), [], []

    class Recording(SizeGroupedBatchSampler):
        def __init__(self, dataset, q: int, batch_size: int) -> None:
            super().__init__(dataset, q, batch_size)
            sampled.append((q, self.batches))

    monkeypatch.setattr(dense_nets, "SizeGroupedBatchSampler", Recording)
    forward = nets.forward
    nets.forward = lambda images: calls.append(tuple(images.shape)) or forward(images)
    read_here = nets.outputs(paths, [32, 64], top=2, batch_size=8)
    # (45, 40) and (46, 40) share their size at Q = 32 (36 x 32) and not at 64 (72 x 64, 73 x 64)
    assert sampled == [(32, [[0, 4], [1], [2, 3]]), (64, [[0, 4], [1], [2], [3]])]
    assert calls == [(2, 3, 32, 35), (1, 3, 42, 32), (2, 3, 32, 36),
                     (2, 3, 64, 70), (1, 3, 85, 64), (1, 3, 64, 72), (1, 3, 64, 73)]
    read_by_workers = nets.outputs(paths, [32, 64], top=2, batch_size=8, workers=2)
    for a, b in zip(read_here, read_by_workers, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores) and a.size == b.size
        assert all(torch.equal(x, y) for x, y in zip([*a.boxes, *a.box_scores], [*b.boxes, *b.box_scores], strict=True))
    # an image that cannot be read, from its header or past it, is an error naming it: every image has an output
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "cut.png").write_bytes(paths[0].read_bytes()[:200])
    for bad in ("text.png", "cut.png"):
        for workers in (0, 1):
            with pytest.raises(BadImageError, match=f"{bad}: unreadable image"):
                nets.outputs([paths[0], tmp_path / bad], [32], workers=workers)


def dense_result(crop: int, scales: list[int], nets: int = 1, config: str = "D") -> DenseResult:
    members = [DenseNetResult(f"runs/loc{i}", "pcr", 64, crop, 40.0 + i, config=config) for i in range(nets)]
    return DenseResult("runs/loc0", "runs/cls", scales, 8, 37.5, 75.0, 50.0, members)


def test_table_9_sets_our_rows_beside_the_papers():
    table = table_9(dense_result(32, [64])).markdown("###")
    assert "### Table 9" in table and "| loc0 (PCR) | 64 | 64 | 40.0 | - | - |" in table
    assert "| whole image box | - | 64 | 75.0 |" in table and "| mean training box | - | 64 | 50.0 |" in table
    for paper in ("| 256 | 256 | - | 29.5 | - |", "| 384 | 384 | - | 28.2 | 26.7 |",
                  "| 384 | {352,384} | - | 27.5 | - |", "| paper: fusion of its nets | - | - | - | 26.9 | 25.3 |"):
        assert paper in table
    # at a 56-pixel crop S = Q = 64 is the paper's 256: its figures beside ours, not a row of their own
    scaled = table_9(dense_result(56, [64])).markdown()
    assert "| loc0 (PCR) | 64 | 64 | 40.0 | 29.5 | - |" in scaled and "| 256 | 256 |" not in scaled
    fused = table_9(dense_result(32, [56, 64], nets=2)).markdown()
    assert "| loc1 (PCR) | 64 | {56,64} | 41.0 | - | - |" in fused
    assert "| union of loc0 + loc1 | 64 | {56,64} | 37.5 | 26.9 | 25.3 |" in fused and "paper: fusion" not in fused
    cifar = DenseResult("runs/loc0", "runs/cls", [36], 8, 37.5, 75.0, 50.0, [DenseNetResult("runs/loc0", "pcr", 36,
                                                                                         32, 40.0, "D")])
    assert "| loc0 (PCR) | 36 | 36 | 40.0 | 29.5 | - |" in table_9(cifar).markdown()  # 256 -> 36 at 32 pixels
    jittered = dense_result(56, [64], nets=2)  # S in 64:92 at a 56-pixel crop is not the paper's fixed 256
    jittered.nets[1].scale_max = 92
    table = table_9(jittered).markdown()
    assert "| loc1 (PCR) | 64:92 | 64 | 41.0 | - | - |" in table
    assert "| loc0 (PCR) | 64 | 64 | 40.0 | 29.5 | - |" in table
    assert "| union of loc0 + loc1 | {64,64:92} | 64 | 37.5 | - | - |" in table  # not all of the paper's kind
    other = table_9(dense_result(56, [64], nets=2, config="A")).markdown()  # Table 9's rows are D's, PCR
    assert "| loc0 (PCR) | 64 | 64 | 40.0 | - | - |" in other and "| 256 | 256 | - | 29.5 | - |" in other
    assert "| union of loc0 + loc1 | 64 | 64 | 37.5 | - | - |" in other
    scr = dense_result(56, [64])
    scr.nets[0].head = "scr"
    assert "| loc0 (SCR) | 64 | 64 | 40.0 | - | - |" in table_9(scr).markdown()
    assert set(dense_result(32, [64]).to_dict()) == {"checkpoint", "classifier", "scales", "images",
                                                    "localisation_error", "whole_image_error", "centre_prior_error"}
    assert [net["localisation_error"] for net in dense_result(32, [64], nets=2).to_dict()["nets"]] == [40.0, 41.0]


@pytest.fixture(scope="module")
def two_nets(boxed, tmp_path_factory: pytest.TempPathFactory):
    """Two localisation runs (PCR and SCR, FC layers fine-tuned from the classifier) on the boxed dataset."""
    root, classifier = boxed
    runs = []
    for head, seed in (("pcr", 0), ("scr", 1)):
        runs.append(tmp_path_factory.mktemp(head))
        train(tiny(root, runs[-1], scale=(32, 32), lr=1e-3, batch_norm=True, weights=str(classifier), seed=seed,
                   freeze="features"), task=Localisation(head))
    return root, classifier, runs


def test_a_box_regressor_s_last_layer_starts_random_whatever_its_size(two_nets):
    """Appendix A: from the classifier, the last layer random; the SCR head's 4 outputs fit a 4-class FC8."""
    _, classifier, runs = two_nets
    for run in runs:  # PCR (16 outputs) and SCR (4, as many as the classifier's classes)
        copied = json.loads((run / "recipe.json").read_text())["start"]["copied"]
        assert "classifier.3.weight" in copied and not any(name.startswith("classifier.6.") for name in copied)
    scr, source = (load_checkpoint(path)["model"]["classifier.6.weight"]
                   for path in (runs[1] / "checkpoints" / "last.pt", classifier / "checkpoints" / "last.pt"))
    assert scr.shape == source.shape and not torch.equal(scr, source)


def test_a_net_given_twice_is_refused_where_the_nets_boxes_are_pooled(two_nets, capsys, tmp_path):
    """Pooled with itself a net's boxes would read as two nets' union: one file twice, or a run and its weights."""
    root, classifier, runs = two_nets
    image = next((root / "val").rglob("*.png"))
    for again in (runs[0], runs[0] / "model.safetensors"):
        twice = ["--checkpoint", str(runs[0]), "--checkpoint", str(again), "--classifier", str(classifier)]
        for command in (["localize", "eval", "--data", str(root), "--protocol", "dense", *twice],
                        ["localize", "predict", str(image), *twice, "--out", str(tmp_path / "drawn")]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"--checkpoint {again}: the weights of --checkpoint {runs[0]} again" in err
    assert not (tmp_path / "drawn").exists()


def test_several_nets_pool_their_boxes_and_one_net_keeps_its_output(two_nets, capsys, tmp_path):
    root, classifier, runs = two_nets
    dense = ["localize", "eval", "--data", str(root), "--protocol", "dense", "--classifier", str(classifier),
             "--scales", "32,40", "--json"]
    main([*dense, "--checkpoint", str(runs[0]), "--checkpoint", str(runs[1])])
    both = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [net["head"] for net in both["nets"]] == ["pcr", "scr"] and both["checkpoint"] == str(runs[0])
    image = next((root / "val").rglob("*.png"))
    main(["localize", "predict", str(image), "--checkpoint", str(runs[0]), "--checkpoint", str(runs[1]),
          "--classifier", str(classifier), "--scales", "32,40", "--out", str(tmp_path)])
    predicted = json.loads(capsys.readouterr().out.splitlines()[-1])["predictions"]
    output = DenseNets.load(runs, classifier, "cpu").outputs([image], [32, 40])[0]
    assert len(predicted) == len(output.labels) == 4 and output.boxes[1].shape == (1, 2, 4)  # SCR: 1 + 1 locations
    assert [scores.shape for scores in output.box_scores] == [(4, 2), (4, 2)]  # per class, whatever the head
    for rank, guess in enumerate(predicted):
        union = torch.cat([output.boxes[0][rank], output.boxes[1][0]])  # the PCR net's boxes of the class, the SCR's
        scores = torch.cat([output.box_scores[0][rank], output.box_scores[1][rank]])
        clipped = inside(union, scores, output.size)  # boxes clipped to the image, none without area
        assert guess["box"] == pytest.approx(merge_greedily(*clipped)[0][0].tolist(), abs=0.051)
    main([*dense, "--checkpoint", str(runs[0])])
    one = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "nets" not in one and one["localisation_error"] == both["nets"][0]["localisation_error"]
    assert {key: one[key] for key in ("whole_image_error", "centre_prior_error")} == {
        key: both[key] for key in ("whole_image_error", "centre_prior_error")}
    center = ["localize", "eval", "--data", str(root), "--json", "--checkpoint", str(runs[0])]
    main(center)
    assert set(json.loads(capsys.readouterr().out.splitlines()[-1])) == {
        "checkpoint", "head", "fine_tuned", "images", "boxes", "localisation_error", "whole_image_error",
        "centre_prior_error", "paper_error"}
    main([*center, "--checkpoint", str(runs[1] / "checkpoints" / "best.pt")])
    several = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert several["checkpoint"] == str(runs[0]) and [net["head"] for net in several["nets"]] == ["pcr", "scr"]
    main([*center[:4], "--checkpoint", str(runs[0]), "--checkpoint", str(runs[1]), "--fine-tuned", "fc"])
    table = capsys.readouterr().out
    assert f"| {runs[0].name} | FC1-FC2 | PCR |" in table and f"| {runs[1].name} | FC1-FC2 | SCR |" in table
    assert main([*center, "--checkpoint", str(runs[1]), "--fine-tuned", "fc", "--fine-tuned", "all",
                 "--fine-tuned", "fc"]) == 2
    assert "--fine-tuned given 3 times" in capsys.readouterr().err


def test_the_run_records_its_boxes_and_eval_reads_them_when_the_data_has_none(boxed, tmp_path, capsys, monkeypatch):
    _, classifier = boxed
    monkeypatch.chdir(tmp_path)
    root = write_dataset(tmp_path / "data", {"train": 4, "val": 1})
    boxes = tmp_path / "elsewhere" / "my-boxes.txt"
    boxes.parent.mkdir()
    boxes.write_text("".join(f"{path.relative_to(root).as_posix()} 8 6 35 33\n" for path in root.rglob("*.png")))
    run = tmp_path / "loc"
    main(["localize", "train", "--data", str(root), "--boxes", "elsewhere/my-boxes.txt",
          "--weights", str(classifier), "--crop", "32", "--scale", "32", "--batch-size", "16", "--epochs", "1",
          "--workers", "0", "--device", "cpu", "--no-progress", "--freeze", "features", "--out", str(run)])
    capsys.readouterr()
    record = json.loads((run / "recipe.json").read_text())
    assert record["boxes"] == str(boxes) and record["boxes_data"] == str(root)  # made absolute
    assert load_checkpoint(run / "checkpoints" / "last.pt")["recipe"]["boxes"] == str(boxes)  # and carried along
    main(["localize", "eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--data", str(root), "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["images"] == 4 and result["boxes"] == str(boxes)  # the boxes used, named
    # other data without boxes of its own: the recorded boxes are not its boxes
    other = write_dataset(tmp_path / "other", {"train": 4, "val": 1})
    assert main(["localize", "eval", "--checkpoint", str(run), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"({boxes}) is not of this data; give the boxes file of {other} with --boxes" in err and err.count("\n") == 1
    main(["localize", "eval", "--checkpoint", str(run), "--data", str(other), "--boxes", "elsewhere/my-boxes.txt"])
    assert capsys.readouterr().out.rstrip().endswith(f"Boxes: {boxes}")
    boxes.rename(boxes.with_suffix(".moved"))
    assert main(["localize", "eval", "--checkpoint", str(run), "--data", str(root)]) == 2
    assert "boxes.txt does not exist" in capsys.readouterr().err


def test_eval_falls_back_only_to_recorded_boxes_of_the_data_given(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (data, elsewhere):
        folder.mkdir()
        (folder / "boxes.txt").write_text("a/x.png 1 1 2 2\n")
    inside, outside = data / "boxes.txt", elsewhere / "boxes.txt"
    assert boxes_source(None, data, [{"boxes": str(outside)}]) == inside  # the data's own boxes first
    inside = inside.rename(data / "mine.txt")
    assert boxes_source("given.txt", data, [{"boxes": str(outside)}]) == Path("given.txt")
    assert boxes_source(None, data, [{"boxes": str(inside)}]) == inside  # under the data: its own
    assert boxes_source(None, data, [{"boxes": str(outside), "boxes_data": str(data)}]) == outside  # read for it
    assert boxes_source(None, data, [{}, {"boxes": str(tmp_path / "gone.txt")}]) == data / "boxes.txt"
    for recipe in ({"boxes": str(outside)}, {"boxes": str(outside), "boxes_data": str(elsewhere)}):
        with pytest.raises(UserError, match=rf"^{data}: no boxes.txt, and the boxes file .* \({outside}\) is not of"):
            boxes_source(None, data, [recipe])


def test_protocol_2_refuses_an_unreadable_validation_image_with_a_box_which_protocol_1_leaves_out(tmp_path):
    root = write_dataset(tmp_path / "data", {"train": 1, "val": 2})
    lines = [f"{p.relative_to(root).as_posix()} 0 0 9 9" for p in sorted(root.rglob("*.png"))]
    (root / "boxes.txt").write_text("\n".join(lines) + "\n")
    bad = sorted(root.glob("val/*/*.png"))[0]
    bad.write_bytes(b"")  # its size cannot be read: no output for it
    transform = CenterCropTransform(32, 32)
    _, val_set = Localisation("scr").open_for_eval(str(root), transform)
    assert str(bad) not in [str(path) for path, _ in val_set.samples] and len(val_set.samples) == 7
    with pytest.raises(BadImageError, match=f"^{bad}: unreadable image, which protocol 2 cannot leave out$"):
        Localisation("scr").open_for_eval(str(root), transform, dense_nets.unreadable_image)


def test_the_box_statistics_come_from_exactly_the_boxes_trained_on(tmp_path):
    root = write_dataset(tmp_path / "data", {"train": 3, "val": 1})
    images = sorted(root.glob("train/*/*.png"))
    (images[0]).write_bytes(b"not a png")  # unreadable: its box is never used
    lines = [f"{p.relative_to(root).as_posix()} {2 + i} 3 {20 + i} 30" for i, p in enumerate(images)]
    lines[-1] = f"{images[-1].relative_to(root).as_posix()} 10 5 44 40"  # on the border (44 x 40): clipped
    lines += [f"{p.relative_to(root).as_posix()} 0 0 9 9" for p in sorted(root.glob("val/*/*.png"))]
    (root / "boxes.txt").write_text("\n".join(lines) + "\n")
    task = Localisation("scr")
    train_set, _ = task.open_splits(str(root), CenterCropTransform(32, 32), CenterCropTransform(32, 32))
    task.fit(train_set, range(len(train_set)))
    used = [[2 + i, 3, 21 + i, 31] for i in range(1, len(images) - 1)] + [[10, 5, 44, 40]]
    # in the central crop: each 44 x 40 image resized to 35 x 32, then its 32 pixels from x = 2, in crop sides
    scale = torch.tensor([35 / 44, 32 / 40, 35 / 44, 32 / 40])
    in_crop = (torch.tensor(used, dtype=torch.float32) * scale - torch.tensor([2.0, 0, 2, 0])) / 32
    codes = torch.cat([(in_crop[:, :2] + in_crop[:, 2:]) / 2, in_crop[:, 2:] - in_crop[:, :2]], dim=1)
    torch.testing.assert_close(task.code_mean, codes.mean(dim=0))
    torch.testing.assert_close(task.code_std, codes.std(dim=0, unbiased=False).clamp(min=MIN_CODE_STD), rtol=1e-3,
                               atol=0)


def test_training_on_boxes_that_fit_no_image_is_one_line_not_a_perfect_score(boxed, tmp_path, capsys):
    root, classifier = boxed
    data = tmp_path / "data"
    for path in root.rglob("*.png"):
        target = data / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (data / "boxes.txt").write_text("".join(f"{p.relative_to(data).as_posix()} 50 50 60 60\n"
                                            for p in sorted(data.rglob("*.png"))))
    code = main(["localize", "train", "--data", str(data), "--weights", str(classifier), "--head", "scr",
                 "--crop", "32", "--scale", "32", "--batch-size", "16", "--epochs", "1", "--workers", "0",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "loc")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{data / 'boxes.txt'}:1: box 50 50 60 60 is outside the 44x40 image" in err
    assert not (tmp_path / "loc" / "model.safetensors").exists()


def test_localize_predict_never_draws_over_an_input_image(boxed, tmp_path, capsys):
    root, classifier = boxed
    photos = tmp_path / "photos"  # two folders of images: a folder of class folders, which takes no output
    images = [save(photo(40, 40, seed=i), photos / folder / "x.png") for i, folder in enumerate("ab")]
    before = images[0].read_bytes()
    args = ["localize", "predict", "--checkpoint", str(classifier), "--classifier", str(classifier)]
    assert main([*args, str(images[0]), "--out", str(photos / "a")]) == 2
    assert "--out is the folder of the input image" in capsys.readouterr().err
    assert main([*args, *map(str, images), "--out", str(tmp_path / "drawn")]) == 2
    assert "would both be drawn as" in capsys.readouterr().err
    assert images[0].read_bytes() == before and not (tmp_path / "drawn").exists()


def test_a_new_run_never_clears_the_weights_it_starts_from(boxed, tmp_path, capsys):
    root, classifier = boxed
    source = tmp_path / "run"
    source.mkdir()
    (source / "start.pt").write_bytes((classifier / "checkpoints" / "last.pt").read_bytes())
    assert main(["train", "--data", str(root), "--weights", str(source / "start.pt"), "--out", str(source),
                 "--overwrite", "--epochs", "1", "--device", "cpu"]) == 2
    assert "lies in --out" in capsys.readouterr().err and (source / "start.pt").is_file()


def test_localize_predict_refuses_bad_images_small_scales_and_a_localisation_classifier(boxed, tmp_path, capsys):
    root, classifier = boxed
    loc = tmp_path / "loc"
    train(tiny(root, loc, epochs=1, lr=1e-3, scale=(32, 32), weights=str(classifier)), task=Localisation("scr"))
    assert "not copied (not in the file, another shape, other classes or another task), he init: fc8" in \
        capsys.readouterr().err  # the box regressor's last layer starts random
    text = tmp_path / "text.jpg"
    text.write_text("not an image\n")
    image = next((root / "val").rglob("*.png"))
    args = ["localize", "predict", "--checkpoint", str(loc), "--out", str(tmp_path / "drawn")]
    cases = [([*args, "--classifier", str(classifier), str(text)], f"{text}: unreadable image"),
             ([*args, "--classifier", str(classifier), str(image), "--scales", "8"], "--scales 8 is smaller"),
             ([*args, "--classifier", str(loc), str(image)], "not a classification net (a localisation net")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_published_imagenet_net_ranks_the_classes_of_a_localisation_net(tmp_path, capsys):
    """The classifier may be any source of weights: a torchvision-layout 1000-class file, its classes
    matched to the localisation net's (ImageNet synsets) by id."""
    from verydeep.io.weights import imagenet_classes

    synsets = imagenet_classes()[0][10:14]
    root = write_dataset(tmp_path / "data", {"train": 8, "val": 2})
    for split in ("train", "val"):
        for i, synset in enumerate(synsets):
            (root / split / f"class{i}").rename(root / split / synset)
    (root / "boxes.txt").write_text("".join(f"{p.relative_to(root).as_posix()} 8 6 35 33\n"
                                            for p in sorted(root.rglob("*.png"))))
    loc = tmp_path / "loc"
    train(tiny(root, loc, epochs=1, lr=1e-3, scale=(32, 32)), task=Localisation("scr"))
    torch.manual_seed(0)
    torch.save(VGG("A", num_classes=1000, width=1 / 16, input_size=32).state_dict(), tmp_path / "vgg11-narrow.pth")
    nets = DenseNets.load(loc, tmp_path / "vgg11-narrow.pth", "cpu")
    assert nets.columns == list(range(10, 14))
    assert main(["localize", "eval", "--checkpoint", str(loc), "--data", str(root), "--protocol", "dense",
                 "--classifier", str(tmp_path / "vgg11-narrow.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["images"] == 8


def test_protocol_one_refuses_the_options_of_protocol_two(boxed, tmp_path, capsys):
    root, classifier = boxed
    assert main(["localize", "eval", "--checkpoint", str(classifier), "--data", str(root), "--classifier",
                 str(classifier)]) == 2
    assert "--classifier is for --protocol dense" in capsys.readouterr().err


def test_guesses_are_named_by_the_nets_classes_else_by_the_classifiers(two_nets):
    root, classifier, runs = two_nets
    nets = DenseNets.load(runs, classifier, "cpu")
    folders = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    assert nets.class_names == [str(n) for n in nets.recipes[0].get("class_names") or folders]
    named = nets.class_names
    nets.recipes[0] = {key: value for key, value in nets.recipes[0].items() if key not in ("classes", "class_names")}
    assert nets.class_names == named  # the classifier's: the same classes (no columns picked)
    assert nets.columns is None
