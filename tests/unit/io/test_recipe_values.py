"""The recipe inside a weights file or checkpoint: every value that builds or describes the net is checked
where the file is read (verydeep.io.checkpoint.check_recipe), a bad one a one-line error naming file and key."""

from __future__ import annotations

import pytest
import torch
from conftest import write_dataset

import verydeep
from verydeep.cli import main
from verydeep.data import IMAGENET
from verydeep.errors import UserError
from verydeep.io.checkpoint import export_safetensors, load_checkpoint, save_checkpoint
from verydeep.io.weights import load_published
from verydeep.nn.model import VGG

RECIPE = {"config": "A", "num_classes": 2, "outputs": 2, "batch_norm": False, "width": 1 / 16, "dropout": 0.5,
          "crop": 32, "scale": [36, 36], "preprocess": IMAGENET.to_dict(), "classes": ["a", "b"],
          "class_names": ["ay", "bee"]}
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model() -> VGG:
    return VGG("A", num_classes=2, width=1 / 16, input_size=32).eval()


def write(tmp_path, model: VGG, recipe: dict, kind: str):
    """``recipe`` with ``model``'s weights as our safetensors, or as a checkpoint."""
    if kind == "safetensors":
        return export_safetensors(model, recipe, tmp_path / "w.safetensors")
    return save_checkpoint({"model": model.state_dict(), "recipe": recipe}, tmp_path / "c.pt")


@pytest.mark.parametrize(("key", "value", "said"), [
    ("width", NAN, "recipe width must be positive; got nan"),
    ("width", "wide", "recipe width must be a number"),
    ("dropout", 2.0, "recipe dropout is the probability"),
    ("dropout", NAN, "recipe dropout must be finite"),
    ("crop", 33, "recipe crop must be a multiple of 32"),
    ("crop", 32.0, "recipe crop must be a whole number"),
    ("batch_norm", "yes", "recipe batch_norm must be true or false"),
    ("config", "Z", "recipe config: unknown VGG configuration 'Z'"),
    ("num_classes", 0, "recipe num_classes must be a whole number of at least 1; got 0"),
    ("num_classes", 5, r"recipe outputs \(2\) do not fit its task, classification of 5 classes, which has 5"),
    ("task", "localisation-pcr", r"recipe outputs \(2\) do not fit its task, localisation-pcr of 2 classes, which "
                                 "has 8"),
    ("task", "localisation-scr", r"recipe outputs \(2\) do not fit its task, localisation-scr of 2 classes, which "
                                 "has 4"),
    ("outputs", True, "recipe outputs must be a whole number"),
    ("scale", [0, 0], r"recipe scale must be S or \[Smin, Smax\]"),
    ("scale", [INF, 1], r"recipe scale must be .*got \[inf, 1\]"),
    ("scale", [36, 36.5], r"recipe scale must be .*whole numbers"),
    ("scale", [36, 1_000_000_000], r"recipe scale must be .*<= Smax <= 2048; got \[36, 1000000000\]"),
    ("scale", [16, 16], "crop 32 <= Smin"),
    ("classes", ["a"], r"recipe classes must list num_classes \(2\) names"),
    ("class_names", [1, 2], "recipe class_names must list"),
    ("preprocess", {**IMAGENET.to_dict(), "mean": [NAN, 0.5, 0.5]}, r"recipe preprocess: mean\[0\] is nan"),
    ("preprocess", {**IMAGENET.to_dict(), "std": [INF, 1, 1]}, r"recipe preprocess: std\[0\] is inf"),
    ("box_code_std", [0.1, 0.1, 0.0, 0.1], "recipe box_code_std must be 4 finite numbers above 0"),
    ("boxes", 5, "recipe boxes must be a file or folder path; got 5"),
    ("boxes_data", ["x"], r"recipe boxes_data must be a file or folder path; got \[.x.\]"),
    ("source", "x", "recipe source must name the weights' format and file; got x"),
    ("source", {"format": 3}, "recipe source must name the weights' format and file"),
    ("head", "banana", "recipe head must be published or random; got 'banana'"),
    ("task", 3, "recipe task must be a task's name, such as classification; got 3"),
])
@pytest.mark.parametrize("kind", ["safetensors", "checkpoint"])
def test_a_bad_recipe_value_is_one_line_naming_file_and_key(tmp_path, model, kind, key, value, said):
    path = write(tmp_path, model, {**RECIPE, key: value}, kind)
    readers = [load_published, verydeep.load] + ([load_checkpoint] if kind == "checkpoint" else [])
    for read in readers:
        with pytest.raises(UserError, match=said) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value), read.__name__


def test_a_checkpoint_whose_model_or_recipe_is_not_a_dict_is_one_line(tmp_path, model):
    save_checkpoint({"model": "hello", "recipe": RECIPE}, tmp_path / "model.pt")
    save_checkpoint({"model": model.state_dict(), "recipe": "x"}, tmp_path / "recipe.pt")
    for name, said in [("model.pt", "its 'model' entry is not a state dict of tensors"),
                       ("recipe.pt", "its recipe is not a dict of settings")]:
        for read in (load_published, load_checkpoint):
            with pytest.raises(UserError, match=f"{name}: {said}"):
                read(tmp_path / name)


@pytest.mark.parametrize("command", ["convert", "eval"])
def test_the_commands_refuse_a_bad_recipe_in_one_line(tmp_path, model, capsys, command):
    path = write(tmp_path, model, {**RECIPE, "scale": [0, 0]}, "safetensors")
    data = write_dataset(tmp_path / "data", {"val": 1})
    argv = (["convert", str(path), str(tmp_path / "out.safetensors")] if command == "convert" else
            ["eval", "--weights", str(path), "--data", str(data), "--device", "cpu", "--workers", "0"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: recipe scale must be" in err


def test_sound_recipes_of_every_kind_still_load(tmp_path, model):
    regressor = VGG("A", num_classes=8, width=1 / 16, input_size=32).eval()
    localiser = {**RECIPE, "task": "localisation-pcr", "outputs": 8, "box_code_mean": [0.5] * 4,
                 "box_code_std": [0.1] * 4}
    for recipe, net in [({**RECIPE, "scale": 36}, model), ({**RECIPE, "scale": None, "preprocess": None}, model),
                        ({k: v for k, v in RECIPE.items() if k not in ("outputs", "classes", "class_names")}, model),
                        (localiser, regressor)]:
        read = verydeep.load(write(tmp_path, net, recipe, "safetensors"))
        loaded, again = read.model, read.recipe
        assert again == recipe
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(loaded(x), net(x))
