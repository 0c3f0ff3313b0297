"""What ``localize`` reads and writes: predict's drawings never among its images or in a run it reads, Table 8's
fine-tuned label as the net's recipe records it, and a recipe's bad localisation keys named with their file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny, write_dataset

from verydeep.cli import main
from verydeep.errors import UserError
from verydeep.eval.localize import center, dense
from verydeep.eval.localize.center import CenterResult, fine_tuned_layers, table_8
from verydeep.eval.localize.task import Localisation, task_of
from verydeep.eval.localize.train import same_boxes
from verydeep.io.checkpoint import export_safetensors, load_checkpoint, model_from_recipe, save_checkpoint
from verydeep.runtime.progress import progress_bar
from verydeep.train import train


@pytest.fixture(scope="module")
def loc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A boxed dataset, a classification run on it, and a PCR localisation run from it, FC layers only."""
    root = write_dataset(tmp_path_factory.mktemp("boxed"), {"train": 4, "val": 2})
    (root / "boxes.txt").write_text("".join(f"{p.relative_to(root).as_posix()} 8 6 35 33\n"
                                            for p in sorted(root.rglob("*.png"))))
    classifier, loc = tmp_path_factory.mktemp("classifier"), tmp_path_factory.mktemp("loc")
    train(tiny(root, classifier, batch_size=4, batch_norm=True))
    train(tiny(root, loc, scale=(32, 32), lr=1e-3, batch_size=4, batch_norm=True, weights=str(classifier),
               freeze="features"),
          task=Localisation("pcr"))
    return root, classifier, loc


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_predict_draws_neither_among_its_images_nor_in_a_run_it_reads(loc_run, tmp_path, capsys):
    root, classifier, loc = loc_run
    data = write_dataset(tmp_path / "data", {"train": 1, "val": 2}, ext="jpg")
    images = sorted((data / "val" / "class0").glob("*.jpg"))
    files = sorted(path for folder in (data, loc, classifier) for path in folder.rglob("*"))
    args = ["localize", "predict", *map(str, images), "--checkpoint", str(loc), "--classifier", str(classifier),
            "--workers", "0", "--device", "cpu"]
    for out, message in [(data / "val" / "class0", "--out is the folder of the input image"),
                         (data / "val" / "drawn", f"--out lies in {data / 'val'}, a split of the dataset"),
                         (data / "train" / "class1", f"--out lies in {data / 'train'}, a split of the dataset"),
                         (loc, f"--out lies in {loc}, the run directory of --checkpoint"),
                         (loc / "checkpoints", f"--out lies in {loc}, the run directory of --checkpoint"),
                         (classifier, f"--out lies in {classifier}, the run directory of --classifier")]:
        assert main([*args, "--out", str(out)]) == 2
        assert message in one_line_error(capsys)
    assert sorted(path for folder in (data, loc, classifier) for path in folder.rglob("*")) == files
    subset = tmp_path / "subset" / "val"  # a subset whose class folders are links into the store
    subset.mkdir(parents=True)
    (subset / "class0").symlink_to(data / "val" / "class0")
    linked = ["localize", "predict", str(subset / "class0" / images[0].name), *args[2 + len(images):]]
    assert main([*linked, "--out", str(subset / "drawn")]) == 2
    assert f"--out lies in {subset}, a split of the dataset" in one_line_error(capsys)
    # beside the splits, not in one: no dataset reads it
    assert main([*args, "--out", str(data / "drawn")]) == 0
    assert sorted(path.name for path in (data / "drawn").iterdir()) == ["0.png", "1.png"]


def test_protocol_one_labels_a_net_by_the_layers_its_recipe_says_were_fine_tuned(loc_run, capsys):
    root, classifier, loc = loc_run
    center = ["localize", "eval", "--checkpoint", str(loc), "--data", str(root), "--workers", "0", "--device", "cpu"]
    assert main([*center, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["fine_tuned"] == "fc"  # trained --freeze features
    assert main(center) == 0 and "| FC1-FC2 | PCR |" in capsys.readouterr().out
    assert main([*center, "--fine-tuned", "fc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["fine_tuned"] == "fc"
    assert main([*center, "--fine-tuned", "all"]) == 2
    assert f"--fine-tuned all: {loc / 'checkpoints' / 'best.pt'} records freeze features" in one_line_error(capsys)
    dense = [*center, "--protocol", "dense", "--classifier", str(classifier), "--scales", "32"]
    assert main([*dense, "--fine-tuned", "fc"]) == 2
    assert "--fine-tuned labels Table 8's rows (--protocol center)" in one_line_error(capsys)


def test_the_fine_tuned_label_is_the_recipes_else_the_one_given():
    assert fine_tuned_layers({}, None, "w.pt") == "all" and fine_tuned_layers({}, "fc", "w.pt") == "fc"
    assert fine_tuned_layers({"freeze": None}, None, "w.pt") == "all"
    assert fine_tuned_layers({"freeze": "features"}, "fc", "w.pt") == "fc"
    assert fine_tuned_layers({"freeze": "conv4_2"}, None, "w.pt") == "after conv4_2"
    with pytest.raises(UserError, match=r"^w.pt: recipe freeze must be a layer name or null; got \[1\]$"):
        fine_tuned_layers({"freeze": [1]}, None, "w.pt")
    results = [CenterResult("runs/a", "pcr", "after conv4_2", 8, 40.0, 50.0, 60.0),
               CenterResult("runs/b", "scr", "fc", 8, 30.0, 50.0, 60.0, paper_error=36.4)]  # a net D at S = 384
    table = table_8(results).markdown()
    assert "| a | after conv4_2 | PCR | 40.0 | 50.0 | 60.0 | - |" in table
    assert "| b | FC1-FC2 | SCR | 30.0 | 50.0 | 60.0 | 36.4 |" in table


def with_recipe(run: Path, folder: Path, **changes: object) -> Path:
    """A copy of ``run`` whose run record and checkpoints' recipes have ``changes``."""
    shutil.copytree(run, folder)
    record = json.loads((folder / "recipe.json").read_text())
    (folder / "recipe.json").write_text(json.dumps({**record, **changes}))
    for checkpoint in (folder / "checkpoints").glob("*.pt"):
        state = load_checkpoint(checkpoint)
        save_checkpoint({**state, "recipe": {**state["recipe"], **changes}}, checkpoint)
    return folder


def safetensors_of(recipe: dict[str, object], path: Path) -> Path:
    """A random net of ``recipe`` as our ``.safetensors``."""
    export_safetensors(model_from_recipe(recipe), recipe, path)
    return path


@pytest.mark.parametrize(("key", "value", "said"), [
    ("task", "localisation-xyz", "recipe task must be localisation-scr or localisation-pcr; got 'localisation-xyz'"),
    ("box_targets", "weird", "recipe box_targets must be standardised or raw; got 'weird'"),
    ("box_targets", ["raw"], "recipe box_targets must be standardised or raw; got ['raw']"),
])
def test_a_bad_localisation_key_of_a_recipe_is_named_with_its_file(loc_run, tmp_path, capsys, key, value, said):
    root, classifier, loc = loc_run
    run = with_recipe(loc, tmp_path / "run", **{key: value})
    recipe = {**load_checkpoint(loc / "checkpoints" / "best.pt")["recipe"], key: value}
    weights = safetensors_of(recipe, tmp_path / "loc.safetensors")
    cases = [(["localize", "eval", "--checkpoint", str(run), "--data", str(root)], run / "checkpoints" / "best.pt"),
             (["localize", "eval", "--checkpoint", str(weights), "--data", str(root), "--protocol", "dense",
               "--classifier", str(classifier)], weights),
             (["localize", "train", "--data", str(root), "--resume", "--out", str(run), "--epochs", "2",
               "--workers", "0", "--device", "cpu", "--no-progress"], run / "recipe.json")]
    for argv, file in cases:
        assert main([*argv, "--workers", "0"] if argv[1] == "eval" else argv) == 2
        assert f"error: {file}: {said}" in one_line_error(capsys)
    with pytest.raises(UserError, match=f"^{run / 'checkpoints' / 'best.pt'}: "):
        task_of(recipe, source=run)


def test_a_classification_run_or_a_bad_box_code_is_named_with_its_file(loc_run, tmp_path, capsys):
    root, classifier, loc = loc_run
    assert main(["localize", "eval", "--checkpoint", str(classifier), "--data", str(root), "--workers", "0"]) == 2
    assert (f"{classifier / 'checkpoints' / 'best.pt'}: not a localisation net (its recipe's task is classification)"
            in one_line_error(capsys))
    run = with_recipe(loc, tmp_path / "run")
    record = json.loads((run / "recipe.json").read_text())
    (run / "recipe.json").write_text(json.dumps({**record, "box_code_mean": ["a", 1]}))
    assert main(["localize", "train", "--data", str(root), "--resume", "--out", str(run), "--epochs", "2",
                 "--workers", "0", "--device", "cpu", "--no-progress"]) == 2
    assert (f"{run / 'recipe.json'}: recipe box_code_mean must be 4 finite numbers; got ['a', 1]"
            in one_line_error(capsys))


def test_a_boxes_path_of_another_kind_in_the_run_record_is_named_on_resume(loc_run, tmp_path, capsys):
    root, _, loc = loc_run
    run = Path(shutil.copytree(loc, tmp_path / "run"))
    record = json.loads((run / "recipe.json").read_text())
    (run / "recipe.json").write_text(json.dumps({**record, "boxes": 5}))
    assert main(["localize", "train", "--data", str(root), "--resume", "--out", str(run), "--epochs", "2",
                 "--workers", "0", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'recipe.json'}: recipe boxes must be a file or folder path; got 5" in err


def test_other_boxes_on_resume_are_refused_a_copy_of_the_run_s_own_taken(loc_run, tmp_path, capsys):
    root, _, loc = loc_run
    run = Path(shutil.copytree(loc, tmp_path / "run"))
    recorded = Path(json.loads((run / "recipe.json").read_text())["boxes"])
    other = tmp_path / "other.txt"
    other.write_text(recorded.read_text().replace(" 8 6 ", " 7 6 ", 1))
    assert main(["localize", "train", "--data", str(root), "--resume", "--out", str(run), "--epochs", "2",
                 "--boxes", str(other), "--workers", "0", "--device", "cpu", "--no-progress"]) == 2
    assert (f"--boxes {other}: {run} was trained on the boxes of {recorded}, which are still there"
            in one_line_error(capsys))
    shutil.copy(recorded, tmp_path / "copy.txt")
    assert same_boxes(tmp_path / "copy.txt", recorded) and not same_boxes(other, recorded)


def test_a_run_whose_boxes_file_is_gone_is_not_resumed_on_the_datas_own(loc_run, tmp_path, capsys):
    """The data's default boxes are other boxes than the run's, which the box codes' spread was fitted on."""
    root, _, loc = loc_run
    run = Path(shutil.copytree(loc, tmp_path / "run"))
    record = json.loads((run / "recipe.json").read_text())
    gone = tmp_path / "moved" / "boxes.txt"
    (run / "recipe.json").write_text(json.dumps({**record, "boxes": str(gone)}))
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert main(["localize", "train", "--data", str(root), "--resume", "--out", str(run), "--epochs", "2",
                 "--workers", "0", "--device", "cpu", "--no-progress"]) == 2
    assert (f"--resume: {run} was trained on the boxes of {gone}, which are gone; give --boxes with that file where "
            "it is now") in one_line_error(capsys)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_localize_eval_shows_its_progress_unless_told_not_to(loc_run, monkeypatch):
    root, classifier, loc = loc_run
    bars = []

    def watched(total: int | None = None, enabled: bool = True, **options: object):
        bars.append((total, enabled, options["unit"]))
        return progress_bar(total, enabled, **options)

    for module in (center, dense):  # the centre protocol's bar, and the dense one's
        monkeypatch.setattr(module, "progress_bar", watched)
    for flags in ([], ["--no-progress"]):
        evaluate = ["localize", "eval", "--checkpoint", str(loc), "--data", str(root), "--batch-size", "4",
                    "--workers", "0", "--device", "cpu", *flags]
        assert main(evaluate) == 0
        assert main([*evaluate, "--protocol", "dense", "--classifier", str(classifier)]) == 0
    assert bars == [(2, True, "batch"), (8, True, "img"), (2, False, "batch"), (8, False, "img")]  # 8 val images


def test_a_boxes_file_of_validation_boxes_alone_is_evaluated_without_the_centre_prior(loc_run, tmp_path, capsys):
    root, classifier, loc = loc_run
    lines = (root / "boxes.txt").read_text().splitlines()
    val_only = tmp_path / "val-boxes.txt"
    val_only.write_text("".join(f"{line}\n" for line in lines if line.startswith("val/")))
    base = ["localize", "eval", "--checkpoint", str(loc), "--data", str(root), "--workers", "0", "--device", "cpu",
            "--no-progress", "--json"]
    for protocol in (["--protocol", "center"], ["--protocol", "dense", "--classifier", str(classifier)]):
        printed = []
        for boxes in (root / "boxes.txt", val_only):
            assert main([*base, *protocol, "--boxes", str(boxes)]) == 0
            printed.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        full, alone = printed
        assert full["centre_prior_error"] is not None and alone["centre_prior_error"] is None
        assert (alone["localisation_error"], alone["whole_image_error"], alone["images"]) == (
            full["localisation_error"], full["whole_image_error"], full["images"])
