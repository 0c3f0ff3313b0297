"""Linear SVMs on very deep features (Appendix B, verydeep.eval.transfer): average precision (11-point and area)
and mean class recall against hand-computed cases and scikit-learn; Caltech-style splits; the VOC reader
(difficult flags, several objects, bad files); both protocols end to end through the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, save
from sklearn.metrics import average_precision_score, balanced_accuracy_score

from verydeep.cli import main
from verydeep.data.voc import IGNORED, NEGATIVE, POSITIVE, VOCObject, image_labels, open_voc, read_annotation
from verydeep.errors import MissingFileError, UserError
from verydeep.eval.feature_store import Features
from verydeep.eval.features import describe
from verydeep.eval.transfer import (
    average_precision,
    caltech_splits,
    class_recalls,
    precision_recall,
    run_caltech,
    run_voc,
    run_voc_action,
    table_11,
)
from verydeep.io.checkpoint import export_safetensors
from verydeep.nn.model import VGG

# ---- metrics ------------------------------------------------------------------------------


def test_average_precision_by_hand():
    # ranked: +, -, +, -: precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1
    scores, positives = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], dtype=bool)
    assert average_precision(scores, positives, "area") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(scores, positives, "11point") == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # ranked: -, +, +: precision 0, 1/2, 2/3; interpolated, the 1/2 becomes 2/3
    scores, positives = np.array([0.9, 0.8, 0.7]), np.array([0, 1, 1], dtype=bool)
    assert average_precision(scores, positives, "area") == pytest.approx(2 / 3)
    assert average_precision(scores, positives, "11point") == pytest.approx(2 / 3)
    assert average_precision_score(positives, scores) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)  # not interpolated
    # tied scores share a threshold: +, - tied at the top, then +
    precision, recall = precision_recall(np.array([1.0, 1.0, 0.5]), np.array([1, 0, 1], dtype=bool))
    assert precision.tolist() == [0.5, pytest.approx(2 / 3)] and recall.tolist() == [0.5, 1.0]
    assert average_precision(np.ones(4), np.array([1, 0, 0, 1], dtype=bool), "area") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one positive"):
        average_precision(scores, np.zeros(3, dtype=bool))


@pytest.mark.parametrize("seed", range(20))
def test_precision_recall_and_ap_against_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    positives = rng.random(n) < 0.3
    positives[0] = True
    scores = np.round(rng.normal(size=n) + positives, 1)  # rounded: ties
    precision, recall = precision_recall(scores, positives)
    # scikit-learn's AP is the same curve, not interpolated: sum over recall steps of the precision there
    assert np.sum(np.diff(np.r_[0, recall]) * precision) == pytest.approx(average_precision_score(positives, scores))
    area = average_precision(scores, positives, "area")
    assert area >= average_precision_score(positives, scores) - 1e-12
    monotone = np.argsort(-scores)  # precision that only falls (positives first) is left as it is
    best = np.where(positives[monotone], 2.0, -2.0) - np.arange(n) * 1e-3
    assert average_precision(best, positives[monotone], "area") == pytest.approx(1.0)
    assert 0 < average_precision(scores, positives, "11point") <= 1


def test_mean_class_recall_by_hand_and_against_scikit_learn():
    truth = np.array([0, 0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 2, 1, 0, 2])
    recalls = class_recalls(predicted, truth, 4)
    assert recalls[:3].tolist() == [0.5, 0.5, 1.0] and np.isnan(recalls[3])  # class 3 has no test image
    assert np.nanmean(recalls) == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert np.nanmean(class_recalls(predicted, truth, 5)) == pytest.approx(balanced_accuracy_score(truth, predicted))


# ---- caltech ------------------------------------------------------------------------------


def test_caltech_splits():
    labels = np.repeat([0, 1, 2], [10, 12, 8])
    classes = ["a", "b", "c"]
    splits = caltech_splits(labels, [""] * 30, classes, 5, None, 3, seed=0)
    assert len(splits) == 3
    for train, test in splits:
        assert np.bincount(labels[train]).tolist() == [5, 5, 5]
        assert np.bincount(labels[test]).tolist() == [5, 7, 3] and not set(train) & set(test)
    assert not np.array_equal(splits[0][0], splits[1][0])
    again = caltech_splits(labels, [""] * 30, classes, 5, None, 3, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(splits, again, strict=True))
    limited = caltech_splits(labels, [""] * 30, classes, 5, 2, 1, seed=0)
    assert np.bincount(labels[limited[0][1]]).tolist() == [2, 2, 2]
    given = caltech_splits(labels, ["train", "test"] * 15, classes, 5, None, 3, seed=0)
    assert len(given) == 1 and given[0][0].tolist() == list(range(0, 30, 2))
    with pytest.raises(UserError, match="class c has 8 images; --train-per-class 8"):
        caltech_splits(labels, [""] * 30, classes, 8, None, 3, seed=0)


def clusters(classes: int, per_class: int, dims: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm points around one random centre per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dims))
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + 0.3 * rng.normal(size=(len(labels), dims))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def features_of(x: np.ndarray, labels: np.ndarray, splits: list[str], classes: list[str]) -> Features:
    return Features(x, labels, [f"{i}.jpg" for i in range(len(x))], splits, classes, classes, {"kind": "test"})


def test_caltech_protocol_separates_clusters_over_random_or_given_splits():
    x, labels = clusters(4, 12)
    classes = ["a", "b", "c", "d"]
    result = run_caltech(features_of(x, labels, [""] * 48, classes), train_per_class=6, splits=3,
                         c_grid=(0.1, 1, 10))
    assert result.mean_class_recall > 0.9 and result.mean_class_recall_std is not None
    assert len(result.splits) == 3 and all(s.train == 24 and s.test == 24 for s in result.splits)
    assert set(result.per_class_recall) == set(classes) and result.train_per_class == 6
    given = run_caltech(features_of(x, labels, ["train", "test"] * 24, classes), c_grid=(1,))
    assert given.mean_class_recall_std is None and given.train_per_class is None and given.splits[0].test == 24
    table = table_11(result).markdown()
    assert "91.8 ± 1.0" in table and "85.0 ± 0.2" in table and "89.3" in table
    assert f"{100 * result.mean_class_recall:.1f} ± {100 * result.mean_class_recall_std:.1f}" in table


@pytest.mark.parametrize("parts, message", [(["train", "test"], "in both train and test"),
                                            (["test", "test"], "twice in test"), (["", ""], "twice in the data")])
def test_an_image_listed_twice_is_refused_naming_it(parts, message):
    x, labels = clusters(2, 6)
    splits = ["train", "test"] * 6 if parts[0] else [""] * 12
    stored = features_of(x, labels, splits, ["a", "b"])
    stored.paths[5], stored.splits[4], stored.splits[5] = stored.paths[4], parts[0], parts[1]
    with pytest.raises(UserError, match=f"image 4.jpg is {message}: each image must be listed once"):
        run_caltech(stored, train_per_class=2, splits=1, c_grid=(1,))



def test_voc_features_of_an_image_in_both_parts_are_refused_where_action_persons_of_one_image_are_not():
    """A stored features file (merged, edited) may list a test image among the training ones: scored on what the
    SVMs trained on. VOC action's rows are persons, several of one image in one part."""
    x, single = clusters(2, 10)
    labels = np.where(single[:, None] == np.arange(2), POSITIVE, NEGATIVE).astype(np.int8)
    splits = ["train", "test"] * 10
    paths = [f"{i}.jpg" for i in range(20)]
    both = Features(x, labels, paths[:1] + paths[:19], splits, ["cat", "dog"], ["cat", "dog"], {"kind": "test"})
    with pytest.raises(UserError, match="^image 0.jpg is in both train and test: each image must be listed once$"):
        run_voc(both, c_grid=(1,))
    action = {"kind": "test", "regions": "image"}
    persons = Features(x, labels, paths[:2] + paths[:18], splits, ["cat", "dog"], ["cat", "dog"], action)
    assert set(run_voc_action(persons, c_grid=(1,)).per_class_ap) == {"cat", "dog"}  # 0.jpg's 2 persons, 1.jpg's 2
    with pytest.raises(UserError, match="^image 0.jpg is in both train and test"):
        run_voc_action(Features(x, labels, both.paths, splits, ["cat", "dog"], ["cat", "dog"], action), c_grid=(1,))

@pytest.mark.parametrize("c_grid", [(1,), (0.1, 1)])
def test_a_class_with_no_training_image_is_refused_whether_or_not_c_is_chosen(c_grid):
    """Its SVM would never see it, and its recall (0) would count in the mean; one C or a grid alike."""
    x, labels = clusters(3, 6)
    splits = ["train", "test"] * 9
    for i in np.flatnonzero(labels == 2)[::2]:  # class c's training images: moved to the test part
        splits[i] = "test"
    with pytest.raises(UserError, match="class c: no training images"):
        run_caltech(features_of(x, labels, splits, ["a", "b", "c"]), c_grid=c_grid)


@pytest.mark.parametrize("c_grid", [(1,), (0.1, 1)])
def test_a_voc_class_without_training_negatives_is_one_line_whether_or_not_c_is_chosen(c_grid):
    x, single = clusters(2, 10)
    labels = np.full((20, 2), NEGATIVE, dtype=np.int8)
    labels[np.arange(20), single] = POSITIVE
    splits = ["train", "test"] * 10
    labels[0::2, 0] = POSITIVE  # every training image holds a cat
    with pytest.raises(UserError, match="class cat's negatives: no training images"):
        run_voc(features_of(x, labels, splits, ["cat", "dog"]), c_grid=c_grid)


def test_any_seed_torch_takes_is_taken_by_the_svms_too(tmp_path, capsys):
    x, labels = clusters(2, 10)
    stored = features_of(x, labels, [""] * 20, ["a", "b"])
    largest = 2**64 - 1  # torch's largest seed; scikit-learn's random_state refuses any from 2**32 on
    first, again = (run_caltech(stored, train_per_class=5, splits=2, c_grid=(0.1, 1), seed=largest) for _ in "12")
    assert first.splits == again.splits and first.per_class_recall == again.per_class_recall
    for seed in ("-1", str(2**64)):
        with pytest.raises(SystemExit) as bad:
            main(["transfer", "--protocol", "caltech", "--features", str(tmp_path / "f.npz"), "--seed", seed])
        assert bad.value.code == 2 and "--seed: expected an integer from 0" in capsys.readouterr().err


def test_voc_protocol_leaves_difficult_images_out_and_scores_both_ap_kinds():
    x, single = clusters(3, 20)
    labels = np.full((60, 3), NEGATIVE, dtype=np.int8)
    labels[np.arange(60), single] = POSITIVE
    labels[::7, 1] = np.where(labels[::7, 1] == POSITIVE, POSITIVE, IGNORED)  # some images difficult for class 1
    splits = ["train", "test"] * 30
    result = run_voc(features_of(x, labels, splits, ["cat", "dog", "cow"]), c_grid=(0.1, 1, 10))
    assert set(result.map) == {"11point", "area"} and result.map["area"] > 0.9
    dog = result.per_class_ap["dog"]
    assert dog.train_positives == 10 and dog.test_positives == 10 and set(dog.ap) == {"11point", "area"}
    assert dog.C in (0.1, 1, 10)
    with pytest.raises(UserError, match="use --protocol caltech"):
        run_voc(features_of(x, single, splits, ["cat", "dog", "cow"]))
    with pytest.raises(UserError, match="use --protocol voc"):
        run_caltech(features_of(x, labels, splits, ["cat", "dog", "cow"]))


# ---- the VOC reader -----------------------------------------------------------------------


def annotation(objects: list[tuple[str, int | None]]) -> str:
    """A VOC annotation with these (name, difficult) objects; difficult None leaves the tag out."""
    body = "".join(f"<object><name>{name}</name><pose>Left</pose>"
                   + ("" if difficult is None else f"<difficult>{difficult}</difficult>")
                   + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
                   for name, difficult in objects)
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{body}</annotation>"


def write_voc(root: Path, images: dict[str, list[tuple[str, int | None]]], sets: dict[str, list[str]]) -> Path:
    """A VOC root: a JPEG and an annotation per image id, and ImageSets/Main lists."""
    for k, (image_id, objects) in enumerate(images.items()):
        save(photo(48, 40, seed=k), root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(annotation(objects))
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for name, ids in sets.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_voc_labels_difficult_flags_and_several_objects(tmp_path):
    images = {"000001": [("dog", 0), ("person", 0), ("person", 1)], "000002": [("dog", 1), ("cat", None)],
              "000003": [("cat", 1), ("cat", 0)], "000004": [("person", 0)]}
    root = write_voc(tmp_path / "VOC2007", images, {"trainval": ["000001", "000002"], "test": ["000003", "000004"],
                                                    "train": ["000001"], "val": ["000002"]})
    voc = open_voc(root)
    assert voc.classes == ["cat", "dog", "person"] and voc.image_sets == ("trainval", "test")
    assert voc.ids == ["000001", "000002", "000003", "000004"] and voc.splits == ["train", "train", "test", "test"]
    assert voc.labels.tolist() == [[-1, 1, 1], [1, 0, -1], [1, -1, -1], [-1, -1, 1]]
    assert read_annotation(root / "Annotations" / "000001.xml") == [
        VOCObject("dog", False), VOCObject("person", False), VOCObject("person", True)]
    assert image_labels([VOCObject("cat", True)], ["cat", "dog"]).tolist() == [IGNORED, NEGATIVE]
    (root / "ImageSets" / "Main" / "test.txt").unlink()  # VOC-2012: test annotations not public
    assert open_voc(root).image_sets == ("train", "val") and open_voc(root).ids == ["000001", "000002"]



def test_voc_image_sets_written_with_a_byte_order_mark_or_not_as_text(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": [("dog", 0)], "b": [("cat", 0)]}, {"train": ["a"], "val": ["b"]})
    listed = root / "ImageSets" / "Main" / "train.txt"
    listed.write_bytes(b"\xef\xbb\xbfa\n")  # as Notepad writes UTF-8
    assert open_voc(root).ids == ["a", "b"]
    listed.write_bytes(b"a\xff\n")
    with pytest.raises(UserError, match=r"train\.txt: not a text file \(byte 1 is not UTF-8\)"):
        open_voc(root)
    listed.write_bytes(b"a\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("")  # an empty test part: named, not train.txt's absence
    with pytest.raises(UserError, match=r"test\.txt: lists no image; give the test part's ids, or remove the file"):
        open_voc(root)


def test_voc_training_part_is_train_and_val_without_trainval_and_no_test_image_trains(tmp_path):
    images = {"a": [("dog", 0)], "b": [("cat", 0)], "c": [("cat", 0)], "d": [("dog", 0)]}
    root = write_voc(tmp_path / "voc", images, {"train": ["a"], "val": ["b"], "test": ["c", "d"]})
    voc = open_voc(root)  # no trainval.txt: train and val together, scored on test
    assert voc.image_sets == ("train+val", "test") and voc.ids == ["a", "b", "c", "d"]
    assert voc.splits == ["train", "train", "test", "test"]
    main_lists = root / "ImageSets" / "Main"
    (main_lists / "test.txt").write_text("c\nd\na\n")
    with pytest.raises(UserError, match="image a is in both train\\+val and test: a test image must not train"):
        open_voc(root)
    (main_lists / "test.txt").write_text("c\nd\n")
    (main_lists / "train.txt").write_text("a\na\n")
    with pytest.raises(UserError, match="image a is listed twice in train\\+val"):
        open_voc(root)
    (main_lists / "train.txt").write_text("a\n")
    (root / "Annotations" / "d.xml").unlink()  # test annotations partly there: not VOC-2012's none
    with pytest.raises(MissingFileError, match=r"d\.xml: no such VOC annotation, though .*test\.txt lists it"):
        open_voc(root)

def test_voc_bad_and_missing_files_are_one_line_errors(tmp_path):
    root = write_voc(tmp_path / "voc", {"a": [("dog", 0)], "b": [("cat", 0)]}, {"train": ["a"], "val": ["b"]})
    (root / "Annotations" / "b.xml").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(UserError, match=r"b\.xml: not a readable VOC annotation \(ParseError") as error:
        open_voc(root)
    assert "\n" not in str(error.value)
    (root / "Annotations" / "b.xml").write_text(annotation([("cat", 2)]))
    with pytest.raises(UserError, match=r"b\.xml: an <object> .* not 0 or 1"):
        open_voc(root)
    (root / "Annotations" / "b.xml").unlink()
    with pytest.raises(MissingFileError, match=r"b\.xml: no such VOC annotation"):
        open_voc(root)
    with pytest.raises(MissingFileError, match="not a VOC root"):
        open_voc(tmp_path)


# ---- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    recipe = {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32}
    model = VGG("A", num_classes=4, width=1 / 16, input_size=32, init="he")
    return export_safetensors(model, recipe, tmp_path_factory.mktemp("net") / "a.safetensors")


def test_voc_end_to_end_through_the_command_line(net, tmp_path, capsys):
    images = {f"{i:06d}": [("dog" if i % 2 else "cat", int(i % 5 == 0))] for i in range(24)}
    ids = sorted(images)
    root = write_voc(tmp_path / "voc", images, {"trainval": ids[:16], "test": ids[16:]})
    argv = ["transfer", "--protocol", "voc", "--data", str(root), "--weights", str(net), "--scales", "32",
            "--workers", "0", "--device", "cpu", "--no-progress", "--c-grid", "1", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["map"]) == {"11point", "area"} and 0 <= result["map"]["area"] <= 1
    assert set(result["per_class_ap"]) == {"cat", "dog"} and "11-point" in result["ap_kinds"]["11point"]
    assert "Table 11" in out and "AP % (area)" in out


def test_caltech_end_to_end_from_stored_features_and_errors(net, tmp_path, capsys):
    root = tmp_path / "caltech"
    for i in range(24):
        save(photo(40, 36, seed=i), root / f"class{i % 2}" / f"{i}.png")
    stored = tmp_path / "f.npz"
    assert main(["features", "--data", str(root), "--weights", str(net), "--scales", "32,48", "--out", str(stored),
                 "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["transfer", "--protocol", "caltech", "--features", str(stored), "--train-per-class", "6", "--splits",
            "2", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["mean_class_recall"] <= 1 and result["mean_class_recall_std"] is not None
    assert set(result["per_class_recall"]) == {"class0", "class1"} and len(result["splits"]) == 2
    assert main(["transfer", "--protocol", "voc", "--features", str(stored)]) == 2
    assert "use --protocol caltech" in capsys.readouterr().err
    assert main(["transfer", "--protocol", "caltech"]) == 2
    assert "give --features" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main([*argv, "--c-grid", "0,1"])
    assert bad.value.code == 2 and "positive numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main([*argv, "--c-grid", "1,1"])
    assert bad.value.code == 2 and "a value is listed twice in '1,1'" in capsys.readouterr().err
    assert main([*argv, "--c-grid", "1", "--folds", "2"]) == 2  # one C: no cross-validation for --folds to fold
    assert "--folds 2: cross-validation chooses C from --c-grid, which holds one value (1)" in capsys.readouterr().err
    assert main([*argv, "--folds", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("--folds must be at least 2; got 1")  # --c-grid not blamed
    with pytest.raises(SystemExit) as bad:
        main([*argv[:argv.index("--splits")], "--splits", "100000000000000000000"])  # would train for ever
    assert bad.value.code == 2 and "--splits: expected an integer from 1 to 1000" in capsys.readouterr().err


def stored_arrays(**changed: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a good two-class features file of 24 images, some replaced."""
    x, labels = clusters(2, 12, dims=8)
    arrays = {"features": x, "labels": labels, "paths": np.array([f"{i}.jpg" for i in range(24)]),
              "splits": np.array([""] * 24), "classes": np.array(["a", "b"]), "class_names": np.array(["a", "b"]),
              "skipped": np.array([], dtype=str), "settings": np.array(json.dumps({"kind": "raw-pixels"}))}
    return arrays | changed


NAN_ROW = np.where(np.arange(24)[:, None] == 3, np.nan, clusters(2, 12, dims=8)[0]).astype(np.float32)


@pytest.mark.parametrize("changed, message", [
    ({"features": NAN_ROW}, "features hold values that are not finite .* row 3"),
    ({"features": np.zeros((24, 0), np.float32)}, r"features must be a 2-D array .* shape \(24, 0\)"),
    ({"features": np.zeros((0, 8), np.float32)}, r"features must be a 2-D array .* shape \(0, 8\)"),
    ({"features": np.full((24, 8), "a")}, "features must be a 2-D array of numbers"),
    ({"labels": np.full(24, 7)}, r"labels must lie in \[0, 1\]; got values from 7 to 7"),
    ({"labels": np.full(24, 0.5)}, r"labels must be integers of shape \(24,\) or \(24, 2\)"),
    ({"labels": np.full((24, 2), 5)}, r"labels must lie in \[-1, 1\]"),
    ({"paths": np.array(["one.jpg"])}, "paths must be a list of 24 strings"),
    ({"splits": np.array(["val"] * 24)}, "splits must be train, test or empty; got 'val'"),
    ({"classes": np.array([1, 2])}, "classes must be a list of strings"),
    ({"classes": np.array(["a", "a"])}, "classes must be distinct; a is listed twice"),
    ({"features": clusters(2, 12, dims=8)[0] * 1e30}, r"features must be L2-normalised rows .* row 0 has norm 1e\+30"),
    ({"settings": np.array("not json")}, "settings must be a JSON object"),
    ({"settings": np.array("[1, 2]")}, "settings must be a JSON object"),
    ({"settings": np.array('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")}, "settings must be a JSON object"),
    ({"settings": np.array('{"kind": "raw-pixels", "side": 1e400}')}, "settings side must be whole numbers of pixels"),
    ({"settings": np.array('{"kind": "raw-pixels", "side": 1e300}')}, "settings side must be whole numbers .*1e\\+300"),
    ({"settings": np.array('{"kind": "vgg", "scales": [256, -1]}')}, "settings scales must be a list of whole numbers"),
    ({"settings": np.array('{"kind": "vgg", "scales": 256}')}, "settings scales must be a list of whole numbers"),
    ({"splits": np.array(["train", "test", ""] * 8)}, "splits must be all empty .* or all train or test .*; 8 of 24"),
])
def test_a_foreign_or_damaged_features_file_is_one_line_naming_it(tmp_path, capsys, changed, message):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **stored_arrays(**changed))
    before = bad.read_bytes()
    assert main(["transfer", "--protocol", "caltech", "--features", str(bad), "--train-per-class", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"verydeep transfer: error: {bad}: ")
    assert re.search(message, err), err
    assert bad.read_bytes() == before


def test_a_truncated_features_file_is_one_line_and_foreign_settings_only_describe(tmp_path, capsys):
    good = tmp_path / "good.npz"
    np.savez(good, **stored_arrays())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert main(["transfer", "--protocol", "caltech", "--features", str(truncated)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{truncated}: not a readable .npz file" in err and "\n" not in err
    for field, value, name in ((0, 1, "encrypted"), (2, 99, "compression 99")):  # zipfile's own refusals
        damaged = bytearray(good.read_bytes())
        for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # every member's two headers
            for start in (m.start() for m in re.finditer(re.escape(signature), bytes(damaged))):
                damaged[start + flags + field:start + flags + field + 2] = value.to_bytes(2, "little")
        (tmp_path / f"{name}.npz").write_bytes(bytes(damaged))
        assert main(["transfer", "--protocol", "caltech", "--features", str(tmp_path / f"{name}.npz")]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{name}.npz: not a readable .npz file" in err and "\n" not in err, err
    photo_file = save(photo(20, 20), tmp_path / "photo.jpg")  # not taken for a pickle, as numpy would say
    assert main(["transfer", "--protocol", "caltech", "--features", str(photo_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{photo_file}: not a features file (not a .npz archive: it begins b'\\xff\\xd8\\xff\\xe0')")
    assert Features.load(good).settings == {"kind": "raw-pixels"}
    assert describe(Features.load(good)).endswith("(raw-pixels (settings incomplete)), 0 skipped")


def test_features_and_weights_together_are_refused(tmp_path, capsys):
    features = tmp_path / "f.npz"
    features.write_bytes(b"")
    assert main(["transfer", "--protocol", "caltech", "--features", str(features), "--weights", "vgg16"]) == 2
    assert "--weights would make others: give one of the two" in capsys.readouterr().err


def test_random_split_flags_are_refused_for_features_with_their_own_split(tmp_path, capsys):
    given = tmp_path / "given.npz"
    np.savez(given, **stored_arrays(splits=np.array(["train", "test"] * 12)))
    argv = ["transfer", "--protocol", "caltech", "--features", str(given)]
    assert main([*argv, "--train-per-class", "1", "--splits", "3", "--test-per-class", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--train-per-class, --test-per-class, --splits: --features {given} holds its own training and test" in err
    assert main([*argv, "--splits", "3"]) == 2
    assert f"--splits: --features {given} holds its own" in capsys.readouterr().err
    assert main([*argv, "--c-grid", "1", "--json"]) == 0  # the given split, without the flags
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_per_class"] is None


def test_random_split_flags_are_refused_for_data_with_train_and_test_before_extracting(tmp_path, capsys):
    for part in ("train", "test"):
        for i in range(2):
            save(photo(16, 16, seed=i), tmp_path / "data" / part / f"class{i}" / f"{i}.png")
    argv = ["transfer", "--protocol", "caltech", "--data", str(tmp_path / "data"), "--raw-pixels", "4",
            "--out", str(tmp_path / "f.npz"), "--train-per-class", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--train-per-class: --data {tmp_path / 'data'} holds its own training and test images" in err
    assert not (tmp_path / "f.npz").exists()


def test_a_test_class_folder_without_images_is_described_and_then_named_by_transfer(tmp_path, capsys):
    """As a validation split may: the descriptors are written; the caltech protocol then refuses to leave the
    class out of its mean."""
    for i in range(4):
        save(photo(16, 16, seed=i), tmp_path / "data" / "train" / f"class{i % 2}" / f"{i}.png")
    save(photo(16, 16, seed=9), tmp_path / "data" / "test" / "class0" / "9.png")
    (tmp_path / "data" / "test" / "class1").mkdir()
    out = tmp_path / "f.npz"
    assert main(["features", "--raw-pixels", "4", "--data", str(tmp_path / "data"), "--workers", "0",
                 "--out", str(out)]) == 0
    assert Features.load(out).splits == ["train"] * 4 + ["test"]
    assert main(["transfer", "--protocol", "caltech", "--features", str(out), "--c-grid", "1"]) == 2
    assert "class class1 has no test images" in capsys.readouterr().err

@pytest.mark.parametrize("protocol", ["voc", "voc-action"])
def test_random_split_flags_are_refused_under_another_protocol(tmp_path, capsys, protocol):
    features = tmp_path / "f.npz"
    np.savez(features, **stored_arrays())
    assert main(["transfer", "--protocol", protocol, "--features", str(features), "--test-per-class", "2"]) == 2
    assert f"--test-per-class draw the random splits of --protocol caltech, not {protocol}" in capsys.readouterr().err


# ---- flags without effect, classes left out, folds --------------------------------------------


@pytest.mark.parametrize("flags", [["--scales", "64"], ["--aggregate", "average"], ["--aggregate", "stack"],
                                   ["--out", "{fx}"], ["--precision", "bf16"], ["--batch-size", "3"],
                                   ["--checkpoint-every", "3"], ["--device", "cuda:7"], ["--weights-dir", "{dir}"],
                                   ["--workers", "0"], ["--no-progress"]])
def test_extraction_flags_are_refused_beside_stored_features(tmp_path, capsys, flags):
    stored, fx = tmp_path / "f1.npz", tmp_path / "fx.npz"
    np.savez(stored, **stored_arrays())
    given = [flag.format(fx=fx, dir=tmp_path) for flag in flags]
    assert main(["transfer", "--protocol", "caltech", "--features", str(stored), "--train-per-class", "6",
                 *given]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not fx.exists()
    assert f"--features {stored} holds the descriptors already; {flags[0]} acts only on an extraction" in err


def test_net_flags_are_refused_beside_raw_pixels_in_transfer(tmp_path, capsys):
    for i in range(8):
        save(photo(16, 16, seed=i), tmp_path / "data" / f"class{i % 2}" / f"{i}.png")
    argv = ["transfer", "--protocol", "caltech", "--data", str(tmp_path / "data"), "--raw-pixels", "4",
            "--out", str(tmp_path / "f.npz"), "--train-per-class", "2", "--folds", "2", "--workers", "0"]
    assert main([*argv, "--scales", "32", "--precision", "bf16"]) == 2
    assert "--raw-pixels 4 describes images without a net; --scales, --precision would have no effect: drop them" in (
        capsys.readouterr().err)
    assert not (tmp_path / "f.npz").exists()
    assert main(argv) == 0 and (tmp_path / "f.npz").exists()


def test_checkpoint_every_without_out_is_refused_in_transfer(net, tmp_path, capsys):
    """Without --out the descriptors are never saved, so partial saves have nowhere to go."""
    for i in range(8):
        save(photo(16, 16, seed=i), tmp_path / "data" / f"class{i % 2}" / f"{i}.png")
    argv = ["transfer", "--protocol", "caltech", "--data", str(tmp_path / "data"), "--weights", str(net),
            "--scales", "32", "--train-per-class", "2", "--folds", "2", "--workers", "0", "--checkpoint-every", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint-every 1 saves the work to OUT.partial: give --out OUT.npz" in err
    assert main([*argv, "--out", str(tmp_path / "f.npz")]) == 0 and (tmp_path / "f.npz").exists()

def test_one_class_is_refused_naming_the_data_and_a_root_of_val_without_train_is_not_read_as_classes(tmp_path,
                                                                                                     capsys):
    for i in range(6):
        save(photo(16, 16, seed=i), tmp_path / "one" / "cat" / f"{i}.png")
        save(photo(16, 16, seed=i), tmp_path / "held" / "val" / f"class{i % 2}" / f"{i}.png")
    argv = ["transfer", "--protocol", "caltech", "--raw-pixels", "4", "--train-per-class", "3", "--folds", "2",
            "--workers", "0", "--no-progress"]
    assert main([*argv, "--data", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--data {tmp_path / 'one'}: one class (cat); the caltech protocol" in err
    assert main([*argv, "--data", str(tmp_path / "held")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"data folder {tmp_path / 'held'} has val but no train: give "
                                     f"{tmp_path / 'held' / 'val'} to describe its images as one unsplit set") in err
    assert main(["features", "--raw-pixels", "4", "--data", str(tmp_path / "held"), "--workers", "0",
                 "--out", str(tmp_path / "f.npz")]) == 2 and not (tmp_path / "f.npz").exists()
    argv[argv.index("--train-per-class") + 1] = "2"
    assert main([*argv, "--data", str(tmp_path / "held" / "val")]) == 0  # split at random


def test_a_class_without_test_images_is_an_error_not_left_out_of_the_mean():
    x, labels = clusters(3, 8)
    splits = ["train", "test"] * 12
    splits[17::2] = ["train"] * 4  # every test image of class c
    features = Features(x, labels, [f"{i}.jpg" for i in range(24)], splits, ["a", "b", "c"], ["a", "b", "c"],
                        {"kind": "test"}, ["c/lost.jpg"])
    with pytest.raises(UserError, match=r"^class c has no test images \(1 images could not be read\): the mean class "
                                        "recall would leave it out$"):
        run_caltech(features, c_grid=(1,), folds=2)
    absent = Features(x[labels < 1], labels[labels < 1], [f"{i}.jpg" for i in range(8)], [""] * 8, ["a", "b", "c"],
                      ["a", "b", "c"], {"kind": "test"})
    with pytest.raises(UserError, match="^classes b, c have no test images: the mean class recall"):
        run_caltech(absent, train_per_class=2, folds=2)


@pytest.mark.parametrize("protocol", ["voc", "voc-action"])
def test_a_class_without_positives_in_a_part_is_an_error_not_left_out_of_the_map(protocol):
    x, single = clusters(3, 20)
    labels = np.where(single[:, None] == np.arange(3), POSITIVE, NEGATIVE).astype(np.int8)
    splits = np.array(["train", "test"] * 30)
    labels[(single == 1) & (splits == "test"), 1] = NEGATIVE  # dog: no positive test image
    labels[(single == 2) & (splits == "train"), 2] = IGNORED  # cow: no positive training image
    settings = {"kind": "test"} | ({"regions": "image"} if protocol == "voc-action" else {})
    features = Features(x, labels, [f"{i}.jpg" for i in range(60)], list(splits), ["cat", "dog", "cow"],
                        ["cat", "dog", "cow"], settings)
    run, unit, part = (run_voc, "class", "test") if protocol == "voc" else (run_voc_action, "action", "val")
    units = "classes" if unit == "class" else "actions"
    with pytest.raises(UserError, match=rf"^{units} dog \(10 train, 0 {part} positives\), cow \(0 train, 10 {part} "
                                        "positives\\) lack positives in a part: the mAP would leave them out$"):
        run(features, c_grid=(1,), folds=2)


def test_folds_beyond_the_smallest_class_are_refused_naming_both_numbers(tmp_path, capsys):
    stored = tmp_path / "f.npz"
    np.savez(stored, **stored_arrays())
    argv = ["transfer", "--protocol", "caltech", "--features", str(stored), "--train-per-class", "2"]
    for folds in (["--folds", "5"], []):  # given, or the default 3
        assert main([*argv, *folds]) == 2
        err = capsys.readouterr().err
        number = folds[1] if folds else "3"
        assert err.count("\n") == 1
        assert f"--folds {number} is more than the 2 training images of class a: give --folds 2 or fewer" in err
    assert main([*argv, "--folds", "2", "--json"]) == 0
    x, single = clusters(2, 12)
    labels = np.where(single[:, None] == np.arange(2), POSITIVE, NEGATIVE).astype(np.int8)
    labels[[12, 14], 1] = IGNORED  # dog's training positives: 4
    voc = features_of(x, labels, ["train", "test"] * 12, ["cat", "dog"])
    with pytest.raises(UserError, match="^--folds 5 is more than the 4 training images of class dog's positives"):
        run_voc(voc, c_grid=(0.1, 1), folds=5)
