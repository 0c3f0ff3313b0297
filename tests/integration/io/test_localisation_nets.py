"""A localisation net (Appendix A) keeps its task through convert, is no classifier to export, and
``verydeep.load`` says what its outputs are: box coordinates of its classes, not classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import photo, save, write_classifier, write_localiser

import verydeep
from verydeep.cli import main
from verydeep.errors import UserError
from verydeep.io.checkpoint import load_checkpoint, model_from_recipe, save_checkpoint


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A classifier of 7 classes and a PCR net of its classes (28 outputs)."""
    root = tmp_path_factory.mktemp("nets")
    classifier = write_classifier(root / "cls.pt", classes=7)
    return classifier, write_localiser(root / "loc.pt", classifier)


def test_convert_keeps_the_task_and_the_converted_file_loads_as_a_localisation_net(nets, tmp_path, capsys):
    out = tmp_path / "c11.safetensors"
    assert main(["convert", str(nets[1]), str(out)]) == 0
    said = capsys.readouterr().out
    assert "7 classes, localisation-pcr (28 outputs: the 4 coordinates of a box for each of 7 classes)" in said
    assert "torchvision" not in said
    loaded = verydeep.load(out)
    assert (loaded.format, loaded.task, len(loaded.classes), loaded.model.num_classes) == (
        "verydeep", "localisation-pcr", 7, 28)
    image = save(photo(40, 36), tmp_path / "img.jpg")
    assert main(["predict", "--weights", str(out), str(image), "--device", "cpu"]) == 2
    assert f"{out}: a localisation net (task localisation-pcr" in capsys.readouterr().err


def test_export_refuses_a_localisation_net_rather_than_call_its_boxes_class_scores(nets, tmp_path, capsys):
    out = tmp_path / "e7.pt"
    assert main(["export", "--weights", str(nets[1]), "--format", "torchscript", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{nets[1]}: a localisation net (task localisation-pcr" in err
    assert not out.exists()


def test_load_names_the_classes_as_classes_and_the_outputs_as_what_they_are(nets, tmp_path):
    classifier, pcr = (verydeep.load(path) for path in nets)
    names = [f"thing {i}" for i in range(7)]
    assert (classifier.task, classifier.class_names, classifier.output_names) == ("classification", names, names)
    assert (pcr.task, pcr.class_names, pcr.model.num_classes) == ("localisation-pcr", names, 28)
    assert pcr.output_names[:5] == ["thing 0: centre x", "thing 0: centre y", "thing 0: width", "thing 0: height",
                                    "thing 1: centre x"] and len(pcr.output_names) == 28
    recipe = {**load_checkpoint(nets[1])["recipe"], "task": "localisation-scr", "outputs": 4}
    save_checkpoint({"model": model_from_recipe(recipe).state_dict(), "recipe": recipe}, tmp_path / "scr.pt")
    scr = verydeep.load(tmp_path / "scr.pt")
    assert (scr.task, scr.class_names) == ("localisation-scr", names)
    assert scr.output_names == ["centre x", "centre y", "width", "height"]
    own = {**recipe, "task": "regression", "outputs": 2}  # a task of the user's own: its outputs, unnamed
    save_checkpoint({"model": model_from_recipe(own).state_dict(), "recipe": own}, tmp_path / "own.pt")
    assert verydeep.load(tmp_path / "own.pt").output_names == ["output 0", "output 1"]
    with pytest.raises(UserError, match="not a classifier, so it cannot classify"):
        verydeep.load(nets[1], purpose="classify")
    torch.testing.assert_close(verydeep.load(nets[1], purpose="give FC7 features").model.classifier[6].bias,
                               pcr.model.classifier[6].bias)  # its FC7 features are still served
