"""VOC action classification (Appendix B, Table 12): the reader of the VOC-2012 action layout (persons, boxes,
labels, difficult flags, damaged and inconsistent files), the descriptors of person boxes against the cropped
regions described by hand, stacking with the image's, and the ``voc-action`` protocol's AP against
scikit-learn's on the same scores, through the command line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, save
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve

from verydeep.cli import main
from verydeep.data import IMAGENET, to_input
from verydeep.data.decode import resample, to_tensor
from verydeep.data.transforms import resized_size
from verydeep.data.voc import IGNORED, NEGATIVE, POSITIVE
from verydeep.data.voc_action import open_voc_action
from verydeep.errors import MissingFileError, UserError
from verydeep.eval.descriptors import combine, l2_normalise, pooled_descriptor
from verydeep.eval.feature_passes import Settings
from verydeep.eval.feature_store import Features
from verydeep.eval.transfer import AP_KINDS, average_precision, class_scores, run_voc_action
from verydeep.io.checkpoint import export_safetensors
from verydeep.nn.model import VGG

ACTIONS = ("jumping", "reading", "running")

#: Per image: (width, height), and its persons: (xmin, ymin, xmax, ymax) in VOC's 1-based pixels, the actions
#: done, and whether difficult. Boxes touch every border; one reaches a pixel past it (clipped).
IMAGES = {
    "2010_000001": ((64, 48), [((1, 1, 30, 48), {"jumping"}, False), ((20, 5, 64, 40), {"reading"}, False)]),
    "2010_000002": ((56, 72), [((10, 10, 56, 72), {"running"}, False), ((1, 30, 20, 70), {"jumping"}, True),
                               ((5, 5, 25, 25), set(), False)]),
    "2010_000003": ((72, 56), [((3, 2, 73, 57), {"reading"}, False),
                               ((30, 10, 50, 40), {"running", "jumping"}, False)]),
    "2010_000004": ((48, 48), [((2, 2, 46, 46), {"jumping", "running"}, False)]),
    "2010_000005": ((64, 56), [((8, 8, 40, 50), {"reading"}, False), ((40, 1, 64, 56), {"jumping"}, False)]),
    "2010_000006": ((60, 64), [((1, 1, 60, 64), {"running"}, False), ((10, 20, 30, 60), {"reading"}, False)]),
}
PARTS = {"train": ["2010_000001", "2010_000002", "2010_000003"],
         "val": ["2010_000004", "2010_000005", "2010_000006"]}


def person_xml(box: tuple[float, ...], actions: set[str], difficult: bool) -> str:
    flags = "".join(f"<{a}>{int(a in actions)}</{a}>" for a in ACTIONS) + f"<other>{int(not actions)}</other>"
    corners = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
    return (f"<object><name>person</name><difficult>{int(difficult)}</difficult><bndbox>{corners}</bndbox>"
            f"<actions>{flags}</actions></object>")


def write_voc_action(root: Path, images: dict = IMAGES, parts: dict = PARTS) -> Path:
    """A VOC action root: a JPEG and an annotation per image, the part lists and a labelled list per action."""
    for k, (image_id, ((w, h), persons)) in enumerate(images.items()):
        save(photo(w, h, seed=k), root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        body = "".join(person_xml(*person) for person in persons)
        xml = f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{body}</annotation>"
        save_text(root / "Annotations" / f"{image_id}.xml", xml)
    for part, ids in parts.items():
        pairs = [(i, k) for i in ids for k in range(1, len(images[i][1]) + 1)]
        save_text(root / "ImageSets" / "Action" / f"{part}.txt", "".join(f"{i} {k}\n" for i, k in pairs))
        for action in ACTIONS:
            lines = [f"{i} {k} {1 if action in images[i][1][k - 1][1] else -1}\n" for i, k in pairs]
            save_text(root / "ImageSets" / "Action" / f"{action}_{part}.txt", "".join(lines))
    return root


def save_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_voc_action(tmp_path_factory.mktemp("voc") / "VOC2012")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    recipe = {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
              "preprocess": IMAGENET.to_dict()}
    model = VGG("A", num_classes=4, width=1 / 16, input_size=32, init="he")
    return export_safetensors(model, recipe, tmp_path_factory.mktemp("net") / "a.safetensors")


# ---- the reader ---------------------------------------------------------------------------


def test_reader_samples_labels_boxes_and_difficult_persons(root):
    data = open_voc_action(root)
    assert data.actions == list(ACTIONS) and data.skipped == []
    assert [(s.image_id, s.person) for s in data.samples] == [
        (i, k) for part in ("train", "val") for i in PARTS[part] for k in range(1, len(IMAGES[i][1]) + 1)]
    assert data.splits == ["train"] * 7 + ["test"] * 5
    assert all(s.path == root / "JPEGImages" / f"{s.image_id}.jpg" for s in data.samples)
    for sample, labels in zip(data.samples, data.labels, strict=True):
        box, actions, difficult = IMAGES[sample.image_id][1][sample.person - 1]
        expected = [IGNORED if difficult else POSITIVE if a in actions else NEGATIVE for a in ACTIONS]
        assert labels.tolist() == expected, sample
        w, h = IMAGES[sample.image_id][0]
        xmin, ymin, xmax, ymax = box  # 1-based inclusive: pixels [xmin - 1, xmax), clipped to the image
        assert sample.box.corners == (xmin - 1, ymin - 1, min(xmax, w), min(ymax, h)) and sample.size == (w, h)
        assert sample.other == (not actions) and str(root / "Annotations") in sample.box.where
    assert data.samples[3].box.corners == (0, 29, 20, 70) and data.labels[3].tolist() == [0, 0, 0]  # difficult
    assert data.samples[5].box.corners == (2, 1, 72, 56)  # a pixel past the right and bottom borders: clipped


def test_a_label_of_zero_leaves_the_person_out_of_that_action_only(tmp_path):
    root = write_voc_action(tmp_path / "voc")
    listed = root / "ImageSets" / "Action" / "reading_train.txt"
    listed.write_text(listed.read_text().replace("2010_000001 2 1", "2010_000001 2 0"))
    labels = open_voc_action(root).labels
    assert labels[1].tolist() == [NEGATIVE, IGNORED, NEGATIVE]


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


ACTION = Path("ImageSets/Action")
XML1 = Path("Annotations/2010_000001.xml")


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / XML1).write_text("<annotation><object><name>person"),
     r"2010_000001\.xml: not a readable VOC annotation \(ParseError"),
    (lambda r: replace_in(r / XML1, "<jumping>1</jumping>", "<jumping>yes</jumping>"),
     r"2010_000001\.xml: <jumping> must be 0 or 1; got 'yes'"),
    (lambda r: replace_in(r / XML1, "<difficult>0</difficult>", "<difficult>2</difficult>"),
     r"2010_000001\.xml: <difficult> must be 0 or 1"),
    (lambda r: replace_in(r / ACTION / "jumping_train.txt", "2010_000001 1 1", "2010_000001 1 -1"),
     r"jumping_train\.txt:1: label -1 disagrees with <jumping>1</jumping> in .*2010_000001\.xml"),
    (lambda r: replace_in(r / ACTION / "reading_val.txt", "2010_000005 1 1", "2010_000005 1 2"),
     r"reading_val\.txt:2: expected an image id, a person index from 1 and a label of 1, 0 or -1"),
    (lambda r: replace_in(r / ACTION / "reading_val.txt", "2010_000005 1 1", "2010_000005 1 nan"),
     r"reading_val\.txt:2: 'nan' is not a whole number"),
    (lambda r: replace_in(r / ACTION / "reading_val.txt", "2010_000005 1 1", "2010_000005 1_0 1"),
     r"reading_val\.txt:2: '1_0' is not a whole number"),
    (lambda r: replace_in(r / XML1, "<width>64</width>", "<width>6_4</width>"),
     r"2010_000001\.xml: <size> must give a positive whole width and height"),
    (lambda r: replace_in(r / ACTION / "running_train.txt", "2010_000002 1 1\n", ""),
     r"running_train\.txt: no label for person 1 of 2010_000002 \(listed in .*train\.txt\)"),
    (lambda r: replace_in(r / ACTION / "running_train.txt", "2010_000002 1 1\n", "2010_000002 1 1\n2010_000002 1 1\n"),
     r"running_train\.txt:4: person 1 of 2010_000002 listed twice \(also .*running_train\.txt:3\)"),
    (lambda r: [replace_in(r / ACTION / f"{part}.txt", "2010_000001 2", "2010_000001 3") for part in
                ["train", *(f"{a}_train" for a in ACTIONS)]],
     r"jumping_train\.txt:2: person 3 of 2010_000001, whose annotation .*2010_000001\.xml has 2 objects"),
    (lambda r: replace_in(r / ACTION / "train.txt", "2010_000001 1", "../../x 1"),
     r"train\.txt:1: expected an image id"),
    (lambda r: replace_in(r / XML1, "<xmax>30</xmax>", "<xmax>66</xmax>"),
     r"2010_000001\.xml \(person 1\): box 1 1 66 48 is not inside the 64x48 image .*2010_000001\.jpg"),
    (lambda r: replace_in(r / XML1, "<xmax>30</xmax>", "<xmax>nan</xmax>"),
     r"2010_000001\.xml \(person 1\): box .* not a finite number"),
    (lambda r: replace_in(r / XML1, "<xmax>30</xmax>", ""),
     r"2010_000001\.xml \(person 1\): no complete <bndbox>"),
    (lambda r: replace_in(r / XML1, "<width>64</width>", "<width>65</width>"),
     r"2010_000001\.xml: states a 65x48 image, but .*2010_000001\.jpg is 64x48"),
    (lambda r: (r / ACTION / "reading_val.txt").unlink(),
     r"reading_val\.txt: no such VOC action list \(the action has lists for other parts\)"),
    (lambda r: (r / "JPEGImages" / "2010_000004.jpg").unlink(),
     r"2010_000004\.jpg: no such image \(annotated in .*2010_000004\.xml\)"),
    (lambda r: replace_in(r / XML1, "<name>person</name>", "<name>chair</name>"),
     r"train\.txt:1: object 1 of .*2010_000001\.xml is a 'chair', not a person"),
    (lambda r: replace_in(r / XML1, "<actions>", "<flags>") or replace_in(r / XML1, "</actions>", "</flags>"),
     r"train\.txt:1: person 1 of .*2010_000001\.xml has no <actions> to check the lists' labels against"),
])
def test_damaged_or_inconsistent_files_are_one_line_naming_them(tmp_path, damage, message):
    root = write_voc_action(tmp_path / "voc")
    damage(root)
    with pytest.raises(UserError, match=message) as error:
        open_voc_action(root)
    assert "\n" not in str(error.value)


def test_an_image_with_persons_in_both_parts_is_refused_naming_it_and_the_lists(tmp_path):
    parts = {"train": PARTS["train"], "val": ["2010_000003", *PARTS["val"]]}
    root = write_voc_action(tmp_path / "voc", IMAGES, parts)
    with pytest.raises(UserError, match=r"image 2010_000003 has persons in both train \(.*jumping_train\.txt:6\) "
                                        r"and val \(.*jumping_val\.txt:1\): a test person must not train"):
        open_voc_action(root)


def test_an_unreadable_image_is_skipped_and_named_and_a_non_action_root_refused(tmp_path, caplog):
    root = write_voc_action(tmp_path / "voc")
    (root / "JPEGImages" / "2010_000002.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="verydeep.data"):
        data = open_voc_action(root)
    assert data.skipped == [str(root / "JPEGImages" / "2010_000002.jpg")] and len(data.samples) == 9
    assert "2010_000002.jpg" in caplog.text and all(s.image_id != "2010_000002" for s in data.samples)
    with pytest.raises(MissingFileError, match="not a VOC action root"):
        open_voc_action(tmp_path)


# ---- descriptors of persons ---------------------------------------------------------------


def by_hand(model: VGG, image: Image.Image, scales: tuple[int, ...]) -> np.ndarray:
    """An image's descriptor computed step by step: rescaled to each Q (smallest side), normalised, FC7
    pooled and mirrored, stacked over Q, L2-normalised."""
    per_q = []
    with torch.no_grad():
        for q in scales:
            pixels = resample(to_tensor(image), resized_size(image.size, q))
            x = to_input(pixels[None], IMAGENET)
            per_q.append(pooled_descriptor(model.dense(), x).numpy())
    return l2_normalise(np.concatenate(per_q, axis=1))


def test_box_descriptors_equal_the_cropped_regions_described_by_hand_and_are_stacked(root, net):
    from verydeep.eval.box_features import extract_action_features
    from verydeep.io.weights import load_published

    settings = Settings.create((32, 48), "stack", "cpu", "fp32", 2, 0, False)
    alone = extract_action_features([net], root, "image", settings=settings)
    stacked = extract_action_features([net], root, "image+box", settings=settings)
    data = open_voc_action(root)
    model = load_published(net).model.eval()
    dims = alone.features.shape[1]
    assert stacked.features.shape == (12, 2 * dims) and alone.multilabel and alone.classes == list(ACTIONS)
    assert alone.labels.tolist() == data.labels.tolist() and alone.splits == data.splits
    assert alone.settings["regions"] == "image" and stacked.settings["persons"] == [s.person for s in data.samples]
    for row, sample in enumerate(data.samples):
        with Image.open(sample.path) as file:
            image = file.convert("RGB")
        whole = by_hand(model, image, (32, 48))
        region = by_hand(model, image.crop(tuple(int(v) for v in sample.box.corners)), (32, 48))
        np.testing.assert_allclose(alone.features[row], whole[0], atol=1e-5)
        np.testing.assert_allclose(stacked.features[row], combine([whole, region])[0], atol=1e-5)
        # stacking: each half is one unit-norm descriptor divided by sqrt(2)
        np.testing.assert_allclose(stacked.features[row, :dims] * math.sqrt(2), alone.features[row], atol=1e-5)
        np.testing.assert_allclose(stacked.features[row, dims:] * math.sqrt(2), region[0], atol=1e-5)
    assert not np.allclose(stacked.features[0, dims:], stacked.features[1, dims:])  # two persons of one image


def test_an_interrupted_extraction_of_persons_continues_and_other_regions_refuse_its_partial(root, net, tmp_path,
                                                                                              monkeypatch):
    from verydeep.eval import feature_passes as passes
    from verydeep.eval.box_features import extract_action_features

    describe_batch, calls, stop = passes.describe_batch, [], [None]

    def counted(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == stop[0]:
            raise KeyboardInterrupt
        describe_batch(*args, **kwargs)

    monkeypatch.setattr(passes, "describe_batch", counted)
    settings = Settings.create((32, 48), "stack", "cpu", "fp32", 2, 0, False, checkpoint_every=2)
    whole = extract_action_features([net], root, "image+box", settings=settings)
    batches, out = len(calls), tmp_path / "persons.npz"
    calls.clear()
    stop[0] = 6  # Ctrl-C in the sixth batch: five done, saved with it
    with pytest.raises(KeyboardInterrupt):
        extract_action_features([net], root, "image+box", out, settings)
    assert Path(f"{out}.partial").is_file() and not out.exists()
    stop[0] = None
    with pytest.raises(UserError, match="partial extraction with other nets, images"):
        extract_action_features([net], root, "image", out, settings)
    calls.clear()
    resumed = extract_action_features([net], root, "image+box", out, settings)
    assert len(calls) == batches - 5 and batches > 12  # images and boxes of several sizes, two passes
    np.testing.assert_allclose(Features.load(out).features, whole.features, atol=1e-6)
    assert resumed.paths == whole.paths and not Path(f"{out}.partial").exists()


def test_a_box_that_would_rescale_beyond_the_test_size_bound_is_refused(tmp_path, net):
    from verydeep.eval.box_features import extract_action_features

    images = {"a": ((400, 40), [((1, 1, 400, 4), {"jumping"}, False)]), "b": ((40, 40), [((1, 1, 9, 9), set(), False)])}
    root = write_voc_action(tmp_path / "voc", images, {"train": ["a"], "val": ["b"]})
    with pytest.raises(UserError, match=r"a\.xml \(person 1\): the 400x4 box rescaled to Q=512 is 51200x512"):
        extract_action_features([net], root, "image+box", settings=Settings.create((32, 512), device="cpu"))


# ---- the voc-action protocol --------------------------------------------------------------


def clustered_persons(seed: int = 0) -> Features:
    """60 persons, each doing one of three actions, unit-norm points scattered around one centre per action
    (overlapping: APs well below 1); a few difficult (0) for one action; half to train, half scored."""
    rng = np.random.default_rng(seed)
    action = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(3, 16))[action] + 2.0 * rng.normal(size=(60, 16))
    labels = np.where(action[:, None] == np.arange(3), POSITIVE, NEGATIVE).astype(np.int8)
    labels[::9, 1] = IGNORED
    settings = {"kind": "test", "regions": "image+box"}
    return Features(l2_normalise(x).astype(np.float32), labels, [f"{i}.jpg" for i in range(60)],
                    ["train", "test"] * 30, list(ACTIONS), list(ACTIONS), settings)


def test_ap_per_action_equals_scikit_learns_on_the_same_scores_and_c_is_chosen_on_training_persons():
    features = clustered_persons()
    result, raised = run_voc_action(features, c_grid=(0.1, 1, 10), folds=3), []
    assert result.protocol == "voc-action" and result.regions == "image+box" and result.scored_part == "val"
    for c, name in enumerate(ACTIONS):
        s = class_scores(features, c, (0.1, 1, 10), 3)
        ap = result.per_class_ap[name]
        assert ap.C == s.C and ap.test_positives == int(s.positives.sum()) and len(s.scores) <= 30
        precision, recall, _ = precision_recall_curve(s.positives, s.scores)
        precision, recall = precision[::-1], recall[::-1]  # from recall 0 (precision 1) up, a threshold a step
        assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision_score(s.positives, s.scores))
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # the highest precision at any higher recall
        assert ap.ap["area"] == pytest.approx(np.sum(np.diff(recall) * envelope[1:]))
        raised.append(ap.ap["area"] - average_precision_score(s.positives, s.scores))
        assert ap.ap["11point"] == pytest.approx(average_precision(s.scores, s.positives, "11point"))
    assert min(raised) >= -1e-12 and max(raised) > 0.005  # interpolated precision: never lower, here higher
    assert result.map["area"] == pytest.approx(np.mean([r.ap["area"] for r in result.per_class_ap.values()]))
    reading = result.per_class_ap["reading"]
    assert reading.train_positives == reading.test_positives == 10 - 1  # one of each part's is difficult (0)
    shuffled = features.features.copy()
    shuffled[1::2] = np.random.default_rng(1).permutation(shuffled[1::2])  # the scored persons only
    moved = Features(shuffled, features.labels, features.paths, features.splits, features.classes,
                     features.class_names, features.settings)
    assert [r.C for r in run_voc_action(moved, (0.1, 1, 10), 3).per_class_ap.values()] == [
        r.C for r in result.per_class_ap.values()]


def test_voc_action_needs_persons_features_and_voc_refuses_them():
    features = clustered_persons()
    plain = Features(features.features, features.labels, features.paths, features.splits, features.classes,
                     features.class_names, {"kind": "test"})
    with pytest.raises(UserError, match="not of VOC action persons; make them with verydeep features --regions"):
        run_voc_action(plain)
    from verydeep.eval.transfer import run_caltech, run_voc

    with pytest.raises(UserError, match="use --protocol voc-action"):
        run_voc(features)
    with pytest.raises(UserError, match="these features are of VOC action persons; use --protocol voc-action"):
        run_caltech(features)  # persons are of several labels too: the protocol named is theirs, not voc's


def test_voc_action_end_to_end_through_the_command_line(root, net, tmp_path, capsys):
    out = {}
    for regions in ("image", "image+box"):
        out[regions] = tmp_path / f"{regions}.npz"
        assert main(["features", "--regions", regions, "--data", str(root), "--weights", str(net), "--scales", "32",
                     "--out", str(out[regions]), "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
        assert capsys.readouterr().out.strip().endswith("12 persons x " f"{256 * (1 + (regions != 'image'))} "
                                                        "features (A FC7, Q=32 stack), 0 skipped")
    argv = ["transfer", "--protocol", "voc-action", "--features", str(out["image+box"]), "--c-grid", "1", "--json"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["protocol"] == "voc-action" and result["regions"] == "image+box" and result["scored_part"] == "val"
    assert set(result["per_class_ap"]) == set(ACTIONS) and set(result["map"]) == set(AP_KINDS)
    ours = f"{100 * result['map']['11point']:.1f} / {100 * result['map']['area']:.1f}"
    assert "Table 12" in printed and "| image |  | 79.2 |" in printed
    assert f"| image and person box | {ours} | 84.0 |" in printed and "evaluation server" in printed
    for protocol in ("voc", "caltech"):
        assert main(["transfer", "--protocol", protocol, "--features", str(out["image"])]) == 2
        assert (f"--features {out['image']}: these features are of VOC action persons; use --protocol voc-action"
                in capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    ("transfer --protocol voc-action --data {root} --weights {net}", "give --regions image or image+box"),
    ("transfer --protocol voc --data {root} --weights {net} --regions image", "for --protocol voc-action, not voc"),
    ("transfer --protocol voc-action --features {root}/f.npz --regions image", "--regions would make others"),
    ("features --regions image --raw-pixels 8 --data {root} --out {root}/../f.npz", "give --weights, not --raw-pixels"),
    ("features --regions image --weights {net} --data {net}/.. --out {root}/f.npz --scales 32",
     "not a VOC action root"),
    ("features --regions boxes --weights {net} --data {root} --out {root}/f.npz", "argument --regions: invalid"),
])
def test_mistakes_are_one_line(root, net, capsys, argv, message):
    args = [a.format(root=root, net=net) for a in argv.split()]
    try:
        status = main(args)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and message in err, err
