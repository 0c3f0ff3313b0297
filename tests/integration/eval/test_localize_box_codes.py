"""The box code's standardisation (Appendix A, ``--targets standardised``): fitted on the codes of the boxes in
the training crops, as training draws them, so that the targets FC8 regresses are of unit spread."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from verydeep.cli import main
from verydeep.data import CenterCropTransform, TrainTransform
from verydeep.data.boxes import encode
from verydeep.data.preprocess import IMAGENET
from verydeep.data.sampling import SeededSamples
from verydeep.eval.localize.task import MIN_CODE_STD, Localisation, training_codes


def noise_with_boxes(root: Path, size: tuple[int, int], right: Callable[[int], int], seed: int,
                     per_class: int = 6) -> Path:
    """Noise JPEGs of ``size`` in two classes, ``per_class`` for training and 2 for validation, image i's box
    from its left edge to pixel column ``right(i)``, its full height."""
    rng = np.random.default_rng(seed)
    (w, h), lines = size, []
    for split, count in (("train", per_class), ("val", 2)):
        for name in ("car", "boat"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
                lines.append(f"{split}/{name}/{i}.jpg 0 0 {right(i)} {h - 1}")
    (root / "boxes.txt").write_text("\n".join(lines) + "\n")
    return root


def flat_boxes(root: Path, per_class: int = 6) -> Path:
    """Noise JPEGs of 64 x 48 in two classes, each image's box the whole image: boxes of one geometry."""
    return noise_with_boxes(root, (64, 48), lambda i: 63, 0, per_class)


def test_boxes_of_one_geometry_train_without_diverging(tmp_path, capsys):
    data = flat_boxes(tmp_path / "data")
    common = ["--crop", "32", "--scale", "36", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device",
              "cpu", "--no-progress"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "cls"), "--width", "0.125", *common]) == 0
    run = tmp_path / "loc"
    assert main(["localize", "train", "--data", str(data), "--weights", str(tmp_path / "cls"), "--precision", "fp32",
                 "--out", str(run), *common]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["steps"] == 3 and 0 <= summary["best"] <= 100
    record = json.loads((run / "recipe.json").read_text())
    std = record["box_code_std"]
    # the crop moves the box: its centre spreads (x by the crop's position and the flip, y by its position) ...
    assert std[0] > 0.1 and std[1] > 1.5 * MIN_CODE_STD
    # ... while at a fixed S its width and height are the same in every crop: 64 and 48 pixels of an image whose
    # 48-pixel side is rescaled to S = 36, in 32-pixel crop sides
    assert std[2:] == pytest.approx([MIN_CODE_STD] * 2)
    assert record["box_code_mean"][2:] == pytest.approx([64 * 36 / 48 / 32, 48 * 36 / 48 / 32], abs=1e-6)


@pytest.mark.parametrize("scale", [(36, 36), (36, 44)])
def test_the_standardisation_fits_the_crops_training_draws(tmp_path, scale):
    data = flat_boxes(tmp_path / "data")
    task = Localisation("scr", seed=7)
    train_set, _ = task.open_splits(str(data), TrainTransform(32, scale), CenterCropTransform(36, 32))
    task.fit(train_set, range(len(train_set)))
    samples = SeededSamples(train_set, 7, IMAGENET, 0.0)
    drawn = torch.stack([encode(samples[epoch, index][0].boxes[0], 32.0) for epoch in range(4)
                         for index in range(len(train_set))])
    # the sample's first epoch is training's first epoch, crop for crop
    torch.testing.assert_close(training_codes(train_set, 7, draws=len(train_set)), drawn[:len(train_set)].float())
    standardised = (drawn - task.code_mean) / task.code_std
    assert standardised.abs().max() < 4  # of unit spread, not hundreds of units off
    jittered = scale[0] < scale[1]
    assert (task.code_std > 1.5 * MIN_CODE_STD).tolist() == [True, True, jittered, jittered]
    again = Localisation("scr", seed=7)
    again.fit(*again.open_splits(str(data), TrainTransform(32, scale), CenterCropTransform(36, 32))[:1],
              range(len(train_set)))
    assert torch.equal(again.code_mean, task.code_mean) and torch.equal(again.code_std, task.code_std)


def test_validation_held_out_of_training_keeps_its_boxes(tmp_path, capsys):
    data = flat_boxes(tmp_path / "data")
    common = ["--crop", "32", "--scale", "36", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device",
              "cpu", "--no-progress"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "cls"), "--width", "0.125", *common]) == 0
    shutil.rmtree(data / "val")  # only train/ and boxes.txt: validation is held out of training
    run = tmp_path / "loc"
    assert main(["localize", "train", "--data", str(data), "--weights", str(tmp_path / "cls"), "--val-split", "2",
                 "--out", str(run), *common]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    record = json.loads((run / "recipe.json").read_text())
    assert record["validation"]["held_out_of_training"] and record["validation"]["images"] == 2
    assert record["training"]["images"] == 10 and 0 <= summary["best"] <= 100


def boxes_of_growing_width(root: Path, per_class: int = 6) -> dict[str, float]:
    """Square noise JPEGs of 48 pixels in two classes, image i's box 8 + 6 i pixels wide (its full height);
    returns each training image's box width in image sides, by path within the data."""
    noise_with_boxes(root, (48, 48), lambda i: 7 + 6 * i, 1, per_class)
    return {f"{name}/{i}.jpg": (8 + 6 * i) / 48 for name in ("car", "boat") for i in range(per_class)}


@pytest.mark.parametrize("held", [["--val-split", "4"], ["--limit-train", "4"]])
def test_the_standardisation_is_fitted_on_the_images_trained_on_only(tmp_path, capsys, held):
    """Held-out validation images (``--val-split``) and images ``--limit-train`` leaves out shape no target."""
    data = tmp_path / "data"
    widths = boxes_of_growing_width(data)
    common = ["--crop", "32", "--scale", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device",
              "cpu", "--no-progress"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "cls"), "--width", "0.125", *common]) == 0
    run = tmp_path / "loc"
    assert main(["localize", "train", "--data", str(data), "--weights", str(tmp_path / "cls"), "--out", str(run),
                 *held, *common]) == 0
    record = json.loads((run / "recipe.json").read_text())
    if held[0] == "--val-split":
        left_out = set(record["validation"]["paths"])
    else:  # the first two images of each class, round-robin over the classes
        left_out = {f"{name}/{i}.jpg" for name in ("car", "boat") for i in range(2, 6)}
    trained = [width for path, width in widths.items() if path not in left_out]
    assert len(trained) == (8 if held[0] == "--val-split" else 4)
    # at S = crop on square images every crop is the whole image: a box's width code is its width in image sides
    assert record["box_code_mean"][2] == pytest.approx(np.mean(trained), abs=1e-4)
    assert record["box_code_mean"][2] != pytest.approx(np.mean(list(widths.values())), abs=0.01)
