"""Localisation scored with each image's class as the nets number it: data holding some of a localisation net's
classes, in any order, is matched to them by synset id (Appendix A, both protocols)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_classifier, write_localiser
from PIL import Image

from verydeep.cli import main
from verydeep.errors import UserError
from verydeep.io.checkpoint import load_checkpoint, save_checkpoint


def one_class_data(root: Path, synset: str) -> Path:
    """Train and val images of one class (folder ``synset``), 40 x 40, each boxed by its central half."""
    rng = np.random.default_rng(0)
    lines = []
    for split, count in (("train", 4), ("val", 3)):
        folder = root / split / synset
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            lines.append(f"{split}/{synset}/{i}.png 10 10 29 29")
    (root / "boxes.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 10-class classifier that ranks class 2 (n00000002) first in every image, and a per-class localiser of
    its classes whose box of class 2 is the central half of the crop, every other class's a small box in a
    corner."""
    folder = tmp_path_factory.mktemp("nets")
    classifier = write_classifier(folder / "classifier.pt", classes=10)
    state = load_checkpoint(classifier)
    state["model"]["classifier.6.weight"].zero_()
    state["model"]["classifier.6.bias"].copy_(torch.arange(10.0).neg()).index_fill_(0, torch.tensor([2]), 10.0)
    save_checkpoint(state, classifier)
    localiser = write_localiser(folder / "localiser.pt", classifier)
    state = load_checkpoint(localiser)
    weight, bias = state["model"]["classifier.6.weight"], state["model"]["classifier.6.bias"]
    weight.zero_()
    bias.copy_(torch.tensor([-4.0, -4.0, -4.0, -4.0]).repeat(10))  # codes 0.5 - 4 * 0.1: centre 0.1, side 0.1
    bias[8:12] = 0.0  # class 2: the mean code, the central box half the crop's side
    save_checkpoint(state, localiser)
    return classifier, localiser


def test_both_protocols_score_an_image_by_its_own_class_box(nets, tmp_path, capsys):
    classifier, localiser = nets
    data = one_class_data(tmp_path / "data", "n00000002")  # the data's class 0 is the nets' class 2
    base = ["localize", "eval", "--checkpoint", str(localiser), "--data", str(data), "--workers", "0",
            "--device", "cpu", "--no-progress", "--json"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["localisation_error"] == 0.0
    assert main([*base, "--protocol", "dense", "--classifier", str(classifier)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["localisation_error"] == 0.0


def test_a_class_the_net_does_not_locate_is_one_line(nets, tmp_path, capsys):
    classifier, localiser = nets
    data = one_class_data(tmp_path / "data", "n00000077")
    for protocol in (["--protocol", "center"], ["--protocol", "dense", "--classifier", str(classifier)]):
        assert main(["localize", "eval", "--checkpoint", str(localiser), "--data", str(data), "--workers", "0",
                     "--device", "cpu", "--no-progress", *protocol]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "the data's class n00000077" in err and str(localiser) in err


def test_a_class_of_the_localisation_net_the_classifier_lacks_is_named_as_the_nets():
    """``localize predict`` reads no data: the class missing is the localisation net's, from the classifier's."""
    from verydeep.eval.localize.dense_nets import classifier_columns

    classifier = {"classes": ["n01", "n02"], "class_names": ["cat", "dog"]}
    assert classifier_columns(classifier, {"classes": ["n02"], "class_names": ["dog"]}, "--classifier c") == [1]
    with pytest.raises(UserError, match=r"^--classifier c: the localisation net's class n03 \(eel\) is not among the "
                                        r"classifier's 2 classes$"):
        classifier_columns(classifier, {"classes": ["n03"], "class_names": ["eel"]}, "--classifier c")
