"""Files written by Keras 3 itself (on the torch backend): ``save_weights`` to ``.weights.h5`` and a
whole ``.keras`` archive, of a VGG-16 built as ``keras.applications.VGG16`` builds it (its layer
names and kinds), narrowed so that the test stays small; read by content, not by name."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="Keras 3 is not installed (pip install 'verydeep[dev]')")

from verydeep.errors import UserError  # noqa: E402
from verydeep.io.weights import load_published, sniff  # noqa: E402

#: Keras' own torch backend warns about NumPy 2's copy keyword; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))  # VGG-16: D


def keras_vgg16(width: int = 16, classes: int = 5, size: int = 64, top: bool = True, batch_norm: bool = False):
    """keras.applications.VGG16's layers (blockB_convI, blockB_pool, flatten, fc1, fc2, predictions) at
    1/``width`` of its channels, for ``size``-pixel inputs (pool5 is 2 x 2: Keras' flattening order
    matters); without ``top`` the convolutions alone (``include_top=False``); ``batch_norm``: each
    convolution followed by a BatchNormalization layer."""
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((size, size, 3))
    for block, (convs, channels) in enumerate(BLOCKS, start=1):
        for i in range(1, convs + 1):
            x = keras.layers.Conv2D(channels // width, 3, padding="same", activation="relu",
                                    name=f"block{block}_conv{i}")(x)
            x = keras.layers.BatchNormalization()(x) if batch_norm else x
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    if not top:
        return keras.Model(inputs, x, name="vgg16")
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4096 // width, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(4096 // width, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="vgg16")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model = keras_vgg16()
    folder = tmp_path_factory.mktemp("keras")
    model.save_weights(folder / "vgg16.weights.h5")
    model.save(folder / "vgg16.keras")
    x = np.random.default_rng(0).normal(0, 20, (2, 64, 64, 3)).astype(np.float32)
    return folder, x, np.asarray(model.predict(x, verbose=0))


@pytest.mark.parametrize("name", ["vgg16.weights.h5", "vgg16.keras"])
def test_keras_3_files_load_and_predict_as_keras_does(written, name, tmp_path):
    folder, x, expected = written
    path = tmp_path / f"weights-{name.replace('.', '-')}.bin"  # recognised by content, not by name
    path.write_bytes((folder / name).read_bytes())
    assert sniff(path) == "keras"
    published = load_published(str(path))
    assert published.format == "keras" and published.recipe["config"] == "D" and published.has_fc_layers
    with torch.no_grad():
        ours = published.model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).softmax(dim=1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_a_keras_3_file_without_the_top_layers_gives_the_convolutions_and_a_random_head(tmp_path):
    model = keras_vgg16(top=False)
    model.save_weights(tmp_path / "notop.weights.h5")
    x = np.random.default_rng(1).normal(0, 20, (2, 64, 64, 3)).astype(np.float32)
    expected = np.asarray(model.predict(x, verbose=0)).transpose(0, 3, 1, 2)  # pool5, channels first
    published = load_published(str(tmp_path / "notop.weights.h5"))
    assert published.recipe["config"] == "D" and not published.has_fc_layers
    with torch.no_grad():
        ours = published.model.eval().features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_a_keras_3_file_with_layers_a_vgg_has_no_place_for_is_refused_naming_one(tmp_path):
    keras_vgg16(batch_norm=True).save_weights(tmp_path / "bn.weights.h5")
    with pytest.raises(UserError, match=r"bn\.weights\.h5: Keras layer batch_normalization\w* with 4 weights is no "
                                        r"VGG layer"):
        load_published(str(tmp_path / "bn.weights.h5"))


def test_a_keras_3_model_holding_a_vgg_model_is_refused_naming_the_inner_one(tmp_path):
    """A VGG base under a new head (Keras' transfer-learning recipe) nests the VGG's layers apart: refused as such,
    not as a model of no convolutions."""
    x = inputs = keras.Input((64, 64, 3))
    x = keras.layers.Flatten()(keras_vgg16(top=False)(x))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    for name, save in (("transfer.weights.h5", model.save_weights), ("transfer.keras", model.save)):
        save(tmp_path / name)
        with pytest.raises(UserError, match=rf"^{tmp_path / name}: the Keras model holds another model "
                                            r"\(layers/functional\w*\); save that VGG model's own weights"):
            load_published(str(tmp_path / name))


def test_a_keras_3_archive_with_a_layer_a_vgg_computes_otherwise_is_refused_naming_it(tmp_path):
    """A layer without weights still changes what the net computes (Rescaling: another input convention), as
    does a convolution or FC layer without ReLU; the archive's config says so, the weights alone would not."""
    keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Rescaling(1 / 255, name="scale"),
                      *keras_vgg16().layers[1:]]).save(tmp_path / "rescaled.keras")
    with pytest.raises(UserError, match=r"rescaled\.keras: Keras layer 'scale' \(Rescaling\) is no layer of a VGG of "
                                        r"Table 1, which would compute something else"):
        load_published(str(tmp_path / "rescaled.keras"))
    plain = keras_vgg16()
    plain.get_layer("fc1").activation = keras.activations.linear
    plain.save(tmp_path / "linear.keras")
    with pytest.raises(UserError, match=r"linear\.keras: Keras layer 'fc1' \(Dense, activation linear\) is no layer"):
        load_published(str(tmp_path / "linear.keras"))


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_a_keras_3_notop_vgg_with_global_pooling_loads_its_convolutions(tmp_path, pooling):
    """keras.applications' VGGs without their FC layers may end in a global pooling, which holds no weights."""
    x = inputs = keras.Input((64, 64, 3))
    for layer in keras_vgg16(top=False).layers[1:]:
        x = layer(x)
    pooled = keras.layers.GlobalAveragePooling2D() if pooling == "avg" else keras.layers.GlobalMaxPooling2D()
    keras.Model(inputs, pooled(x)).save(tmp_path / "pooled.keras")
    published = load_published(str(tmp_path / "pooled.keras"))
    assert published.recipe["head"] == "random" and published.recipe["config"] == "D"


def _rebuilt(size: int = 64, change: str = "") -> keras.Model:
    """:func:`keras_vgg16`'s layers, rebuilt for ``size``-pixel inputs with one ``change``: ``dilated`` (the second
    convolution dilated by 2), ``pool3`` (3 x 3 poolings), ``same-pool`` (padded poolings) or ``no-pool5``."""
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((size, size, 3))
    for layer in keras_vgg16(size=size).layers[1:]:
        if layer.name == "block1_conv2" and change == "dilated":
            layer = keras.layers.Conv2D(4, 3, padding="same", activation="relu", dilation_rate=2, name=layer.name)
        elif layer.name.endswith("_pool") and change in ("pool3", "same-pool"):
            layer = keras.layers.MaxPooling2D(3 if change == "pool3" else 2, strides=2, name=layer.name,
                                              padding="same" if change == "same-pool" else "valid")
        elif layer.name == "block5_pool" and change == "no-pool5":
            continue
        elif layer.name == "fc1":
            layer = keras.layers.Dense(256, activation="relu", name="fc1")
        x = layer(x)
    return keras.Model(inputs, x, name="vgg16")


@pytest.mark.parametrize(("change", "size", "said"), [
    ("dilated", 64, r"Keras layer 'block1_conv2' \(Conv2D, activation relu, padding same, strides \[1, 1\], "
                    r"dilation_rate \[2, 2\], groups 1\) is no layer of a VGG"),
    ("pool3", 64, r"Keras layer 'block1_pool' \(MaxPooling2D, padding valid, strides \[2, 2\], pool_size \[3, 3\]\)"),
    ("same-pool", 64, r"Keras layer 'block1_pool' \(MaxPooling2D, padding same, "),
    ("no-pool5", 64, r"the Keras model has 4 max-pooling layers where a VGG of Table 1 has 5"),
    ("", 70, r"the Keras model takes 70 x 70 images into its FC layers, where a VGG's take a square of a multiple "
             r"of 32 pixels"),
])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_keras_model_whose_config_computes_otherwise_than_its_weights_say_is_refused(tmp_path, change, size, said,
                                                                                         suffix):
    """Weights of the shapes of a VGG's, behind a dilated convolution, another pooling, a pooling left out (FC1 then
    reads a larger grid: a net of twice the crop) or an input the top cannot take, would load as a VGG that computes
    something else; the model's config (a ``.keras`` archive's, a whole model's HDF5) says so."""
    path = tmp_path / f"changed{suffix}"
    _rebuilt(size, change).save(path)
    with pytest.raises(UserError, match=rf"changed\{suffix}: {said}"):
        load_published(str(path))


def test_a_rebuilt_keras_vgg_loads_as_the_vgg_it_is(tmp_path):
    """The refusals above turn on the one change each: the same rebuilding without it loads."""
    _rebuilt().save(tmp_path / "plain.keras")
    assert load_published(str(tmp_path / "plain.keras")).recipe["crop"] == 64


def test_a_vgg_whose_relus_are_layers_of_their_own_loads_and_predicts_as_keras_does(tmp_path):
    """Conv2D and Dense without activation, each followed by ``Activation("relu")`` or ``ReLU()`` (the output by
    ``Activation("softmax")``), compute what keras.applications' VGG does; so does an old Sequential model, whose
    config is the bare list of its layers."""
    keras.utils.set_random_seed(0)
    layers, relu = [keras.Input((64, 64, 3))], [keras.layers.ReLU, lambda: keras.layers.Activation("relu")]
    for block, (convs, channels) in enumerate(BLOCKS, start=1):
        for i in range(1, convs + 1):
            layers += [keras.layers.Conv2D(channels // 16, 3, padding="same", name=f"block{block}_conv{i}"),
                       relu[i % 2]()]
        layers.append(keras.layers.MaxPooling2D(2, name=f"block{block}_pool"))
    layers += [keras.layers.Flatten(name="flatten"), keras.layers.Dense(256, name="fc1"), relu[0](),
               keras.layers.Dense(256, name="fc2"), relu[1](), keras.layers.Dense(5, name="predictions"),
               keras.layers.Activation("softmax")]
    model = keras.Sequential(layers)
    x = np.random.default_rng(0).normal(0, 20, (2, 64, 64, 3)).astype(np.float32)
    expected = np.asarray(model.predict(x, verbose=0))
    model.save(tmp_path / "relus.keras")
    model.save(tmp_path / "relus.h5")
    import h5py

    with h5py.File(tmp_path / "relus.h5", "r+") as f:  # as Keras 2.2 wrote a Sequential model: a list of layers
        config = json.loads(f.attrs["model_config"])
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": config["config"]["layers"]})
    for name in ("relus.keras", "relus.h5"):
        published = load_published(str(tmp_path / name))
        with torch.no_grad():
            ours = published.model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).softmax(dim=1).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6, err_msg=name)
