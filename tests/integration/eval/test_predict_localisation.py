"""predict refuses a localisation net (Appendix A), whose outputs are box coordinates, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import photo, save, write_classifier, write_localiser
from PIL import Image

import verydeep
from verydeep.cli import main
from verydeep.io.checkpoint import export_safetensors


@pytest.fixture(scope="module")
def locrun(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a PCR net of 7 classes (28 outputs): its last checkpoint and model.safetensors."""
    root = tmp_path_factory.mktemp("loc")
    run = root / "locrun"
    (run / "checkpoints").mkdir(parents=True)
    write_localiser(run / "checkpoints" / "last.pt", write_classifier(root / "cls.pt", classes=7))
    loaded = verydeep.load(run)
    export_safetensors(loaded.model, loaded.recipe, run / "model.safetensors")
    return run


@pytest.mark.parametrize("weights", ["", "model.safetensors"])
@pytest.mark.parametrize("json", [False, True])
def test_predict_refuses_a_localisation_net_in_one_line(locrun, weights, json, tmp_path, capsys):
    source = locrun / weights if weights else locrun
    image = save(photo(40, 36), tmp_path / "img.jpg")
    assert main(["predict", "--weights", str(source), str(image), "--device", "cpu", *(["--json"] * json)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert f"{source}: a localisation net (task localisation-pcr, 28 outputs" in err
    assert "verydeep localize predict" in err


def test_the_drawing_is_of_the_upright_image_the_boxes_were_found_on(tmp_path):
    from verydeep.eval.localize.predict import draw

    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 wide, 30 high; shown upright 30 wide, 60 high
    Image.new("RGB", (60, 30), (200, 40, 40)).save(turned, exif=exif)
    drawn = Image.open(draw(turned, [], [], tmp_path / "out"))
    assert drawn.height > 1.5 * drawn.width  # portrait, as displayed, not the stored landscape


def test_a_box_is_drawn_on_the_pixels_it_covers(tmp_path, monkeypatch):
    """Boxes are continuous, pixel i covering [i, i + 1): the image is laid out so, not centred on whole numbers
    (half a pixel off, and a box on the bottom edge outside the axes)."""
    import matplotlib.pyplot as plt
    import torch

    from verydeep.eval.localize.dense_nets import Guess
    from verydeep.eval.localize.predict import draw

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    image = save(Image.new("RGB", (8, 6)), tmp_path / "small.png")
    draw(image, [Guess(0, torch.tensor([2.0, 2.0, 6.0, 6.0]), 1.0)], ["obj"], tmp_path / "out")
    ax = figures[0].axes[0]
    assert list(ax.images[0].get_extent()) == [0, 8, 6, 0] and ax.patches[0].get_bbox().bounds == (2, 2, 4, 4)
