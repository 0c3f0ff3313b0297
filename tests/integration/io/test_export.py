"""Export: ONNX of the dense net run by onnxruntime, TorchScript and ExportedProgram round trips,
the input convention in each file's metadata, the check against PyTorch, the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from verydeep.cli import main
from verydeep.data import IMAGENET
from verydeep.errors import UserError
from verydeep.io import export
from verydeep.io.checkpoint import export_safetensors, model_from_recipe, save_checkpoint
from verydeep.options import OneLineParser

#: A Caffe-style convention: BGR on 0..255 less the mean.
CAFFE = replace(IMAGENET, std=(1.0, 1.0, 1.0), channels="BGR", value_scale=255.0)
RECIPE = {"config": "A", "num_classes": 5, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
          "scale": None, "preprocess": CAFFE.to_dict(), "classes": list("abcde"), "class_names": list("ABCDE")}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A width-1/16 net A on 32-pixel crops, saved as a checkpoint whose recipe says BGR on 0..255."""
    torch.manual_seed(0)
    model = model_from_recipe(RECIPE).eval()
    path = tmp_path_factory.mktemp("net") / "net.pt"
    save_checkpoint({"model": model.state_dict(), "recipe": RECIPE}, path)
    return path, model


def inputs(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator) * 100 for shape in shapes]


def test_onnx_of_the_dense_net_equals_pytorch_at_two_sizes(net, tmp_path):
    import onnx
    import onnxruntime

    path, model = net
    result = export.export_net(path, tmp_path / "net.onnx", "onnx")
    assert result.dense and result.max_abs_difference <= export.TOLERANCE
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    assert [d if isinstance(d, int) else "dynamic" for d in session.get_inputs()[0].shape] == [
        "dynamic", 3, "dynamic", "dynamic"]
    with torch.no_grad():
        for x in inputs((1, 3, 32, 32), (3, 3, 48, 64)):
            expected = model.dense()(x)
            got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
            assert got.shape == expected.shape  # (N, 5, 1, 1) and (N, 5, 1, 2): the class score map
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "net.onnx")).metadata_props}
    assert json.loads(props["verydeep.preprocess"]) == CAFFE.to_dict()
    assert json.loads(props["verydeep.recipe"])["class_names"] == list("ABCDE")
    assert "channels BGR" in props["verydeep.input"] and "H, W >= 32" in props["verydeep.input"]


@pytest.mark.parametrize("dense", [False, True])
def test_an_exported_program_of_a_batch_norm_net_loaded_as_users_load_it_runs_a_batch_of_one(tmp_path, dense):
    torch.manual_seed(0)
    recipe = {**RECIPE, "batch_norm": True}
    model = model_from_recipe(recipe).eval()
    save_checkpoint({"model": model.state_dict(), "recipe": recipe}, tmp_path / "bn.pt")  # loaded channels_last
    out = tmp_path / "bn.pt2"
    export.export_net(tmp_path / "bn.pt", out, "exported-program", dense=dense)
    with open(out, "rb") as f:
        loaded = torch.export.load(f).module()
    with torch.no_grad():
        for x in inputs((1, 3, 32, 32), (3, 3, 32, 32)):
            torch.testing.assert_close(loaded(x), (model.dense() if dense else model)(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("crop", [64, 96])
def test_a_dense_exported_program_of_a_larger_crop_takes_every_size_from_the_crop_up(tmp_path, crop):
    torch.manual_seed(0)
    recipe = {**RECIPE, "crop": crop, "width": 1 / 32}  # FC6 sees a 2x2 or 3x3 trunk map
    model = model_from_recipe(recipe).eval()
    save_checkpoint({"model": model.state_dict(), "recipe": recipe}, tmp_path / "net.pt")
    result = export.export_net(tmp_path / "net.pt", tmp_path / "net.pt2", "exported-program", dense=True)
    assert result.dense and result.max_abs_difference <= export.TOLERANCE
    with open(tmp_path / "net.pt2", "rb") as f:
        loaded = torch.export.load(f).module()
    with torch.no_grad():
        for x in inputs((1, 3, crop, crop), (2, 3, crop, crop + 32), (1, 3, crop + 70, crop)):  # maps 1x1, 1x2, 3x1
            expected = model.dense()(x)
            torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=0)
            assert loaded(x).shape == expected.shape


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_plain_net_round_trips(net, tmp_path, fmt):
    path, model = net
    out = tmp_path / "net.bin"
    result = export.export_net(path, out, fmt)
    assert not result.dense and result.max_abs_difference <= 1e-5
    extra = {key: "" for key in result.metadata}
    if fmt == "torchscript":
        with export.quiet_torchscript():
            loaded = torch.jit.load(out, _extra_files=extra)
    else:
        with open(out, "rb") as f:
            loaded = torch.export.load(f, extra_files=extra).module()
    with torch.no_grad():
        for x in inputs((1, 3, 32, 32), (4, 3, 32, 32)):
            torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)
    stored = {key: value.decode() if isinstance(value, bytes) else value for key, value in extra.items()}
    assert stored == result.metadata and json.loads(stored["verydeep.preprocess"])["channels"] == "BGR"


def test_dense_torchscript_takes_other_sizes(net, tmp_path):
    path, model = net
    export.export_net(path, tmp_path / "dense.pt", "torchscript", dense=True)
    with export.quiet_torchscript():
        loaded = torch.jit.load(tmp_path / "dense.pt")
    x = inputs((2, 3, 64, 96))[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.dense()(x), atol=1e-5, rtol=0)


def test_a_file_that_differs_from_pytorch_is_removed_and_an_error(net, tmp_path, monkeypatch):
    path, _ = net
    reload = export.reload
    monkeypatch.setattr(export, "reload", lambda out, fmt: (lambda x: reload(out, fmt)(x) + 1e-3))
    out = tmp_path / "net.pt"
    with pytest.raises(UserError, match=r"net\.pt: the exported net's outputs differ from PyTorch's by 1\.00e-03"):
        export.export_net(path, out, "torchscript")
    assert not out.exists()


def test_the_check_is_relative_to_the_outputs_scale(net, tmp_path, monkeypatch):
    """Logits near 1e5 keep about 7 digits in float32: a difference of 1e-7 of them is agreement."""
    path, model = net
    loud = model_from_recipe(RECIPE).eval()
    loud.load_state_dict(model.state_dict())
    with torch.no_grad():
        loud.classifier[6].weight.mul_(1e6)
    weights = tmp_path / "loud.pt"
    save_checkpoint({"model": loud.state_dict(), "recipe": RECIPE}, weights)
    reload = export.reload
    monkeypatch.setattr(export, "reload", lambda out, fmt: (lambda x: reload(out, fmt)(x) * (1 + 1e-7)))
    result = export.export_net(weights, tmp_path / "loud.ts", "torchscript")
    assert result.max_abs_difference > export.TOLERANCE and result.relative_difference < export.TOLERANCE
    assert (tmp_path / "loud.ts").is_file()


def run_export(argv: list[str]) -> None:
    """``verydeep export ARGV`` through the command's own parser."""
    parser = OneLineParser(prog="verydeep")
    export.add_cli(parser.add_subparsers(parser_class=OneLineParser))
    args = parser.parse_args(["export", *argv])
    args.func(args)


def test_cli_exports_and_prints_the_check_and_the_convention(net, tmp_path, capsys):
    path, _ = net
    run_export(["--checkpoint", str(path), "--format", "exported-program", "--dense", str(tmp_path / "net.pt2")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tmp_path / 'net.pt2'}: exported-program, the dense net; largest difference")
    assert "channels BGR" in out[1] and "class score map (N, 5, H//32, W//32)" in out[2]
    with pytest.raises(UserError, match="give --weights"):
        run_export(["--format", "onnx", str(tmp_path / "x.onnx")])
    with pytest.raises(UserError, match=f"^{tmp_path / 'x.onnx'}: .onnx names onnx files, not --format torchscript; "
                                        "name it x.pt$"):
        run_export(["--weights", str(path), "--format", "torchscript", str(tmp_path / "x.onnx")])
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit):
        run_export(["--weights", str(path), "--format", "onnx", "--dense", "--plain", str(tmp_path / "x.onnx")])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["export", "--format", "torchscript"], ["convert"]])
def test_an_output_that_is_also_an_input_is_refused_before_anything_is_written(net, tmp_path, capsys, command):
    path, model = net
    weights = tmp_path / "net.safetensors"
    export_safetensors(model, RECIPE, weights)
    before = weights.read_bytes()
    source = ["--weights", str(weights)] if command[0] == "export" else [str(weights)]
    assert main([*command, *source, str(weights)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{weights}: the output is also an input" in err
    assert weights.read_bytes() == before


def test_a_second_weights_option_is_refused_not_kept(net, tmp_path, capsys):
    path, _ = net
    with pytest.raises(SystemExit) as stop:  # argparse's own one-line error
        main(["export", "--weights", str(path), "--checkpoint", str(path), "--format", "torchscript",
              str(tmp_path / "x.pt")])
    assert stop.value.code == 2 and "given twice" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
