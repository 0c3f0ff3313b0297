"""No command writes over one of its own inputs: the file read from a run directory or a weights name, a run
directory given as weights, a data folder (``verydeep.io.outputs.refuse_overwriting_inputs``, called by the CLI
before any command runs); and a ``best.pt`` that cannot be read when a run resumes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import photo, save, tiny, write_classifier, write_dataset

from verydeep.cli import build_parser, main
from verydeep.errors import UserError
from verydeep.io.outputs import refuse_overwriting_inputs
from verydeep.options import option_names
from verydeep.train import train

TRAIN = ["--width", "0.0625", "--crop", "32", "--scale", "36", "--epochs", "1", "--batch-size", "4", "--workers", "0",
         "--device", "cpu", "--no-progress"]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory whose checkpoints/best.pt and last.pt hold a tiny net."""
    best = write_classifier(tmp_path / "run" / "checkpoints" / "best.pt", classes=2)
    shutil.copyfile(best, best.with_name("last.pt"))
    return best.parents[1]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A dataset root: two classes of two training and two validation images."""
    root = write_dataset(tmp_path / "images", {"train": 2, "val": 2}, size=(36, 36))
    for split in ("train", "val"):
        for folder in sorted((root / split).iterdir())[2:]:
            shutil.rmtree(folder)
    return root


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def refused(argv: list[str], capsys: pytest.CaptureFixture, *words: str) -> None:
    """``argv`` exits 2 with one line holding each of ``words``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert all(word in err for word in words), err


def allowed(argv: list[str]) -> None:
    """``argv`` passes the check of outputs against inputs (the command itself is not run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_overwriting_inputs(args, option_names(parser, args))


# ---- weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["best.pt", "last.pt"])
def test_export_and_convert_refuse_to_write_in_the_run_directory_they_read(run, capsys, file):
    before = contents(run)
    out = str(run / "checkpoints" / file)
    refused(["export", "--weights", str(run), "--format", "torchscript", out], capsys, out, "OUT", f"--weights {run}")
    refused(["convert", str(run), out], capsys, out, "OUT.safetensors", f"SOURCE {run}")
    refused(["export", "--weights", str(run), "--format", "onnx", str(run / "net.onnx")], capsys, "--weights")
    other = run / "checkpoints" / ("last.pt" if file == "best.pt" else "best.pt")  # weights given as a file of the run
    refused(["export", "--weights", str(other), "--format", "torchscript", out], capsys, out, f"--weights {other}")
    refused(["convert", str(other), out], capsys, out, f"SOURCE {other}")
    assert contents(run) == before


def test_no_output_file_replaces_a_file_of_another_training_run(run, tmp_path, capsys):
    """A run not read by the command keeps its files as trained: its exported weights, record, metrics and
    checkpoints; a file of a new name in it, and its curves (``plot`` draws them there), may be written."""
    other = write_classifier(tmp_path / "other.pt", seed=1, classes=2)
    (run / "recipe.json").write_text("{}")
    before = contents(run)
    for name in ("model.safetensors", "recipe.json", "metrics.jsonl", "checkpoints/epoch-0001.safetensors"):
        refused(["convert", str(other), str(run / name)], capsys, str(run / name), "OUT.safetensors",
                f"would replace a file of the training run {run}")
    refused(["export", "--weights", str(other), "--format", "torchscript", str(run / "model.safetensors")], capsys,
            "would replace a file of the training run")
    (tmp_path / "linked").symlink_to(run / "checkpoints")  # the run's checkpoints/ under another name
    refused(["convert", str(other), str(tmp_path / "linked" / "last.pt.safetensors")], capsys,
            "would replace a file of the training run")
    assert contents(run) == before
    allowed(["convert", str(other), str(run / "converted.safetensors")])
    allowed(["export", "--weights", str(other), "--format", "onnx", str(run / "curves.png")])


def test_the_file_a_weights_name_reads_is_not_overwritten(run, tmp_path, capsys):
    folder = tmp_path / "weights"
    published = folder / "VGG_ILSVRC_16_layers.caffemodel"  # the file caffe-vgg16 names
    folder.mkdir()
    published.write_bytes(b"weights")
    refused(["convert", "caffe-vgg16", str(published), "--weights-dir", str(folder)], capsys,
            "the output is also an input (SOURCE caffe-vgg16 reads it)", "give another OUT.safetensors")
    assert published.read_bytes() == b"weights"


def test_an_output_folder_in_the_run_directory_read_is_allowed(run, images, tmp_path, capsys):
    allowed(["eval", "--weights", str(run), "--data", str(images), "--out", str(run / "eval")])
    for among_the_runs in (run, run / "checkpoints"):  # its files would land among the run's own
        refused(["eval", "--weights", str(run), "--data", str(images), "--out", str(among_the_runs)], capsys,
                f"--out lies in {run}, the run directory of --weights {run}", "a folder of its own there will do")
    allowed(["export", "--weights", str(run), "--format", "onnx", str(tmp_path / "net.onnx")])
    allowed(["export", "--weights", str(run), "--format", "onnx", str(run / "export" / "net.onnx")])  # its own
    project = tmp_path / "project"  # a folder holding checkpoints/ of its own is no run of weights beneath it
    (project / "checkpoints").mkdir(parents=True)
    (project / "weights").mkdir()
    shutil.copyfile(run / "checkpoints" / "best.pt", project / "weights" / "a.pt")
    allowed(["export", "--weights", str(project / "weights" / "a.pt"), "--format", "onnx", str(project / "a.onnx")])
    refused(["export", "--weights", str(run), "--format", "onnx", str(run / "tensorboard" / "net.onnx")], capsys,
            f"OUT lies in {run}, the run directory of --weights {run}")


# ---- data -----------------------------------------------------------------------------------------


def test_data_stats_writes_no_image_and_no_class_folder(images, capsys):
    before = contents(images)
    image = images / "train" / "class0" / "0.png"
    refused(["data", "stats", str(images), "--workers", "0", "--out", str(image)], capsys, str(image), "--out",
            f"DIR {images}")
    refused(["data", "stats", str(images), "--workers", "0", "--out", str(images / "train" / "new" / "p.json")],
            capsys, "--out", f"DIR {images}")
    val_image = images / "val" / "class0" / "0.png"  # the statistics of one split, written into another
    refused(["data", "stats", str(images / "train"), "--workers", "0", "--out", str(val_image)], capsys,
            f"{val_image}: --out lies in DIR {images / 'val'}")
    assert contents(images) == before and sorted(p.name for p in (images / "train").iterdir()) == ["class0", "class1"]


def test_data_stats_writes_over_no_file_of_the_data_but_earlier_statistics(images, capsys):
    (images / "classes.txt").write_text("class0\tfirst\nclass1\tsecond\n")
    refused(["data", "stats", str(images / "train"), "--workers", "0", "--out", str(images / "classes.txt")], capsys,
            f"--out {images / 'classes.txt'}: not a preprocess statistics file (JSONDecodeError")
    assert (images / "classes.txt").read_text() == "class0\tfirst\nclass1\tsecond\n"
    (images / "classes.txt").unlink()
    damaged = images / "train" / "preprocess.json"  # statistics whose mean an editor broke: computed anew
    damaged.write_text('{"mean": [NaN, 0.5, 0.5], "std": [1, 1, 1], "eigval": [0, 0, 0], "eigvec": [], '
                       '"notes": "ours"}')
    assert main(["data", "stats", str(images / "train"), "--workers", "0"]) == 0
    written = json.loads(damaged.read_text())
    assert all(math.isfinite(v) for v in written["mean"]) and written["notes"] == "ours"  # the user's notes kept
    damaged.write_text(json.dumps({**written, "model": "my-net"}))  # another file that holds such keys too
    refused(["data", "stats", str(images / "train"), "--workers", "0"], capsys,
            f"--out {damaged}: not a preprocess statistics file (ValueError: unknown key 'model'")
    damaged.unlink()


def test_data_stats_writes_its_statistics_at_the_top_of_the_data(images, capsys):
    assert main(["data", "stats", str(images), "--workers", "0", "--out", str(images / "preprocess.json")]) == 0
    assert main(["data", "stats", str(images / "train"), "--workers", "0"]) == 0
    assert (images / "preprocess.json").is_file() and (images / "train" / "preprocess.json").is_file()


def test_data_stats_and_train_refuse_the_same_seeds(images, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["data", "stats", str(images), "--workers", "0", "--seed", "-1"])
    assert stop.value.code == 2 and "argument --seed: expected an integer from 0" in capsys.readouterr().err
    refused(["train", "--data", str(images), "--out", str(tmp_path / "run"), "--seed", "-1", *TRAIN], capsys,
            "--seed must be at least 0")
    with pytest.raises(SystemExit):
        main(["data", "stats", str(images), "--workers", "0", "--seed", str(2**64)])  # torch's generators take less
    assert "--seed" in capsys.readouterr().err
    refused(["train", "--data", str(images), "--out", str(tmp_path / "run"), "--seed", str(2**64), *TRAIN], capsys,
            "--seed must be below")


@pytest.mark.parametrize("inside", ["", "train", "train/class0", "val/new"])
def test_no_command_writes_its_output_in_the_data(images, run, capsys, inside):
    before = contents(images)
    out = str(images / inside)
    refused(["train", "--data", str(images), "--out", out, *TRAIN], capsys, "--out", f"--data {images}")
    refused(["eval", "--weights", str(run), "--data", str(images), "--out", out], capsys, "--out", "--data")
    refused(["reproduce", "--data", str(images), "--out", out], capsys, "--out", "--data")
    refused(["features", "--weights", str(run), "--data", str(images), "--out", f"{out}/f.npz"], capsys, "--out",
            "--data")
    assert contents(images) == before and not (images / "train" / "checkpoints").exists()


def test_no_output_folder_holds_the_data(images, tmp_path, capsys):
    refused(["train", "--data", str(images), "--out", str(tmp_path), *TRAIN], capsys,
            f"--data {images} lies in --out {tmp_path}")
    assert not (tmp_path / "checkpoints").exists()
    allowed(["train", "--data", str(images), "--out", str(tmp_path / "run"), *TRAIN])


def test_commands_that_read_no_data_write_no_image_or_class_into_a_dataset_nor_mix_with_a_run(images, run, capsys):
    """plot, export, convert and demo read no data, yet a file among a dataset's class folders would be read as one
    of its images, a folder holding a dataset would add classes to it, and a demo or reproduction in a training
    run's folder would mix their files with the run's."""
    before, class_folder = contents(images), images / "val" / "class0"
    refused(["plot", str(run), "--out", str(class_folder / "curves.png")], capsys, "--out",
            f"lies in a class folder of {images / 'val'}, a dataset whose images it would join")
    for argv in (["export", "--weights", str(run), "--format", "torchscript", str(class_folder / "0.png")],
                 ["convert", str(run), str(images / "train" / "class1" / "w.safetensors")]):
        refused(argv, capsys, "lies in a class folder of", str(images))
    refused(["demo", "--out", str(images)], capsys, f"--out holds the dataset {images / 'train'}")
    refused(["demo", "--out", str(images / "val")], capsys, f"--out holds the dataset {images / 'val'}")
    refused(["demo", "--out", str(run)], capsys, f"{run}: --out is a training run's folder")
    refused(["reproduce", "--data", str(images), "--out", str(run)], capsys, "--out is a training run's folder")
    assert contents(images) == before and sorted(p.name for p in run.iterdir()) == ["checkpoints"]
    allowed(["plot", str(run), "--out", str(run.parent / "curves.png")])
    allowed(["demo", "--out", str(run.parent / "demo")])
    for name in ("a", "b"):  # runs beside each other, each with its curves: no dataset of class folders
        shutil.copytree(run, run.parent / "runs" / name)
        (run.parent / "runs" / name / "curves.png").write_bytes(b"png")
    allowed(["plot", str(run.parent / "runs" / "a"), "--out", str(run.parent / "runs" / "a" / "curves.svg")])
    for folder in ("exports/vgg11", "exports/vgg16", "results/voc", "results/caltech"):  # plots, not classes
        save(photo(8, 8), run.parent / folder / "plot.png")
    allowed(["export", "--weights", str(run), "--format", "torchscript", str(run.parent / "exports/vgg16/a.pt")])
    allowed(["plot", str(run), "--out", str(run.parent / "results" / "voc" / "curves.png")])
    allowed(["demo", "--out", str(run.parent / "results")])

def test_a_recipe_s_data_and_out_are_checked_as_flags_are(images, tmp_path, capsys):
    recipe = tmp_path / "inside.toml"
    recipe.write_text(f'data = "{images}"\nout = "{images / "train" / "run"}"\n')
    before = contents(images)
    refused(["train", "--recipe", str(recipe), *TRAIN], capsys, "--out", f"--data {images}")
    assert contents(images) == before and not (images / "train" / "run").exists()


def test_a_python_caller_s_run_directory_is_checked_as_the_flags_are(images, run, tmp_path):
    before = contents(images)
    with pytest.raises(UserError, match=f"--out lies in --data {images}"):
        train(tiny(images, images / "train" / "runx", crop=32, scale=(36, 36)))
    with pytest.raises(UserError, match=f"--out lies in {run}, the run directory of --weights"):
        train(tiny(images, run / "checkpoints", crop=32, scale=(36, 36), weights=str(run)))
    assert contents(images) == before and not (images / "train" / "runx").exists()


def test_reproduce_s_default_out_is_checked_as_a_given_one(images, capsys, monkeypatch):
    monkeypatch.chdir(images)  # the default, runs/reproduce-cifar10, would become a class folder
    refused(["reproduce", "--data", "."], capsys, "runs/reproduce-cifar10: --out lies in --data .")
    assert not (images / "runs").exists()


# ---- resuming -------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["bytes", "foreign"])
def test_resuming_with_an_unreadable_best_checkpoint_is_one_line_naming_it(images, tmp_path, capsys, damage):
    out = tmp_path / "run"
    train(tiny(images, out, batch_size=4))
    best = out / "checkpoints" / "best.pt"
    if damage == "bytes":
        best.write_bytes(b"not a checkpoint")
    else:
        torch.save({"weights": torch.zeros(1)}, best)  # readable, but not an epoch's state
    refused(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"], capsys, f"{best}: not a")


def test_an_output_through_or_into_a_class_folder_linked_into_the_data_is_refused(images, tmp_path, capsys):
    store = tmp_path / "store"
    (images / "train" / "class1").rename(store)
    (images / "train" / "class1").symlink_to(store, target_is_directory=True)  # a subset linked to a store
    before = contents(store)
    for out in (images / "train" / "class1" / "run", store / "run"):  # through the link, and at its target
        refused(["train", "--data", str(images), "--out", str(out), *TRAIN], capsys, "--out", "--data")
    assert contents(store) == before and not (store / "run").exists()
    allowed(["train", "--data", str(images), "--out", str(tmp_path / "elsewhere"), *TRAIN])
    deeper = tmp_path / "deeper"  # a folder within a class folder linked to a store
    deeper.mkdir()
    (images / "train" / "class0" / "more").symlink_to(deeper, target_is_directory=True)
    refused(["train", "--data", str(images), "--out", str(deeper / "run"), *TRAIN], capsys, "--out", "--data")
    refused(["eval", "--weights", str(tmp_path / "w"), "--data", str(images / "val"), "--out", str(deeper / "e")],
            capsys, "--out", "--data")  # from a sibling split too


def test_a_saliency_map_is_not_drawn_into_the_dataset_of_its_image(images, run, tmp_path, capsys):
    image = images / "val" / "class0" / "0.png"
    among_classes = f"--saliency lies in a class folder of {images / 'val'}, a dataset whose images it would join"
    for out, words in ((images / "val" / "class1" / "map.png", among_classes),
                       (images / "train" / "map.png", "a split of the dataset of the input image")):
        refused(["predict", "--weights", str(run), str(image), "--saliency", str(out), "--device", "cpu"], capsys,
                "--saliency", words)
        assert not out.exists()
    flat = images / "val" / "ILSVRC2012_val_00000001.png"  # the official validation layout: images flat in val/
    shutil.copy(image, flat)
    refused(["predict", "--weights", str(run), str(flat), "--saliency", str(images / "train" / "class0" / "m.png"),
             "--device", "cpu"], capsys, f"--saliency lies in a class folder of {images / 'train'}")
    refused(["predict", "--weights", str(run), str(flat), "--saliency", str(images / "train" / "m.png"),
             "--device", "cpu"], capsys, "--saliency", "a split of the dataset of the input image")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(image, photos / "cat.png")
    assert main(["predict", "--weights", str(run), str(photos / "cat.png"), "--saliency", str(photos / "map.png"),
                 "--device", "cpu"]) == 0
    assert (photos / "map.png").is_file()  # beside a photo that is in no dataset: allowed



def test_a_saliency_map_is_not_drawn_into_a_folder_of_class_folders_but_beside_a_home_s_photos(run, tmp_path,
                                                                                             capsys):
    caltech = tmp_path / "caltech"  # Caltech-101's layout: class folders, no splits
    for name in ("cat", "dog"):
        save(photo(40, 40, seed=len(name)), caltech / name / "0.png")
    image = caltech / "cat" / "0.png"
    for out in (caltech / "dog" / "map.png", caltech / "maps" / "map.png", caltech / "map.png"):
        refused(["predict", "--weights", str(run), str(image), "--saliency", str(out), "--device", "cpu"], capsys,
                f"--saliency lies in {caltech}, the folder of class folders of the input image {image}, whose images "
                "it would join")
        assert not out.exists()
    home = tmp_path / "home"  # a photo among folders of other things
    save(photo(40, 40), home / "Pictures" / "cat.png")
    (home / "Documents").mkdir()
    (home / "Documents" / "notes.txt").write_text("notes")
    out = home / "maps" / "map.png"
    assert main(["predict", "--weights", str(run), str(home / "Pictures" / "cat.png"), "--saliency", str(out),
                 "--device", "cpu"]) == 0 and out.is_file()


def test_a_saliency_map_drawn_once_does_not_make_its_folder_a_dataset_that_refuses_drawing_it_again(run, tmp_path,
                                                                                                    capsys):
    """The maps of a first call, in a folder beside the photo's, would make the two look like class folders; what
    verydeep drew (its PNGs say so) is no image of a dataset, so the same call draws them again, and another map
    joins them. A dataset's own image, the only one of its class, is still never drawn over."""
    home = tmp_path / "home"
    save(photo(40, 40), home / "photos" / "cat.png")
    argv = ["predict", "--weights", str(run), str(home / "photos" / "cat.png"), "--device", "cpu", "--saliency"]
    assert main([*argv, str(home / "maps" / "cat.png")]) == 0
    (home / "maps" / "cat.png").touch()
    before = (home / "maps" / "cat.png").stat().st_mtime_ns
    assert main([*argv, str(home / "maps" / "cat.png")]) == 0, capsys.readouterr().err
    assert (home / "maps" / "cat.png").stat().st_mtime_ns != before  # drawn again: a new file in its place
    assert main([*argv, str(home / "maps" / "dog.png")]) == 0 and (home / "maps" / "dog.png").is_file()
    caltech = tmp_path / "caltech"  # one image a class
    save(photo(40, 40, seed=1), caltech / "cat" / "0.png")
    save(photo(40, 40, seed=2), caltech / "dog" / "0.png")
    dog = (caltech / "dog" / "0.png").read_bytes()
    refused(["predict", "--weights", str(run), str(caltech / "cat" / "0.png"), "--device", "cpu", "--saliency",
             str(caltech / "dog" / "0.png")], capsys, f"--saliency lies in {caltech}, the folder of class folders")
    assert (caltech / "dog" / "0.png").read_bytes() == dog
