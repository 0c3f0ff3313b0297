"""Prediction: dense multi-scale posteriors, the net's input convention, test scales of a recipe
without a training scale, class saliency maps, a real photo, the command line."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, photo, save
from PIL import Image

from verydeep.cli import main
from verydeep.data import IMAGENET, RescaleTransform
from verydeep.errors import UserError
from verydeep.eval.evaluate import evaluate
from verydeep.eval.nets import load_nets
from verydeep.eval.predict import image_posteriors, predict, saliency_map
from verydeep.io.checkpoint import model_from_recipe, save_checkpoint

CLASSES = ["class0", "class1", "class2", "class3"]
RECIPE = {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
          "scale": [36, 36], "preprocess": IMAGENET.to_dict(), "classes": CLASSES, "class_names": CLASSES}
#: A Caffe-style convention: BGR on 0..255 less the mean.
CAFFE = replace(IMAGENET, std=(1.0, 1.0, 1.0), channels="BGR", value_scale=255.0)
SAMPLES = SHARED / "imagenet-samples"


def write_net(path: Path, seed: int = 0, **changes) -> Path:
    """A checkpoint of a width-1/16 net A on 32-pixel crops, its recipe changed by ``changes``."""
    recipe = {**RECIPE, **changes}
    torch.manual_seed(seed)
    save_checkpoint({"model": model_from_recipe(recipe).state_dict(), "recipe": recipe}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_net(tmp_path_factory.mktemp("ckpt") / "net.pt")


@pytest.fixture(scope="module")
def caffe_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A net whose recipe says BGR on 0..255 and gives no training scale."""
    return write_net(tmp_path_factory.mktemp("caffe") / "caffe.pt", seed=3, preprocess=CAFFE.to_dict(), scale=None)


def test_predict_matches_dense_multi_scale_evaluation(data, checkpoint):
    evaluated = evaluate([checkpoint], data, protocols=("dense",), workers=0, progress=False, batch_size=4,
                         keep_posteriors=True).posteriors
    image = evaluated.paths[5]
    expected = np.mean([evaluated.arrays[f"net0_dense_Q{q}"][5] for q in (32, 36, 41)], axis=0)
    result = predict(checkpoint, [image], topk=5, device="cpu")
    assert result.scales == [32, 36, 41] and result.preprocess == IMAGENET.to_dict()
    top = result.predictions[0].top
    assert [t.rank for t in top] == [1, 2, 3, 4]  # top-5 of 4 classes lists all 4
    assert [t.index for t in top] == list(np.argsort(-expected))
    np.testing.assert_allclose([t.probability for t in top], np.sort(expected)[::-1], rtol=1e-5)
    assert {t.name for t in top} == set(CLASSES)


def test_predict_posteriors_are_evaluations_for_images_of_several_sizes(checkpoint, tmp_path, capsys):
    """Images of several sizes, those of one size at Q batched together as eval batches them: each image's
    posterior is evaluate's, dense and multi-crop at the given scales; an unreadable image is one line naming it."""
    sizes = [[(48, 40), (48, 40)], [(40, 56)], [(64, 48), (48, 40)], [(33, 90)]]
    for label, shapes in enumerate(sizes):
        for i, (w, h) in enumerate(shapes):
            save(photo(w, h, seed=10 * label + i), tmp_path / "val" / f"class{label}" / f"{i}.png")
    evaluated = evaluate([checkpoint], tmp_path, protocols=("dense+multicrop",), scales=[33, 47], workers=0,
                         progress=False, batch_size=3, keep_posteriors=True).posteriors
    expected = np.mean([evaluated.arrays[f"net0_{kind}_Q{q}"] for kind in ("dense", "multicrop") for q in (33, 47)],
                       axis=0)
    net = load_nets([checkpoint], None, None, torch.device("cpu"))[0]
    got = image_posteriors(net, evaluated.paths, True, torch.device("cpu"), None, "dense+multicrop", [33, 47])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)
    result = predict(checkpoint, evaluated.paths, topk=4, scales=[33, 47], device="cpu", protocol="dense+multicrop")
    for prediction, row in zip(result.predictions, expected, strict=True):
        assert [t.index for t in prediction.top] == list(np.argsort(-row))
        np.testing.assert_allclose([t.probability for t in prediction.top], np.sort(row)[::-1], rtol=1e-5)
    (tmp_path / "text.jpg").write_text("not an image")
    assert main(["predict", "--weights", str(checkpoint), evaluated.paths[0], str(tmp_path / "text.jpg")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"verydeep predict: error: {tmp_path / 'text.jpg'}: unreadable")


@pytest.mark.parametrize("protocol", ["multicrop", "dense+multicrop"])
def test_predict_multicrop_and_the_combination_match_evaluation(data, checkpoint, protocol, capsys):
    evaluated = evaluate([checkpoint], data, protocols=("dense", "multicrop"), workers=0, progress=False,
                         batch_size=4, keep_posteriors=True).posteriors
    image = evaluated.paths[3]
    kinds = protocol.split("+")
    expected = np.mean([np.mean([evaluated.arrays[f"net0_{kind}_Q{q}"][3] for q in (32, 36, 41)], axis=0)
                        for kind in kinds], axis=0)
    assert main(["predict", "--weights", str(checkpoint), image, "--protocol", protocol, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["protocol"] == protocol
    top = result["predictions"][0]["top"]
    assert [t["index"] for t in top] == list(np.argsort(-expected))
    np.testing.assert_allclose([t["probability"] for t in top], np.sort(expected)[::-1], rtol=1e-5)
    dense = predict(checkpoint, [image], device="cpu").predictions[0].top
    by_index = {t["index"]: t["probability"] for t in top}  # the flag counts (a random net: nearly uniform)
    assert max(abs(t.probability - by_index[t.index]) for t in dense) > 5e-7


def test_a_torchvision_state_dict_predicts_like_our_checkpoint_of_the_same_weights(data, checkpoint, tmp_path):
    state = load_nets([checkpoint], None, None, torch.device("cpu"))[0].model.state_dict()
    torch.save(state, tmp_path / "vgg.pth")  # torchvision's layout: the tensors alone
    image = data / "val" / "class1" / "2.png"
    published = predict(tmp_path / "vgg.pth", [image], topk=4, device="cpu")
    ours = predict(checkpoint, [image], topk=4, scales=[37, 55, 73], device="cpu")
    assert published.scales == [37, 55, 73] and published.preprocess == IMAGENET.to_dict()
    assert [(t.index, t.class_) for t in published.predictions[0].top] == [
        (t.index, str(t.index)) for t in ours.predictions[0].top]
    np.testing.assert_allclose([t.probability for t in published.predictions[0].top],
                               [t.probability for t in ours.predictions[0].top], rtol=1e-6)


def manual_posterior(path: Path, image_path: Path, scales: list[int]) -> torch.Tensor:
    """Dense multi-scale posteriors computed by hand for a net that takes BGR on 0..255 less the mean."""
    model = load_nets([path], None, None, torch.device("cpu"))[0].model
    mean = torch.tensor(CAFFE.mean).view(3, 1, 1)
    posteriors = []
    for q in scales:
        rgb = RescaleTransform(q)(image_path).float() / 255
        x = (255 * (rgb - mean)).flip(0).unsqueeze(0)  # BGR
        with torch.no_grad():
            for view in (x, x.flip(-1)):
                posteriors.append(model.dense()(view).mean((2, 3)).softmax(1)[0])
    return torch.stack(posteriors).mean(0)


def test_the_nets_convention_is_applied_and_paper_scales_stand_in_for_a_missing_training_scale(data, caffe_net):
    image = data / "val" / "class2" / "1.png"
    result = predict(caffe_net, [image], topk=4, device="cpu")
    assert result.scales == [37, 55, 73]  # Q = {256, 384, 512} scaled by 32/224
    assert result.preprocess["channels"] == "BGR" and result.preprocess["value_scale"] == 255
    got = torch.zeros(4)
    for entry in result.predictions[0].top:
        got[entry.index] = entry.probability
    expected = manual_posterior(caffe_net, image, [37, 55, 73])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    as_rgb = predict(write_net(caffe_net.with_name("rgb.pt"), seed=3, preprocess=replace(CAFFE, channels="RGB")
                               .to_dict(), scale=None), [image], topk=4, device="cpu")
    assert [e.probability for e in as_rgb.predictions[0].top] != [e.probability for e in result.predictions[0].top]


def test_saliency_is_the_input_gradient_of_the_unnormalised_score(caffe_net, tmp_path):
    net = load_nets([caffe_net], None, None, torch.device("cpu"))[0]
    image = RescaleTransform(40)(save(photo(56, 40), tmp_path / "photo.png"))
    pixels = image.float().requires_grad_()
    x = (255 * (pixels / 255 - torch.tensor(CAFFE.mean).view(3, 1, 1))).flip(0).unsqueeze(0)
    net.dense(x)[0, 2].mean().backward()  # the class score before the softmax, averaged over the score map
    expected = pixels.grad.abs().amax(dim=0)
    got = saliency_map(net, image, 2, torch.device("cpu"))
    assert got.shape == (40, 56) and got.max() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # a caller's no_grad is lifted; its inference_mode cannot be, and says so
        torch.testing.assert_close(saliency_map(net, image, 2, torch.device("cpu")), got, rtol=0, atol=0)
    with torch.inference_mode(), pytest.raises(UserError, match="^a saliency map needs gradients"):
        saliency_map(net, image, 2, torch.device("cpu"))


def test_saliency_png_shows_the_image_beside_its_map(caffe_net, tmp_path, capsys):
    image = save(photo(64, 48, seed=1), tmp_path / "photo.png")
    out = tmp_path / "saliency.png"
    assert main(["predict", "--weights", str(caffe_net), str(image), "--saliency", str(out), "--topk", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"  saliency map: {out}"
    with Image.open(out) as png:
        pixels = np.asarray(png.convert("L"), dtype=np.float32)
    height, width = pixels.shape
    assert width > height  # the image and the map side by side
    saliency_half = pixels[height // 8 : -height // 8, width // 2 + width // 8 : -width // 8]
    assert saliency_half.std() > 5, "the saliency map is uniform"


def test_several_images_get_one_numbered_saliency_png_each(checkpoint, tmp_path):
    images = [save(photo(48, 40, seed=i), tmp_path / f"{i}.png") for i in range(2)]
    result = predict(checkpoint, images, topk=1, device="cpu", saliency=tmp_path / "map.png")
    assert [p.saliency for p in result.predictions] == [str(tmp_path / "map-1.png"), str(tmp_path / "map-2.png")]
    assert (tmp_path / "map-1.png").is_file() and (tmp_path / "map-2.png").is_file()
    assert not (tmp_path / "map.png").exists()
    with pytest.raises(UserError, match="--saliency .*map.jpg: give a .png file name"):
        predict(checkpoint, images, device="cpu", saliency=tmp_path / "map.jpg")


@pytest.mark.real_data("imagenet-samples")
def test_a_real_photo_prints_five_classes_with_probabilities(tmp_path, capsys):
    names = [f"thing {i}" for i in range(10)]
    net = write_net(tmp_path / "net.pt", num_classes=10, classes=[f"n{i}" for i in range(10)], class_names=names)
    image = sorted(SAMPLES.glob("*.JPEG"))[0]
    assert main(["predict", "--weights", str(net), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image)
    entries = [re.fullmatch(r"  (\d)\. (\d\.\d{3})  thing \d \(n\d\)", line) for line in lines[1:]]
    assert len(entries) == 5 and all(entries), lines
    assert [int(m.group(1)) for m in entries] == [1, 2, 3, 4, 5]
    probabilities = [float(m.group(2)) for m in entries]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1


def test_cli_json_and_missing_image(data, checkpoint, capsys):
    image = str(data / "val" / "class0" / "0.png")
    assert main(["predict", "--checkpoint", str(checkpoint), image, "--topk", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["predictions"][0]["top"]) == 2 and result["weights"] == str(checkpoint)
    assert main(["predict", "--weights", str(checkpoint), image, "nowhere.jpg"]) == 2
    assert capsys.readouterr().err.strip() == "verydeep predict: error: nowhere.jpg: no such image"
    assert main(["predict", image]) == 2
    assert capsys.readouterr().err.strip() == "verydeep predict: error: give --weights SOURCE (or --checkpoint)"


def test_no_saliency_map_is_drawn_over_an_input_image(checkpoint, tmp_path, capsys):
    images = [save(photo(48, 40, seed=i), tmp_path / f"map-{i}.png") for i in (1, 2)]
    before = [p.read_bytes() for p in images]
    assert main(["predict", "--weights", str(checkpoint), str(images[0]), "--saliency", str(images[0])]) == 2
    assert "is also an input" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--saliency .*map-1.png: would overwrite the input image"):
        predict(checkpoint, images, device="cpu", saliency=tmp_path / "map.png")  # writes map-1.png, map-2.png
    assert [p.read_bytes() for p in images] == before


def test_a_long_strip_rescaled_beyond_the_test_pixel_bound_is_one_line_not_an_allocation(checkpoint, tmp_path,
                                                                                          capsys):
    strip = tmp_path / "strip.png"
    Image.fromarray(np.zeros((2000, 20, 3), dtype=np.uint8)).save(strip)  # at Q = 2048: 2048 x 204800 pixels
    with pytest.raises(ValueError, match=r"2048 x 204800 pixels, above the 4\.2 M"):
        RescaleTransform(2048).plan((20, 2000), reducible=False)
    assert main(["predict", "--weights", str(checkpoint), str(strip), "--scales", "2048", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{strip}: rescaled to Q = 2048 it would be 2048 x 204800 pixels, above the 4.2 M pixels a "
                        "test image may have; give a smaller test scale, or leave the image out")  # readable
    assert "\n" not in err
    assert main(["predict", "--weights", str(checkpoint), str(strip), "--scales", "40", "--device", "cpu"]) == 0
