"""Very deep features (Appendix B, verydeep.eval.features): FC7 of the dense net pooled and mirrored, stacked or
averaged over scales, L2-normalised, several nets stacked; stored as .npz, resumed after an interruption;
named taps; the raw-pixel baseline; one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, save, write_dataset

from verydeep.cli import main
from verydeep.data import IMAGENET, RescaleTransform, to_input
from verydeep.errors import UserError
from verydeep.eval import feature_passes as passes
from verydeep.eval.descriptors import aggregate, combine, pooled_descriptor
from verydeep.eval.feature_passes import Settings
from verydeep.eval.feature_store import Features
from verydeep.eval.features import extract_features, raw_pixel_features
from verydeep.io.checkpoint import export_safetensors
from verydeep.nn.model import VGG

FC7 = 4096 // 16  # FC7's width at width 1/16


def narrow(seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    return VGG("A", num_classes=4, width=1 / 16, input_size=32, init="he").eval()


def exported(path: Path, seed: int = 0, **recipe) -> Path:
    """A width-1/16 net A (32-pixel crop) saved as our .safetensors, as ``load_published`` reads it."""
    keys = {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
            "preprocess": IMAGENET.to_dict()}
    return export_safetensors(narrow(seed), keys | recipe, path)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory.mktemp("net") / "a.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with train/ and test/: two classes of photos of three sizes, so batches group by size."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(12):
        part, label = ("train", "test")[i % 2], f"c{i % 3 % 2}"
        save(photo((48, 64, 80)[i % 3], 40 + 8 * (i % 2), seed=i), root / part / label / f"{i}.png")
    return root


def settings(**options) -> Settings:
    return Settings.create(**{"scales": (32, 48), "device": "cpu", "precision": "fp32", "batch_size": 2,
                              "workers": 0, "progress": False} | options)


def test_pooled_descriptor_is_the_mean_of_the_fc7_map_and_mirrored_images_are_averaged_in():
    model = narrow()
    dense = model.dense()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        fc7 = dense.extract(x, ["relu7"])["relu7"]
        mirrored = dense.extract(x.flip(-1), ["relu7"])["relu7"]
        assert fc7.shape == (2, FC7, 3, 4)
        once = pooled_descriptor(dense, x, flip=False)
        assert torch.allclose(once, fc7.flatten(2).mean(dim=2), atol=1e-6)
        per_location = torch.stack([fc7[:, :, i, j] for i in range(3) for j in range(4)]).mean(dim=0)
        assert torch.allclose(once, per_location, atol=1e-6)
        both = pooled_descriptor(dense, x)
        assert torch.allclose(both, (once + mirrored.mean(dim=(2, 3))) / 2, atol=1e-6)
        crop = torch.randn(2, 3, 32, 32)  # a crop's 1x1 map: the plain net's FC7 after ReLU
        assert torch.allclose(pooled_descriptor(dense, crop, flip=False), model.extract(crop, ["relu7"])["relu7"],
                              atol=1e-5)


def test_named_taps_of_the_plain_and_dense_nets():
    model = narrow()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = model.dense().extract(x, ["conv1_1", "pool5", "fc6", "fc7"])
        assert taps["conv1_1"].shape == (1, 4, 64, 64) and taps["pool5"].shape == (1, 32, 2, 2)
        assert taps["fc6"].shape == (1, FC7, 2, 2) and taps["fc7"].shape == (1, FC7, 2, 2)
        assert model.extract(x[..., :32, :32], ["relu7"])["relu7"].shape == (1, FC7)


def test_stacking_averaging_and_combining_nets_are_l2_normalised():
    rng = np.random.default_rng(0)
    per_scale = [rng.normal(size=(5, 8)) for _ in range(3)]
    stacked, averaged = aggregate(per_scale, "stack"), aggregate(per_scale, "average")
    assert stacked.shape == (5, 24) and averaged.shape == (5, 8)
    assert np.allclose(np.linalg.norm(stacked, axis=1), 1) and np.allclose(np.linalg.norm(averaged, axis=1), 1)
    joined = np.concatenate(per_scale, axis=1)
    assert np.allclose(stacked, joined / np.linalg.norm(joined, axis=1, keepdims=True))
    mean = np.mean(per_scale, axis=0)
    assert np.allclose(averaged, mean / np.linalg.norm(mean, axis=1, keepdims=True))
    both = combine([stacked, averaged])
    assert both.shape == (5, 32) and np.allclose(np.linalg.norm(both, axis=1), 1)
    assert np.allclose(np.linalg.norm(both[:, :24], axis=1), 2**-0.5)  # each net weighs the same
    with pytest.raises(UserError, match="--aggregate"):
        aggregate(per_scale, "max")


def test_extraction_is_the_papers_descriptor_per_image(net, photos):
    result = extract_features([net], photos, settings=settings())
    assert result.features.shape == (12, 2 * FC7) and result.features.dtype == np.float32
    assert np.allclose(np.linalg.norm(result.features, axis=1), 1, atol=1e-5)
    assert result.splits == ["train"] * 6 + ["test"] * 6 and result.classes == ["c0", "c1"]
    assert result.labels.tolist() == [int(Path(p).parent.name[1]) for p in result.paths]
    dense = narrow().dense()
    path = result.paths[7]
    with torch.no_grad():
        scales = [pooled_descriptor(dense, to_input(RescaleTransform(q)(path)[None], IMAGENET)).numpy()
                  for q in (32, 48)]
    assert np.allclose(result.features[7], aggregate(scales, "stack")[0], atol=1e-5)
    averaged = extract_features([net], photos, settings=settings(aggregate="average"))
    assert averaged.features.shape == (12, FC7)
    assert np.allclose(averaged.features[7], aggregate(scales, "average")[0], atol=1e-5)


def test_several_nets_stack_their_descriptors(net, photos, tmp_path):
    other = exported(tmp_path / "b.safetensors", seed=1)
    one = extract_features([net], photos, settings=settings())
    two = extract_features([net, other], photos, settings=settings())
    assert two.features.shape == (12, 4 * FC7)
    assert np.allclose(two.features[:, : 2 * FC7] * 2**0.5, one.features, atol=1e-5)
    assert [n["source"] for n in two.settings["nets"]] == [str(net), str(other)]


def test_a_net_given_twice_is_refused(net, photos, tmp_path):
    """Stacked with itself a net's descriptor is only longer, labelled as two nets: refused, by file or by weights."""
    copy = tmp_path / "copy.safetensors"
    shutil.copy(net, copy)
    model = narrow(0)  # the same FC7 under another FC8 and classes: the same descriptor
    with torch.no_grad():
        model.classifier[6].weight.mul_(-1)
    relabelled = export_safetensors(model, {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16,
                                            "dropout": 0.5, "crop": 32, "preprocess": IMAGENET.to_dict(),
                                            "classes": list("wxyz")}, tmp_path / "relabelled.safetensors")
    for sources in ([net, net], [net, copy], [net, relabelled]):
        with pytest.raises(UserError, match=r"^--weights .*: the weights of --weights .* again; give each net once$"):
            extract_features(sources, photos, settings=settings())


def test_stored_features_are_plain_numpy(net, photos, tmp_path):
    out = tmp_path / "features.npz"
    result = extract_features([net], photos, out, settings())
    with np.load(out, allow_pickle=False) as npz:
        assert {"features", "labels", "paths", "classes", "splits", "settings"} <= set(npz.files)
        assert np.array_equal(npz["features"], result.features) and npz["paths"].tolist() == result.paths
    loaded = Features.load(out)
    assert loaded.settings["scales"] == [32, 48] and loaded.settings["aggregate"] == "stack"
    assert loaded.settings["precision"] == "fp32"  # as they were computed: bf16's differ by about 1e-3
    assert not Path(f"{out}.partial").exists()


def test_an_interrupted_extraction_continues_where_it_stopped(net, photos, tmp_path, monkeypatch):
    whole = extract_features([net], photos, settings=settings())
    out = tmp_path / "features.npz"
    describe_batch = passes.describe_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 5:
            raise KeyboardInterrupt
        describe_batch(*args, **kwargs)

    monkeypatch.setattr(passes, "describe_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features([net], photos, out, settings(checkpoint_every=3))
    assert Path(f"{out}.partial").is_file() and not out.exists()
    killed_save, other = tmp_path / ".features.npz.partial.x1y2z3w4.tmp", tmp_path / ".other.npz.x1y2z3w4.tmp"
    killed_save.write_bytes(b"half a save")  # as a kill -9 inside a save leaves it (mkstemp's 8 characters)
    other.write_bytes(b"another command's write")
    first = len(calls) - 1
    resumed = extract_features([net], photos, out, settings(checkpoint_every=3))
    assert not killed_save.exists() and other.exists()
    batches = len(calls) - first - 1
    assert batches == 12 - 4  # 6 batches of 2 per scale; the 4 done before Ctrl-C are not redone
    assert np.allclose(resumed.features, whole.features, atol=1e-6) and resumed.paths == whole.paths
    assert not Path(f"{out}.partial").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.npz.x1y2z3w4.tmp", "features.npz"]  # the partial gone with every leftover of its saves


def test_a_partial_extraction_of_other_settings_is_refused(net, photos, tmp_path, monkeypatch):
    out = tmp_path / "features.npz"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(passes, "describe_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        extract_features([net], photos, out, settings())
    monkeypatch.undo()
    with pytest.raises(UserError, match="partial extraction with other"):
        extract_features([net], photos, out, settings(scales=(32, 64)))
    with pytest.raises(UserError, match="partial extraction with other"):  # its rows would mix two precisions
        extract_features([net], photos, out, settings(precision="bf16"))
    photo = next(photos.rglob("*.png"))
    times = photo.stat()
    os.utime(photo, ns=(times.st_atime_ns, times.st_mtime_ns + 10**9))  # rewritten since: described again
    try:
        with pytest.raises(UserError, match=r"partial extraction with other nets, images \(or files changed since\)"):
            extract_features([net], photos, out, settings())
    finally:
        os.utime(photo, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_unreadable_images_are_skipped_and_named(net, tmp_path):
    root = write_dataset(tmp_path / "data", {"train": 2, "test": 2})
    bad = root / "test" / "class1" / "bad.png"
    bad.write_bytes(b"not an image")
    result = extract_features([net], root, settings=settings())
    assert result.skipped == [str(bad)] and str(bad) not in result.paths and len(result.paths) == 16


@pytest.mark.parametrize("batch_size", [1, 16])
def test_a_batch_of_unreadable_images_only_is_skipped(net, tmp_path, batch_size):
    """With batches of one image an unreadable one is a batch without images: skipped, by the net and the pixels."""
    root = write_dataset(tmp_path / "data", {"train": 2, "test": 2})
    bad = root / "test" / "class1" / "bad.png"
    bad.write_bytes(b"not an image")
    for result in (extract_features([net], root, settings=settings(batch_size=batch_size)),
                   raw_pixel_features(root, 8, settings(batch_size=batch_size))):
        assert result.skipped == [str(bad)] and str(bad) not in result.paths and len(result.paths) == 16
        assert np.allclose(np.linalg.norm(result.features, axis=1), 1, atol=1e-5)


def test_raw_pixels_baseline(photos):
    result = raw_pixel_features(photos, 8, settings())
    assert result.features.shape == (12, 3 * 8 * 8)
    assert np.allclose(np.linalg.norm(result.features, axis=1), 1, atol=1e-5)
    assert np.allclose(result.features.mean(axis=1), 0, atol=1e-6)
    assert result.settings["kind"] == "raw-pixels"


def test_weights_without_fc_layers_are_refused(photos, tmp_path):
    notop = exported(tmp_path / "notop.safetensors", head="random")
    refused = r"notop.safetensors: holds no classifier \(FC6 to FC8\), so it cannot give FC7"
    with pytest.raises(UserError, match=refused):
        extract_features([notop], photos, settings=settings())


def test_cli_writes_features_and_errors_are_one_line(net, photos, tmp_path, capsys):
    out = tmp_path / "f.npz"
    argv = ["features", "--weights", str(net), "--data", str(photos), "--out", str(out), "--workers", "0",
            "--device", "cpu", "--no-progress"]
    assert main([*argv, "--scales", "32,40", "--aggregate", "average"]) == 0
    assert "12 images x 256 features" in capsys.readouterr().out
    assert Features.load(out).features.shape == (12, FC7)
    assert main([*argv, "--scales", "16,32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--scales 16 is smaller than the crop 32" in err and "\n" not in err
    assert main([*argv, "--scales", "32", "--aggregate", "average"]) == 2  # one scale: nothing to join
    assert "--aggregate average joins the descriptors of several scales, and --scales gives one (32)" in (
        capsys.readouterr().err)
    assert main(["features", "--data", str(photos), "--out", str(out)]) == 2
    assert "--weights SOURCE" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"junk.npz: not a features file \(not a .npz archive: it begins b.junk.\)"):
        Features.load(tmp_path / "junk.npz")


def test_a_truncated_or_damaged_partial_extraction_is_one_line_naming_it(net, photos, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "f.npz"
    argv = ["features", "--weights", str(net), "--data", str(photos), "--out", str(out), "--scales", "32",
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--no-progress"]  # as the partial's
    partial = Path(f"{out}.partial")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(passes, "describe_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        extract_features([net], photos, out, settings(scales=(32,)))
    monkeypatch.undo()
    whole = partial.read_bytes()
    with np.load(partial) as npz:
        arrays = dict(npz)
    partial.write_bytes(whole[: len(whole) // 2])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{partial}: not a readable .npz file" in err and "\n" not in err
    for name, value in [("net0_Q32", np.full_like(arrays["net0_Q32"], np.nan)), ("done", arrays["done"][:, :3])]:
        with open(partial, "wb") as f:
            np.savez(f, **(arrays | {name: value}))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"{partial}: damaged partial extraction ({name}" in err and "\n" not in err
    assert not out.exists()


def test_sizes_beyond_the_memory_are_refused_up_front(photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "f.npz"
    for flags, message in [(["--raw-pixels", "100000"], "argument --raw-pixels: the side must be from 1 to 2048"),
                           (["--raw-pixels", "8", "--scales", "100000"], "argument --scales: a test scale Q must be")]:
        with pytest.raises(SystemExit) as refused:
            main(["features", "--data", str(photos), "--out", str(out), *flags])
        err = capsys.readouterr().err.strip()
        assert refused.value.code == 2 and "\n" not in err and message in err and "2048" in err
    with pytest.raises(UserError, match="a test scale Q must be from 1 to 2048 pixels"):
        RescaleTransform(100000)
    monkeypatch.setattr("verydeep.eval.features.available_memory_bytes", lambda: 10**6)
    with pytest.raises(UserError, match=r"--raw-pixels 64: the descriptors of 12 images take 0.00177 GB .* more than "
                                        r"the 0.001 GB available"):
        raw_pixel_features(photos, 64, settings())
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--scales", "32"], ["--aggregate", "average"], ["--precision", "bf16"],
                                   ["--checkpoint-every", "3"], ["--weights-dir", "{dir}"],
                                   ["--scales", "32", "--aggregate", "stack"]])
def test_net_flags_beside_raw_pixels_are_refused(photos, tmp_path, capsys, flags):
    out = tmp_path / "rp.npz"
    argv = ["features", "--raw-pixels", "8", "--data", str(photos), "--out", str(out), "--workers", "0",
            "--no-progress", "--batch-size", "3"]
    given = [flag.format(dir=tmp_path) for flag in flags]
    assert main([*argv, *given]) == 2
    err = capsys.readouterr().err
    named = ", ".join(flag for flag in flags if flag.startswith("--"))
    assert err.count("\n") == 1 and not out.exists()
    assert f"--raw-pixels 8 describes images without a net; {named} would have no effect" in err
    assert main(argv) == 0 and Features.load(out).features.shape == (12, 3 * 8 * 8)  # loader flags do act


@pytest.mark.skipif(os.name != "posix", reason="file names of any bytes are POSIX's")
def test_a_file_name_that_is_not_utf8_is_trained_on_and_described(net, photos, tmp_path):
    from conftest import tiny

    from verydeep.train import train

    data = shutil.copytree(photos, tmp_path / "data")
    odd = os.fsencode(data / "train" / "c0") + b"/caf\xe9.png"  # Latin-1, as archives made on Windows name files
    save(photo(48, 40, seed=99), Path(os.fsdecode(odd)))
    assert train(tiny(data, tmp_path / "run", batch_size=4, crop=32, scale=(36, 36))).steps == 1
    out = tmp_path / "f.npz"
    assert main(["features", "--weights", str(net), "--data", str(data / "train"), "--out", str(out), "--workers",
                 "0", "--device", "cpu", "--no-progress", "--scales", "32"]) == 0
    assert os.fsdecode(odd) in Features.load(out).paths
