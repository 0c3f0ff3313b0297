"""verydeep.load: one loader for every source of weights, as commands and Python users call it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import verydeep
from verydeep.data import IMAGENET, Preprocess, to_input
from verydeep.errors import UserError
from verydeep.io.checkpoint import export_safetensors
from verydeep.io.weights import CAFFE, Published


def test_a_torchvision_file_loads_with_its_convention_and_imagenets_names(tmp_path):
    source = torchvision.models.vgg11()  # torchvision's layout and keys, random weights
    path = tmp_path / "vgg11.pth"
    torch.save(source.state_dict(), path)
    net = verydeep.load(path, purpose="classify")
    assert (net.name, net.format, net.preprocess) == ("A", "torchvision", IMAGENET)
    assert len(net.classes) == len(net.class_names) == 1000 and net.class_names[0] != net.classes[0]
    x = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(net.model(to_input(x, net.preprocess)), source.eval()(to_input(x, IMAGENET)))


def test_our_net_keeps_its_classes_and_a_net_without_convention_takes_the_datas(tmp_path):
    model = verydeep.vgg("A", num_classes=3, width=1 / 16, input_size=32)
    recipe = {"config": "A", "num_classes": 3, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
              "classes": ["c0", "c1", "c2"], "class_names": ["zero", "one", "two"]}
    export_safetensors(model, recipe, tmp_path / "a.safetensors", 1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "preprocess.json").write_text(json.dumps(CAFFE.to_dict()))
    net = verydeep.load(tmp_path / "a.safetensors", data=data, dtype=torch.bfloat16)
    assert (net.classes, net.class_names, net.format) == (["c0", "c1", "c2"], ["zero", "one", "two"], "verydeep")
    assert net.preprocess == Preprocess.from_dict(CAFFE.to_dict())  # the data's, the net having none
    assert not net.model.training and {p.dtype for p in net.model.parameters()} == {torch.bfloat16}
    assert verydeep.load(tmp_path / "a.safetensors").preprocess == IMAGENET
    with pytest.raises(TypeError, match="dtype: torch.bfloat16, torch.float16, torch.float32 or None; got 'bfloat16'"):
        verydeep.load(tmp_path / "a.safetensors", dtype="bfloat16")  # the name, not the dtype: refused first
    with pytest.raises(TypeError, match="got torch.float64"):  # no autocast runs a net in it
        verydeep.load(tmp_path / "a.safetensors", dtype=torch.float64)
    with pytest.raises(UserError, match="--device tpu: not a device"):
        verydeep.load(tmp_path / "a.safetensors", device="tpu")
    assert verydeep.load(tmp_path / "a.safetensors", data=data / "preprocess.json").preprocess == net.preprocess
    with pytest.raises(UserError, match=f"data: {tmp_path / 'dta'} does not exist"):  # a typo: not ImageNet's
        verydeep.load(tmp_path / "a.safetensors", data=tmp_path / "dta")


def test_weights_without_a_classifier_are_refused_only_where_one_is_needed(monkeypatch):
    import verydeep.io.sources

    model = verydeep.vgg("A", num_classes=5, width=1 / 16, input_size=32)
    recipe = {"config": "A", "num_classes": 5, "batch_norm": False, "width": 1 / 16, "crop": 32, "head": "random"}
    monkeypatch.setattr(verydeep.io.sources, "load_published",
                        lambda source, weights_dir=None: Published(model, recipe, "keras", "notop.h5"))
    assert not verydeep.load("notop.h5").has_fc_layers  # features of the conv layers, say
    with pytest.raises(UserError, match=r"notop.h5: holds no classifier \(FC6 to FC8\), so it cannot classify"):
        verydeep.load("notop.h5", purpose="classify")


def test_a_missing_source_is_one_line(tmp_path):
    with pytest.raises(UserError, match="nothing"):
        verydeep.load(tmp_path / "nothing.pth")
    save_file({"x": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(UserError, match="odd.safetensors"):
        verydeep.load(tmp_path / "odd.safetensors")


def test_a_source_or_device_of_another_type_and_an_empty_name_are_named(tmp_path, monkeypatch):
    """``load("")`` would read the working folder as a run, ``device=5`` asks torch for a GPU: each is named."""
    net = tmp_path / "net.safetensors"
    export_safetensors(verydeep.vgg("A", num_classes=2, width=1 / 16, input_size=32),
                       {"config": "A", "num_classes": 2, "batch_norm": False, "width": 1 / 16, "dropout": 0.5,
                        "crop": 32}, net)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="an empty name names no weights"):
        verydeep.load("")
    for source in (5, None):
        with pytest.raises(TypeError, match=f"source: a file, a run folder or a known name .*; got {source}"):
            verydeep.load(source)
    with pytest.raises(TypeError, match=r"device: a name \('cpu', .*\) or a torch.device; got 5"):
        verydeep.load(net, device=5)
    assert verydeep.load(net).recipe["num_classes"] == 2
    assert next(verydeep.load(net, device=None).model.parameters()).device.type == "cpu"  # None: the default


def test_a_torchscript_program_given_as_weights_is_one_line_and_no_warning(tmp_path):
    program = tmp_path / "exported.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation, not what is tested
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(program))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own two-line warning must not reach the terminal
        with pytest.raises(UserError, match="exported.pt: a TorchScript program .* not weights"):
            verydeep.load(program)
