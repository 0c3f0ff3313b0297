"""Published weights in (verydeep.io.weights): torchvision state dicts, the authors' Caffe files and Keras' HDF5
files, written here at reduced width with the real libraries, each read back to the outputs that its own
weights compute in its own input convention; our checkpoints; damaged and hostile files; names; conversion."""

from __future__ import annotations

import argparse
import builtins
import hashlib
import math
import os
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, photo
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from verydeep.cli import main
from verydeep.data import IMAGENET, Preprocess, to_input
from verydeep.errors import MissingFileError, UserError
from verydeep.io import weights
from verydeep.io.catalogue import NAMES, known_weights, named_net
from verydeep.io.checkpoint import export_safetensors, save_checkpoint
from verydeep.io.download import download, refuse_unused_weights_dir
from verydeep.io.formats.caffe import caffe_net_class
from verydeep.io.weights import CAFFE, Published, add_cli, convert, imagenet_classes, load_published, sniff
from verydeep.nn.model import VGG
from verydeep.options import OneLineParser

#: The authors' mean pixel, (B, G, R) on 0..255.
MEAN_BGR = (103.939, 116.779, 123.68)
#: Convolutions per block of D and E (Table 1), and the paper's channels per block.
BLOCKS = {"D": (2, 2, 3, 3, 3), "E": (2, 2, 4, 4, 4)}
CHANNELS = (64, 128, 256, 512, 512)
#: Caffe's V1 LayerType numbers (caffe.proto): CONVOLUTION, INNER_PRODUCT, POOLING, RELU, SOFTMAX.
V1_TYPES = {"Convolution": 4, "InnerProduct": 14, "Pooling": 17, "ReLU": 18, "Softmax": 20}

Pair = tuple[np.ndarray, np.ndarray]


def images(size: int) -> torch.Tensor:
    """Two RGB uint8 photos (2, 3, size, size)."""
    return torch.stack([torch.from_numpy(np.array(photo(size, size, seed))).permute(2, 0, 1) for seed in (1, 2)])


def outputs(published: Published, x: torch.Tensor) -> torch.Tensor:
    """The loaded net's outputs on uint8 images ``x``, put through ``to_input`` with the recipe's convention."""
    with torch.no_grad():
        return published.model(to_input(x, Preprocess.from_dict(published.recipe["preprocess"])))


Weights = tuple[list[list[Pair]], list[Pair]]  # per block its convolutions, then FC6-FC8


def raw_weights(config: str, width: float, crop: int, classes: int, seed: int = 0) -> Weights:
    """Random weights of a VGG in PyTorch's shapes (conv (out, in, 3, 3), FC (out, in)) per block and FC layer,
    He-scaled, conv1_1 shrunk for inputs on 0..255 so that the outputs are of order 1."""
    rng = np.random.default_rng(seed)

    def normal(std: float, *shape: int) -> np.ndarray:
        return rng.normal(0, std, shape).astype(np.float32)

    blocks, cin = [], 3
    for depth, channels in zip(BLOCKS[config], CHANNELS, strict=True):
        cout, block = round(channels * width), []
        for _ in range(depth):
            block.append((normal(math.sqrt(2 / (9 * cin)), cout, cin, 3, 3), normal(0.1, cout)))
            cin = cout
        blocks.append(block)
    blocks[0][0] = (blocks[0][0][0] / 128, blocks[0][0][1])
    fcs, fin = [], cin * (crop // 32) ** 2
    for fout in (round(4096 * width), round(4096 * width), classes):
        fcs.append((normal(math.sqrt(2 / fin), fout, fin), normal(0.1, fout)))
        fin = fout
    return blocks, fcs


def classifier(x: torch.Tensor, fcs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for i, (w, b) in enumerate(fcs):
        x = x @ w + b
        x = x.relu() if i < len(fcs) - 1 else x
    return x


def caffe_reference(x: torch.Tensor, blocks: list[list[Pair]], fcs: list[Pair]) -> torch.Tensor:
    """Caffe's forward pass on the raw arrays: BGR on 0..255 minus the mean pixel, NCHW, FC6 on the (C, H, W) map."""
    x = x.flip(1).float() - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
    for block in blocks:
        for w, b in block:
            x = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), padding=1).relu()
        x = F.max_pool2d(x, 2)
    return classifier(x.flatten(1), [(torch.from_numpy(w).T, torch.from_numpy(b)) for w, b in fcs])


def keras_reference(x: torch.Tensor, blocks: list[list[Pair]], fcs: list[Pair] | None) -> torch.Tensor:
    """Keras' forward pass on its arrays: NHWC, BGR on 0..255 minus the mean, HWIO kernels (transposed to call
    conv2d), Flatten of the (H, W, C) map times (in, out) kernels; the NHWC trunk output when ``fcs`` is None."""
    x = x.permute(0, 2, 3, 1).flip(-1).float() - torch.tensor(MEAN_BGR)
    for block in blocks:
        for k, b in block:
            x = F.conv2d(x.permute(0, 3, 1, 2), torch.from_numpy(k).permute(3, 2, 0, 1), torch.from_numpy(b), padding=1)
            x = x.relu().permute(0, 2, 3, 1)
        x = F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    if fcs is None:
        return x
    return classifier(x.reshape(len(x), -1), [(torch.from_numpy(k), torch.from_numpy(b)) for k, b in fcs])


def write_caffe(path: Path, blocks: list[list[Pair]], fcs: list[Pair], v1: bool = True) -> Path:
    """A Caffe model as the authors' files are: V1 ``layers`` with 4-D blobs (FC weights (1, 1, out, in),
    biases (1, 1, 1, out)), or the current ``layer`` with ``shape``; parameter-free layers in between."""
    net = caffe_net_class()(name="VGG_ILSVRC_16_layers")

    def add(name: str, kind: str, arrays: tuple[np.ndarray, ...] = ()) -> None:
        layer = (net.layers if v1 else net.layer).add(name=name)
        layer.type = V1_TYPES[kind] if v1 else kind
        for a in arrays:
            blob = layer.blobs.add()
            if v1:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - a.ndim) + a.shape
            else:
                blob.shape.dim.extend(a.shape)
            blob.data.extend(a.ravel().tolist())

    for b, block in enumerate(blocks, 1):
        for i, pair in enumerate(block, 1):
            add(f"conv{b}_{i}", "Convolution", pair)
            add(f"relu{b}_{i}", "ReLU")
        add(f"pool{b}", "Pooling")
    for i, pair in enumerate(fcs, 6):
        add(f"fc{i}", "InnerProduct", pair)
    add("prob", "Softmax")
    path.write_bytes(net.SerializeToString())
    return path


def keras_arrays(blocks: list[list[Pair]], fcs: list[Pair]) -> Weights:
    """The same random numbers laid out as Keras keeps its weights: HWIO kernels, (in, out) FC kernels."""
    convs = [[(w.transpose(2, 3, 1, 0).copy(), b) for w, b in block] for block in blocks]
    return convs, [(w.T.copy(), b) for w, b in fcs]


def write_keras(path: Path, blocks: list[list[Pair]], fcs: list[Pair] | None) -> Path:
    """A Keras ``save_weights`` HDF5 file as vgg16_weights_tf_dim_ordering_tf_kernels(_notop).h5 is laid out:
    the root's ``layer_names``, per layer a group whose ``weight_names`` name its datasets ``<layer>_W_1:0``
    and ``<layer>_b_1:0``; layers without weights have empty ``weight_names``."""
    layers: list[tuple[str, tuple[np.ndarray, ...]]] = [("input_1", ())]
    for b, block in enumerate(blocks, 1):
        layers += [(f"block{b}_conv{i}", pair) for i, pair in enumerate(block, 1)] + [(f"block{b}_pool", ())]
    if fcs is not None:
        layers += [("flatten", ())] + list(zip(("fc1", "fc2", "predictions"), fcs, strict=True))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name, _ in layers])
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"1.1.0"
        for name, arrays in layers:
            group = f.create_group(name)
            names = [f"{name}_{kind}_1:0" for kind in ("W", "b")][: len(arrays)]
            group.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
            for n, a in zip(names, arrays, strict=True):
                group.create_dataset(n, data=a)
    return path


def torchvision_file(path: Path, config: str = "D", batch_norm: bool = False, crop: int = 32,
                     classes: int = 10) -> tuple[Path, VGG]:
    """A torchvision-layout state dict of a random width-1/16 VGG (BN statistics randomised too)."""
    torch.manual_seed(0)
    model = VGG(config, num_classes=classes, batch_norm=batch_norm, width=1 / 16, input_size=crop, init="he")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2)
    torch.save(model.state_dict(), path)
    return path, model.eval()


# ---- the formats, each against its own reference --------------------------------------------------


@pytest.mark.parametrize(("config", "batch_norm", "crop"), [
    ("A", False, 32), ("D", False, 64), ("E", True, 32), ("B", True, 64), ("A-LRN", False, 32), ("C", False, 32)])
def test_torchvision_state_dict_recognised_by_its_keys(tmp_path, config, batch_norm, crop):
    path, source = torchvision_file(tmp_path / "weights.bin", config, batch_norm, crop)
    published = load_published(path)
    recipe = published.recipe
    assert (published.format, published.source) == ("torchvision", str(path))
    assert {k: recipe[k] for k in ("config", "batch_norm", "width", "crop", "num_classes", "outputs")} == {
        "config": config, "batch_norm": batch_norm, "width": 1 / 16, "crop": crop, "num_classes": 10, "outputs": 10}
    assert recipe["preprocess"] == IMAGENET.to_dict() and recipe["scale"] is None
    assert recipe["source"] == {"format": "torchvision", "path": str(path)} and not published.model.training
    x = images(crop)
    with torch.no_grad():
        torch.testing.assert_close(outputs(published, x), source(to_input(x, IMAGENET)))


@pytest.mark.parametrize("width", [0.1, 0.3, 0.7, 1 / 64, 3 / 8, 1 / 3, 1e-4])  # 1e-4: one channel a layer
@pytest.mark.parametrize("config", ["A", "E"])
def test_a_state_dict_at_any_width_is_read_at_a_width_that_gives_every_layer_its_channels(tmp_path, config, width):
    source = VGG(config, num_classes=3, width=width, input_size=32)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    published = load_published(path)
    assert published.recipe["width"] == pytest.approx(width, abs=1e-3)  # 1/3 reads as 1365/4096: FC6's size
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(outputs(published, x), source.eval()(to_input(x, IMAGENET)))


def test_channels_that_no_width_gives_are_refused_naming_the_file(tmp_path):
    weights = VGG("A", num_classes=3, width=1 / 8, input_size=32).state_dict()
    weights["classifier.0.weight"] = torch.zeros(100, weights["classifier.0.weight"].shape[1])  # 512 at 1/8
    weights["classifier.0.bias"] = torch.zeros(100)
    torch.save(weights, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"odd.pth: its layers' channels \(8, 16, .*, 100\) fit no single width"):
        load_published(tmp_path / "odd.pth")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_a_torchvision_state_dict_in_safetensors_without_our_recipe_is_read_as_torchvision(tmp_path, metadata):
    pth, source = torchvision_file(tmp_path / "vgg.pth", "A", batch_norm=True)
    path = tmp_path / "vgg11_bn.safetensors"
    save_file(torch.load(pth, weights_only=True), path, metadata=metadata)
    before = path.read_bytes()
    published = load_published(path)
    assert (published.format, published.source) == ("torchvision", str(path))
    assert published.recipe == load_published(pth).recipe | {"source": {"format": "torchvision", "path": str(path)}}
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(outputs(published, x), source(to_input(x, IMAGENET)))
    assert path.read_bytes() == before
    save_file({"encoder.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="other.safetensors: its tensors are no VGG of Table 1"):
        load_published(tmp_path / "other.safetensors")


def test_a_safetensors_file_under_another_name_is_read_by_its_contents(tmp_path):
    pth, _ = torchvision_file(tmp_path / "vgg.pth", "A")
    save_file(torch.load(pth, weights_only=True), tmp_path / "theirs.st")
    assert load_published(tmp_path / "theirs.st").recipe == load_published(pth).recipe | {
        "source": {"format": "torchvision", "path": str(tmp_path / "theirs.st")}}
    ours = convert(pth, tmp_path / "ours.safetensors")
    (tmp_path / "ours.weights").write_bytes(ours.read_bytes())
    again = load_published(tmp_path / "ours.weights")
    assert again.format == "verydeep" and again.recipe == load_published(ours).recipe


def test_a_safetensors_file_whose_header_length_starts_with_a_pickles_first_byte_is_safetensors(tmp_path):
    path = tmp_path / "net.safetensors"
    model = VGG("A", 3, width=0.0625, input_size=32)
    recipe = {"config": "A", "width": 0.0625, "crop": 32, "num_classes": 3, "batch_norm": False, "dropout": 0.5}
    for pad in range(256):  # a header of 0x..80 bytes: its length's first byte is a pickle's
        export_safetensors(model, {**recipe, "padding": "-" * pad}, path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80" and sniff(path) == "safetensors"
    loaded = load_published(path)
    assert loaded.format == "verydeep" and loaded.recipe["width"] == 0.0625


def test_a_file_named_safetensors_that_holds_another_format_is_read_by_its_contents(tmp_path):
    """Recognised by contents, never by name: a torchvision file or a Keras file under a .safetensors name."""
    torch_file, _ = torchvision_file(tmp_path / "vgg.pth", "A")
    renamed = tmp_path / "vgg.safetensors"
    renamed.write_bytes(torch_file.read_bytes())
    assert sniff(renamed) == "torch" and load_published(renamed).format == "torchvision"
    keras_file = write_keras(tmp_path / "net.h5", *keras_arrays(*raw_weights("D", 1 / 16, 64, 10)))
    renamed.write_bytes(keras_file.read_bytes())
    assert sniff(renamed) == "keras"
    torch.save(torch.load(torch_file, weights_only=True), renamed, _use_new_zipfile_serialization=False)
    assert sniff(renamed) == "torch" and load_published(renamed).format == "torchvision"  # the legacy format
    (tmp_path / "cut.safetensors").write_bytes(b"\x80" + bytes(40))  # none of them: a damaged safetensors file
    assert sniff(tmp_path / "cut.safetensors") == "safetensors"

def test_a_net_of_1000_classes_is_named_by_imagenet_synsets(tmp_path):
    path, _ = torchvision_file(tmp_path / "vgg.pth", "A", classes=1000)
    recipe = load_published(path).recipe
    assert len(recipe["classes"]) == len(recipe["class_names"]) == 1000
    assert (recipe["classes"][0], recipe["class_names"][0]) == ("n01440764", "tench")
    assert (recipe["classes"][-1], recipe["class_names"][-1]) == ("n15075141", "toilet tissue")
    assert recipe["head"] == "published"


def test_imagenet_synsets_are_the_class_order():
    synsets, names = imagenet_classes()
    assert len(synsets) == len(set(synsets)) == len(names) == 1000 and synsets == sorted(synsets)
    samples = SHARED / "imagenet-samples"
    if not samples.is_dir():
        pytest.skip("no shared ImageNet samples")
    for file in samples.glob("n*_*.JPEG"):  # n01440764_tench.JPEG: the synset and its name
        synset, name = file.stem.split("_", 1)
        assert names[synsets.index(synset)].replace(" ", "_").lower() == name.lower(), file.name


@pytest.mark.parametrize(("kind", "config"), [("caffe-v1", "D"), ("caffe", "E"), ("keras", "E"), ("keras", "D")])
def test_the_authors_nets_give_their_own_outputs(tmp_path, kind, config):
    """Caffe files (V1 and current layers) and Keras files against their own forward passes."""
    raw, x = raw_weights(config, 1 / 16, 64, 10, seed=len(kind)), images(64)
    if kind.startswith("caffe"):
        path = write_caffe(tmp_path / "VGG_ILSVRC.caffemodel", *raw, v1=kind.endswith("v1"))
        expected = caffe_reference(x, *raw)
    else:
        raw = keras_arrays(*raw)
        path, expected = write_keras(tmp_path / "vgg_tf_kernels.h5", *raw), keras_reference(x, *raw)
    published = load_published(path)
    recipe = published.recipe
    assert (published.format, recipe["config"], recipe["width"], recipe["crop"], recipe["head"]) == (
        kind.split("-")[0], config, 1 / 16, 64, "published")
    assert recipe["preprocess"] == CAFFE.to_dict() and recipe["preprocess"]["channels"] == "BGR"
    assert recipe["scale"] is None  # the authors' S in [256; 512] goes with their 224-pixel crops only
    torch.testing.assert_close(outputs(published, x), expected, atol=1e-4, rtol=1e-4)


def test_the_authors_sizes_bring_their_training_scale_and_imagenet_classes(tmp_path):
    path = write_caffe(tmp_path / "VGG_ILSVRC_16_layers.caffemodel", *raw_weights("D", 1 / 16, 224, 1000))
    recipe = load_published(path).recipe
    assert (recipe["crop"], recipe["scale"], recipe["num_classes"]) == (224, [256, 512], 1000)
    assert recipe["classes"][:2] == ["n01440764", "n01443537"] and recipe["class_names"][1] == "goldfish"


def test_keras_notop_file_has_a_random_head_and_keras_features(tmp_path):
    blocks, _ = keras_arrays(*raw_weights("D", 1 / 16, 64, 10, seed=2))
    path = write_keras(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", blocks, None)
    published = load_published(path)
    recipe = published.recipe
    assert (recipe["head"], recipe["classes"], recipe["class_names"], recipe["crop"]) == ("random", None, None, 224)
    x = images(64)
    with torch.no_grad():
        features = published.model.features(to_input(x, Preprocess.from_dict(recipe["preprocess"])))
    torch.testing.assert_close(features, keras_reference(x, blocks, None).permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)


def test_a_notop_file_under_a_full_name_is_refused_not_given_a_random_classifier(tmp_path, monkeypatch):
    narrow_names(monkeypatch)
    blocks, _ = keras_arrays(*raw_weights("D", 1 / 16, 64, 10, seed=2))
    write_keras(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5", blocks, None)
    with pytest.raises(UserError, match=r"the file of keras-vgg16 holds VGG-D, width 0\.06\d*, .*no FC layers "
                                        r"\(keras\), not VGG-D, width 0\.0625, 10 classes, 32-pixel crops \(keras\)"):
        load_published("keras-vgg16", weights_dir=tmp_path)


def test_a_keras_dataset_whose_values_lie_in_another_file_is_refused_unread(tmp_path):
    """HDF5 lets a dataset keep its values in any file on the machine (a pipe waits for ever): not weights."""
    import h5py

    blocks, fcs = keras_arrays(*raw_weights("D", 1 / 16, 64, 10))
    path = write_keras(tmp_path / "net.h5", blocks, fcs)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 2)
    with h5py.File(path, "a") as f:
        group = f["predictions"]
        name = [n for n in group.attrs["weight_names"] if b"_b_" in n or "_b_" in str(n)][0]
        name = name.decode() if isinstance(name, bytes) else name
        del group[name]
        group.create_dataset(name, shape=(10,), dtype="f4", external=[(str(secret), 0, 40)])
    with pytest.raises(UserError, match=r"net\.h5: .* holds its values in other files; refused unread"):
        load_published(path)

def test_float64_weights_beyond_float32_s_range_are_refused_and_nothing_is_converted(tmp_path, capsys):
    """1e300 is finite in the file's float64 and inf in the net's float32."""
    path, model = torchvision_file(tmp_path / "tv.pth", "A")
    state = {k: v.double() for k, v in model.state_dict().items()}
    state["classifier.6.bias"][3] = 1e300
    torch.save(state, path)
    with pytest.raises(UserError, match=r"tv\.pth: weights are not finite \(NaN or inf\) in classifier\.6\.bias"):
        load_published(path)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "tv.pth: weights are not finite" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()

def test_our_run_directory_and_safetensors_keep_their_recipe(tmp_path):
    recipe = {"config": "A", "num_classes": 4, "outputs": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5,
              "crop": 32, "scale": [36, 36], "preprocess": IMAGENET.to_dict(), "classes": list("abcd"),
              "class_names": list("abcd")}
    model = VGG("A", num_classes=4, width=1 / 16, input_size=32).eval()
    save_checkpoint({"model": model.state_dict(), "recipe": recipe}, tmp_path / "run" / "checkpoints" / "best.pt")
    export_safetensors(model, recipe, tmp_path / "model.safetensors")
    x = to_input(images(32), IMAGENET)
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "best.pt", tmp_path / "model.safetensors"):
        published = load_published(source)
        assert (published.format, published.recipe) == ("verydeep", recipe)
        with torch.no_grad():
            torch.testing.assert_close(published.model(x), model(x))


# ---- conversion and the command line --------------------------------------------------------------


def sources(tmp_path: Path) -> dict[str, Path]:
    """One small file of each published format."""
    blocks, fcs = raw_weights("D", 1 / 16, 64, 10)
    return {"torchvision": torchvision_file(tmp_path / "tv.pth", "B", True)[0],
            "caffe": write_caffe(tmp_path / "net.caffemodel", blocks, fcs),
            "keras": write_keras(tmp_path / "net.h5", *keras_arrays(blocks, fcs))}


def test_a_keras_file_of_float16_weights_reads_as_its_float32_copy(tmp_path):
    blocks, fcs = keras_arrays(*raw_weights("D", 1 / 4, 96, 10))  # FC1: 1.2 M values, 2.4 MB stored in float16
    half = write_keras(tmp_path / "half.h5", [[(w.astype(np.float16), b.astype(np.float16)) for w, b in block]
                                              for block in blocks], [(w.astype(np.float16), b) for w, b in fcs])
    single = write_keras(tmp_path / "single.h5", [[(w.astype(np.float16).astype(np.float32), b.astype(
        np.float16).astype(np.float32)) for w, b in block] for block in blocks],
        [(w.astype(np.float16).astype(np.float32), b) for w, b in fcs])
    read, expected = load_published(half).model.state_dict(), load_published(single).model.state_dict()
    assert all(torch.equal(read[key], value) for key, value in expected.items())


def test_convert_round_trip_keeps_outputs_and_convention(tmp_path):
    for fmt, source in sources(tmp_path).items():
        original = load_published(source)
        out = convert(source, tmp_path / f"{fmt}.safetensors")
        again = load_published(out)
        assert (again.format, again.recipe) == ("verydeep", original.recipe), fmt
        assert again.recipe["source"]["format"] == fmt
        x = images(original.recipe["crop"])
        torch.testing.assert_close(outputs(again, x), outputs(original, x))
    with pytest.raises(UserError, match="safetensors"):
        convert(source, tmp_path / "out.pt")


def parser() -> argparse.ArgumentParser:
    root = OneLineParser(prog="verydeep")
    add_cli(root.add_subparsers(dest="command", required=True, parser_class=OneLineParser))
    return root


def test_cli_convert_writes_safetensors_and_download_knows_the_names(tmp_path, capsys):
    source = sources(tmp_path)["caffe"]
    args = parser().parse_args(["convert", str(source), str(tmp_path / "vgg.safetensors")])
    assert args.func(args) == 0
    assert "VGG-D, width 0.0625, crop 64, 10 classes; input BGR on 0..255 (caffe weights)" in capsys.readouterr().out
    assert load_published(tmp_path / "vgg.safetensors").format == "verydeep"
    args = parser().parse_args(["download", "caffe-vgg19", "--weights-dir", str(tmp_path)])
    assert (args.name, args.weights_dir) == ("caffe-vgg19", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["download", "vgg17"])
    assert exit_.value.code == 2


def test_convert_of_a_checkpoint_whose_recipe_names_no_input_convention_describes_the_one_it_loads_with(
        tmp_path, capsys):
    model = VGG("A", num_classes=3, width=1 / 16, input_size=32)
    recipe = {"config": "A", "num_classes": 3, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32}
    torch.save({"model": model.state_dict(), "recipe": recipe}, tmp_path / "net.pt")
    args = parser().parse_args(["convert", str(tmp_path / "net.pt"), str(tmp_path / "net.safetensors")])
    assert args.func(args) == 0
    assert "VGG-A, width 0.0625, crop 32, 3 classes; input RGB on 0..1 (verydeep weights)" in capsys.readouterr().out


# ---- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "file", "url"), [
    ("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    ("vgg19_bn", "vgg19_bn-c79401a0.pth", "https://download.pytorch.org/models/vgg19_bn-c79401a0.pth"),
    ("caffe-vgg19", "VGG_ILSVRC_19_layers.caffemodel",
     "http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/VGG_ILSVRC_19_layers.caffemodel"),
    ("keras-vgg16-notop", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
     "https://github.com/fchollet/deep-learning-models/releases/download/v0.1/"
     "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
])
def test_a_name_without_its_file_says_which_file_from_where_to_where(tmp_path, monkeypatch, name, file, url):
    monkeypatch.setenv("VERYDEEP_WEIGHTS_DIR", str(tmp_path / "env"))
    for folder, weights_dir in ((tmp_path / "given", tmp_path / "given"), (tmp_path / "env", None)):
        with pytest.raises(MissingFileError) as error:
            load_published(name, weights_dir)
        message = str(error.value)
        assert "\n" not in message and str(folder / file) in message and url in message
        assert f"verydeep download {name}" in message


def narrow_names(monkeypatch):
    """Each name's file as these tests write them: the name's configuration at width 1/16 with 10 classes, for
    32-pixel crops (a notop file: the convolutions alone)."""
    def narrow(name: str) -> dict[str, object]:
        net = named_net(name) | {"width": 1 / 16}
        return net | {"num_classes": 10, "crop": 32} if net["head"] == "published" else net

    monkeypatch.setattr(weights, "named_net", narrow)


def test_a_name_finds_its_file_which_must_hold_the_names_net(tmp_path, monkeypatch):
    assert len(NAMES) == 14
    torchvision_file(tmp_path / "vgg11-8a719046.pth", "A")  # full width and ImageNet's classes, but for the test's
    with pytest.raises(UserError, match=r"vgg11-8a719046\.pth: the file of vgg11 holds VGG-A, width 0\.0625, 10 "
                                        r"classes, 32-pixel crops \(torchvision\), not VGG-A, width 1, 1000 classes, "
                                        r"224-pixel crops \(torchvision\); delete it and run `verydeep download "
                                        r"vgg11`"):
        load_published("vgg11", weights_dir=tmp_path)
    narrow_names(monkeypatch)
    assert load_published("vgg11", weights_dir=tmp_path).format == "torchvision"
    torchvision_file(tmp_path / "vgg11-8a719046.pth", "E")  # an E under VGG-A's name
    with pytest.raises(UserError, match="the file of vgg11 holds VGG-E, width 0.0625, 10 classes, 32-pixel crops "
                                        r"\(torchvision\), not VGG-A"):
        load_published("vgg11", weights_dir=tmp_path)
    torchvision_file(tmp_path / "vgg13-19584684.pth", "B", batch_norm=True)
    with pytest.raises(UserError, match="the file of vgg13 holds VGG-B with batch norm, width 0.0625, 10 classes, "
                                        r"32-pixel crops \(torchvision\), not VGG-B, width"):
        load_published("vgg13", weights_dir=tmp_path)
    torchvision_file(tmp_path / "VGG_ILSVRC_16_layers.caffemodel", "D")  # torchvision's D (RGB) as the authors'
    with pytest.raises(UserError, match=r"the file of caffe-vgg16 holds VGG-D, .* \(torchvision\), not VGG-D, .* "
                                        r"\(caffe\); delete it"):
        load_published("caffe-vgg16", weights_dir=tmp_path)
    with pytest.raises(MissingFileError, match="vgg17: no such file or folder, nor a published weights name"):
        load_published("vgg17", tmp_path)


def test_with_weights_dir_a_name_is_looked_up_there_past_a_file_of_that_name_in_the_working_folder(
        tmp_path, monkeypatch):
    narrow_names(monkeypatch)
    folder = tmp_path / "weights"
    folder.mkdir()
    torchvision_file(folder / "vgg11-8a719046.pth", "A")
    torchvision_file(tmp_path / "vgg11", "E")  # a file that happens to bear the name, where the command runs
    monkeypatch.chdir(tmp_path)
    assert load_published("vgg11").recipe["config"] == "E"  # a path that exists is that path
    assert load_published("vgg11", weights_dir=folder).recipe["config"] == "A"  # --weights-dir: the name
    refuse_unused_weights_dir(folder, ["vgg11"])  # it takes effect: not refused as unused


@pytest.mark.parametrize(("name", "checksum"), [("vgg16", "SHA-256 begins"), ("keras-vgg16", "MD5 is")])
def test_download_over_a_file_already_there_checks_its_checksum(tmp_path, monkeypatch, capsys, name, checksum):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    known = known_weights()[name]
    present = tmp_path / known.file
    present.write_bytes(b"a truncated or foreign file")
    assert main(["download", name, "--weights-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"verydeep download: error: {present}: already there, but its {checksum}") and "\n" not in err
    assert f"verydeep download {name}" in err and present.read_bytes() == b"a truncated or foreign file"
    digest = hashlib.sha256(present.read_bytes()).hexdigest() if known.hash_prefix else None
    genuine = replace(known, hash_prefix=digest[:8] if digest else None,
                      md5=None if digest else hashlib.md5(present.read_bytes()).hexdigest())
    monkeypatch.setitem(known_weights(), name, genuine)
    assert download(name, tmp_path) == present and present.read_bytes() == b"a truncated or foreign file"



def test_download_keeps_a_caffe_file_already_there_only_when_it_begins_as_a_caffe_model(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    present = tmp_path / known_weights()["caffe-vgg16"].file
    present.write_bytes(b"<!DOCTYPE html><title>404 Not Found</title>")  # what a failed fetch by hand leaves
    assert main(["download", "caffe-vgg16", "--weights-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"verydeep download: error: {present}: already there, but it begins b'<!DOCTYP")
    assert "\n" not in err and present.read_bytes().startswith(b"<!DOCTYPE")  # refused, untouched
    for junk in (b"\n<!DOCTYPE html><title>404</title>", b"\x12\x00", b"\x12\xff\x7f" + b"a" * 8):  # a key, no net
        present.write_bytes(junk)
        with pytest.raises(UserError, match="as no Caffe model does"):
            download("caffe-vgg16", tmp_path)
    for net in (caffe_net_class()(name="VGG_ILSVRC_16_layers"), write_caffe(tmp_path / "v1.caffemodel", [], [])):
        present.write_bytes(net.SerializeToString() if not isinstance(net, Path) else net.read_bytes())
        assert download("caffe-vgg16", tmp_path) == present

# ---- damaged and hostile files --------------------------------------------------------------------


class Payload:
    """Unpickling this writes the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, writer):
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof")))  # the payload does run under plain pickle
    assert (tmp_path / "proof").exists()
    marker, path = tmp_path / "marker", tmp_path / "vgg16-397923af.pth"
    state = {"features.0.weight": Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save(state, path)
    with pytest.raises(UserError) as error:
        load_published(path)
    assert str(error.value).startswith(f"{path}: refused") and "\n" not in str(error.value)
    assert "open" in str(error.value) and not marker.exists()


class Command:
    """Unpickling this runs a shell command (torch blocks the whole ``os`` module, in other words)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_calling_a_blocked_module_is_refused_naming_the_call(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "evil.pth"
    torch.save({"features.0.weight": Command(marker)}, path)
    with pytest.raises(UserError, match=rf"^{path}: refused: it holds more than tensors; loading it could run code "
                                        r"\(it would call posix\.system\)$"):
        load_published(path)
    assert not marker.exists()


def test_a_torch_file_claiming_to_unpack_to_more_than_weights_could_is_refused_unread(tmp_path):
    """A 16 MB record deflated to kilobytes: torch would allocate it whole before anything could be checked."""
    import zipfile

    path, _ = torchvision_file(tmp_path / "tv.pth", "A")
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for entry in source.infolist():
            out.writestr(entry.filename, source.read(entry))
        out.writestr("tv/data/99", bytes(16 << 20))
    with pytest.raises(UserError, match=r"bomb\.pth: tv/data/99 would unpack \d+ bytes into 16777216, more than "
                                        "weights could hold: refused unread"):
        load_published(bomb)

def damage(kind: str, tmp_path: Path) -> Path:
    """A file that is wrong in the way ``kind`` says."""
    files = sources(tmp_path)
    path = tmp_path / f"{kind}.bad"
    fmt = kind.split("-")[0]
    if kind.endswith("-truncated"):
        data = files[fmt].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "torchvision-unknown-keys":
        torch.save({"encoder.weight": torch.zeros(4, 3, 3, 3)}, path)
    elif kind == "torchvision-wrong-shape":
        state = torch.load(files["torchvision"], weights_only=True)
        torch.save(state | {"classifier.3.weight": torch.zeros(5, 7)}, path)
    elif kind == "torchvision-not-finite":
        state = torch.load(files["torchvision"], weights_only=True)
        state["features.0.weight"][0, 0, 0, 0] = float("nan")
        torch.save(state, path)
    elif kind == "caffe-short-blob":
        blocks, fcs = raw_weights("D", 1 / 16, 64, 10)
        net = caffe_net_class().FromString(write_caffe(path, blocks, fcs).read_bytes())
        del net.layers[0].blobs[0].data[-1]
        path.write_bytes(net.SerializeToString())
    elif kind == "keras-flat-kernel":
        blocks, fcs = keras_arrays(*raw_weights("D", 1 / 16, 64, 10))
        blocks[1][0] = (blocks[1][0][0].reshape(3, 3, -1), blocks[1][0][1])
        write_keras(path, blocks, fcs)
    return path


@pytest.mark.parametrize("kind", [
    "torchvision-truncated", "caffe-truncated", "keras-truncated", "random-bytes", "empty",
    "torchvision-unknown-keys", "torchvision-wrong-shape", "torchvision-not-finite", "caffe-short-blob",
    "keras-flat-kernel"])
def test_a_bad_file_is_one_line_naming_it(tmp_path, kind):
    path = damage(kind, tmp_path)
    with pytest.raises(UserError) as error:
        load_published(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


@pytest.mark.parametrize("suffix", [".pth", ".h5", ".caffemodel", ".safetensors", ".keras"])
def test_an_empty_file_is_called_empty_whatever_its_name(tmp_path, suffix):
    (tmp_path / f"w{suffix}").write_bytes(b"")
    with pytest.raises(UserError, match=rf"^{tmp_path / f'w{suffix}'}: an empty file, not weights$"):
        load_published(tmp_path / f"w{suffix}")

def test_a_negative_batch_norm_variance_is_refused_on_loading_not_met_as_nan_outputs(tmp_path):
    state = VGG("A", num_classes=10, width=1 / 8, input_size=32, batch_norm=True).state_dict()
    state["features.1.running_var"][3] = -1.0
    torch.save(state, tmp_path / "negative.pth")
    with pytest.raises(UserError, match=r"negative\.pth: batch-norm variances are negative in features\.1\."):
        load_published(tmp_path / "negative.pth")
    assert main(["convert", str(tmp_path / "negative.pth"), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()


# ---- malformed files: each refused in one line naming it, before anything is allocated or written ------


def caffe_net(tmp_path: Path, v1: bool = True):
    """A small Caffe net's message, to damage before it is written."""
    blocks, fcs = raw_weights("D", 1 / 16, 64, 10)
    return caffe_net_class().FromString(write_caffe(tmp_path / "src.caffemodel", blocks, fcs, v1).read_bytes())


def caffe_layer(net, name: str):
    return next(layer for layer in [*net.layers, *net.layer] if layer.name == name)


def malformed(kind: str, path: Path) -> None:
    """Write at ``path`` a file that is malformed the way ``kind`` says."""
    blocks, fcs = keras_arrays(*raw_weights("D", 1 / 16, 64, 10))
    if kind == "keras-fc-only":
        write_keras(path, [], fcs)
    elif kind == "keras-zero-channels":
        blocks[-1][-1] = (np.zeros((3, 3, blocks[-1][-1][0].shape[2], 0), np.float32), np.zeros(0, np.float32))
        write_keras(path, blocks, fcs)
    elif kind == "keras-extra-layer":
        write_keras(path, [*blocks, [blocks[-1][-1]]], fcs)  # a block6_conv1 after block 5
    elif kind in ("keras-int", "keras-complex"):
        dtype = np.int32 if kind == "keras-int" else np.complex64
        blocks[0][0] = (blocks[0][0][0].astype(dtype), blocks[0][0][1])
        write_keras(path, blocks, fcs)
    elif kind == "keras-huge-dataset":
        write_keras(path, blocks, fcs)
        with h5py.File(path, "a") as f:  # FC1 declared as 4 TiB of floats that the file does not hold
            del f["fc1/fc1_W_1:0"]
            f["fc1"].create_dataset("fc1_W_1:0", shape=(2**20, 2**20), dtype="f4", chunks=True)
    elif kind == "keras3-scalar-kernel":
        with h5py.File(path, "w") as f:
            variables = f.create_group("layers/conv2d/vars")
            variables["0"], variables["1"] = np.float32(2.0), np.zeros(4, np.float32)
    elif kind == "keras-archive-bomb":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("config.json", "{}")  # 64 MiB of zeros deflate to 64 KiB; weights would not
            archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + bytes(64 << 20))
    elif kind.startswith("caffe-"):
        net = caffe_net(path.parent, v1=kind != "caffe-negative-dims")
        if kind == "caffe-negative-dims":  # conv1_1's 4 x 3 x 3 x 3 values under dimensions whose product is 108
            blob = caffe_layer(net, "conv1_1").blobs[0]
            blob.shape.dim[:] = [-4, -27, 1, 1]
        elif kind == "caffe-fc-scalar":
            blob = caffe_layer(net, "fc6").blobs[0]
            blob.shape.SetInParent()
            blob.data[:] = [0.5]
        elif kind == "caffe-fc-zero-dims":
            blob = caffe_layer(net, "fc6").blobs[0]
            blob.num = blob.channels = blob.height = blob.width = 0
            del blob.data[:]
        elif kind == "caffe-zero-channels":
            blob, bias = caffe_layer(net, "conv5_3").blobs
            blob.num = bias.width = 0
            del blob.data[:], bias.data[:]
        elif kind == "caffe-repeated-layer":
            net.layers.add().CopyFrom(caffe_layer(net, "conv1_1"))
        path.write_bytes(net.SerializeToString())
    else:
        state = torch.load(torchvision_file(path.parent / "src.pth")[0], weights_only=True)
        if kind == "torchvision-zero-classes":
            state |= {"classifier.6.weight": torch.zeros(0, 256), "classifier.6.bias": torch.zeros(0)}
        elif kind == "torchvision-zero-channels":
            state |= {"features.28.weight": torch.zeros(0, 32, 3, 3), "features.28.bias": torch.zeros(0)}
        else:
            state["features.0.weight"] = state["features.0.weight"].to(getattr(torch, kind.split("-")[1]))
        torch.save(state, path)


@pytest.mark.parametrize(("kind", "says"), [
    ("keras-fc-only", "no convolution layers"),
    ("keras-zero-channels", "block5_conv3_W_1:0: shape (3, 3, 32, 0), but each dimension must be a positive"),
    ("keras-extra-layer", "layer conv6_1 is in no configuration of Table 1"),
    ("keras-int", "block1_conv1_W_1:0 holds int32 values, not floating point"),
    ("keras-complex", "block1_conv1_W_1:0 holds complex64 values, not floating point"),
    ("keras-huge-dataset", "fc1/fc1_W_1:0 declares (1048576, 1048576) values"),
    ("keras3-scalar-kernel", "layers/conv2d/vars/0: shape (), but each dimension must be a positive"),
    ("keras-archive-bomb", "model.weights.h5 would unpack"),
    ("caffe-negative-dims", "conv1_1, a blob: shape (-4, -27, 1, 1), but each dimension must be a positive"),
    ("caffe-fc-scalar", "fc6, a blob: shape (), but each dimension must be a positive"),
    ("caffe-fc-zero-dims", "fc6, a blob: shape (0, 0, 0, 0), but each dimension must be a positive"),
    ("caffe-zero-channels", "conv5_3, a blob: shape (0, 32, 3, 3)"),
    ("caffe-repeated-layer", "layer 'conv1_1' appears twice"),
    ("torchvision-zero-classes", "tensor classifier.6.weight has shape (0, 256), with a zero dimension"),
    ("torchvision-zero-channels", "tensor features.28.weight has shape (0, 32, 3, 3)"),
    ("torchvision-int32", "tensor features.0.weight holds torch.int32 values, not floating point"),
    ("torchvision-bool", "tensor features.0.weight holds torch.bool values"),
    ("torchvision-complex64", "tensor features.0.weight holds torch.complex64 values"),
    ("torchvision-float8_e4m3fn", "tensor features.0.weight holds torch.float8_e4m3fn values, not floating point"),
])
def test_a_malformed_file_is_refused_in_one_line_naming_it_and_what_is_wrong(tmp_path, monkeypatch, kind, says):
    path = tmp_path / f"{kind}.bin"
    malformed(kind, path)
    read = zipfile.ZipFile.read
    unpacked = []
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: unpacked.append(name) or read(self, name, *a))
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserError) as error:
        convert(path, out)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and says in message
    assert not out.exists() and "model.weights.h5" not in unpacked  # nothing written, no bomb unpacked


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn])
@pytest.mark.parametrize("kind", ["checkpoint", "safetensors"])
def test_our_own_files_with_weights_that_are_no_floats_are_refused_naming_the_tensor(tmp_path, kind, dtype):
    model = VGG("A", num_classes=3, width=1 / 16, input_size=32)
    recipe = {"config": "A", "num_classes": 3, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32}
    if kind == "checkpoint":
        state = model.state_dict() | {"features.0.weight": model.features[0].weight.detach().to(dtype)}
        path = tmp_path / "net.pt"
        torch.save({"model": state, "recipe": recipe}, path)
    else:
        with torch.no_grad():
            model.features[0].weight.mul_(100)
        path = export_safetensors(model, recipe, tmp_path / "net.safetensors")
        weights = load_file(path)
        save_file(weights | {"features.0.weight": weights["features.0.weight"].to(dtype)}, path,
                  metadata=safe_open(path, "pt").metadata())
    with pytest.raises(UserError, match=f"^{path}: tensor features.0.weight holds {dtype} values, not floating"):
        load_published(path)


def test_an_error_a_reader_did_not_foresee_is_one_line_naming_the_file(tmp_path, monkeypatch):
    blocks, fcs = raw_weights("D", 1 / 16, 64, 10)
    path = write_caffe(tmp_path / "net.caffemodel", blocks, fcs)

    def reader(p: Path) -> dict:
        return {}["conv1_1"]

    monkeypatch.setattr("verydeep.io.weights.read_caffe", reader)
    with pytest.raises(UserError) as error:
        load_published(path)
    assert str(error.value) == f"{path}: not a readable Caffe model file (KeyError: 'conv1_1')"


def test_an_empty_weights_dir_is_refused_not_taken_for_the_default(capsys):
    assert main(["download", "vgg16", "--weights-dir", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--weights-dir is empty: give a folder" in err


@pytest.mark.parametrize("kind", ["pipe", "device"])
def test_a_pipe_or_a_device_as_weights_is_refused_before_it_is_read(tmp_path, capsys, kind):
    if kind == "pipe":
        source = tmp_path / "weights.pth"
        os.mkfifo(source)  # opened for reading, it would wait for a writer for ever
    else:
        source = Path("/dev/zero")  # read, it would never end
    assert main(["convert", str(source), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == f"verydeep convert: error: {source}: not a regular file or folder, so no weights\n"
    assert not (tmp_path / "out.safetensors").exists()
