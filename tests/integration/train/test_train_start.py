"""Fine-tuning from published weights: the architecture and convention come with them, FC8 is new
when the classes differ, --freeze and --lr-copied behave as users of torchvision expect."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED, tiny, weights

from verydeep.cli import main
from verydeep.errors import UserError
from verydeep.nn.model import VGG
from verydeep.train import train
from verydeep.train.start import copy_matching, freeze

CIFAR10 = SHARED / "cifar10"


def narrow(data, out, **options):
    """The tests' tiny run at the width of these tests' weights (1/8): a width given that differs from
    the weights' is refused; the default init, as an init is refused when every layer is copied."""
    return tiny(data, out, width=1 / 8, **{"init": "he", **options})


def torchvision_file(path, num_classes: int = 1000, seed: int = 0):
    """A state dict as torchvision saves one (keys and shapes only, no recipe): VGG-A with batch norm,
    width 1/8, for 32-pixel crops."""
    torch.manual_seed(seed)
    torch.save(VGG("A", num_classes=num_classes, batch_norm=True, width=1 / 8, input_size=32).state_dict(), path)
    return path


def test_a_new_head_for_other_classes_the_rest_copied(data, tmp_path):
    source = torchvision_file(tmp_path / "vgg11_bn-narrow.pth")
    summary = train(narrow(data, tmp_path / "run", weights=str(source), epochs=1))
    record = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert (record["config"], record["batch_norm"], record["width"]) == ("A", True, 1 / 8)  # from the weights
    assert record["start"]["format"] == "torchvision" and record["start"]["weights"] == str(source)
    assert "classifier.6.weight" not in record["start"]["copied"] and "features.0.weight" in record["start"]["copied"]
    assert record["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # torchvision's convention
    assert record["init_reason"].endswith("(the layers not copied from the weights)")  # FC8's init, and why
    assert summary.epochs == 1 and weights(tmp_path / "run")["classifier.6.weight"].shape[0] == 4


def test_freeze_and_a_lower_rate_for_copied_layers(data, tmp_path):
    source = torchvision_file(tmp_path / "source.pth", num_classes=4)
    before = torch.load(source, weights_only=True)
    train(narrow(data, tmp_path / "frozen", weights=str(source), freeze="features", dropout=0.0))
    after = weights(tmp_path / "frozen")
    # frozen means frozen: batch norm's running statistics too (its layers held in eval mode)
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("features."))
    assert not torch.equal(after["classifier.0.weight"], before["classifier.0.weight"])
    other = torchvision_file(tmp_path / "other.pth", num_classes=1000)  # FC8 new: trained at --lr
    train(narrow(data, tmp_path / "slow", weights=str(other), lr_copied=1e-12, dropout=0.0))
    slow, copied = weights(tmp_path / "slow"), torch.load(other, weights_only=True)
    assert torch.allclose(slow["classifier.3.weight"], copied["classifier.3.weight"], atol=1e-6)  # barely moves
    assert not torch.allclose(slow["classifier.6.bias"], torch.zeros(4), atol=1e-4)  # learns at --lr


def test_a_layer_frozen_at_its_random_init_is_refused(data, tmp_path):
    with pytest.raises(UserError, match="--freeze features would freeze conv1_1, which is not copied from --weights"):
        train(narrow(data, tmp_path / "a", freeze="features"))  # no --weights: every layer random
    source = torchvision_file(tmp_path / "source.pth", num_classes=1000)  # FC8 new (4 classes here)
    with pytest.raises(UserError, match="--freeze fc8 freezes every layer"):
        train(narrow(data, tmp_path / "b", weights=str(source), freeze="fc8"))
    train(narrow(data, tmp_path / "c", weights=str(source), freeze="fc7"))  # FC8 trains from its init
    assert not torch.equal(weights(tmp_path / "c")["classifier.6.bias"], torch.zeros(4))


def test_settings_for_new_layers_are_refused_when_every_layer_is_copied(data, tmp_path):
    source = torchvision_file(tmp_path / "source.pth", num_classes=4)  # the data's 4 classes: FC8 copied too
    with pytest.raises(UserError, match="--lr-copied 0.001: every layer is copied from --weights .* give their "
                                        "learning rate as --lr instead"):
        train(narrow(data, tmp_path / "a", weights=str(source), lr_copied=1e-3))
    with pytest.raises(UserError, match="--init paper: every layer is copied from --weights .*so none is "
                                        "initialised; drop it"):
        train(narrow(data, tmp_path / "b", weights=str(source), init="paper"))
    with pytest.raises(UserError, match="--recipe glorot's init xavier: every layer is copied from --weights"):
        train(narrow(data, tmp_path / "b", weights=str(source), init="xavier"),
              given={"init": "--recipe glorot's init", "weights": "--weights"})
    train(narrow(data, tmp_path / "c", weights=str(source), init="he", lr=1e-3))  # he: the default, not given
    record = json.loads((tmp_path / "c" / "recipe.json").read_text())
    assert record["init_reason"] == "every tensor copied from the weights (start): none initialised"  # no init ran
    with pytest.raises(UserError, match="--freeze conv9_9: not a layer"):
        train(narrow(data, tmp_path / "bad", weights=str(source), freeze="conv9_9"))


@pytest.mark.real_data("cifar10")
def test_fine_tuning_a_torchvision_file_on_ten_real_classes_beats_chance(tmp_path):
    source = torchvision_file(tmp_path / "vgg11_bn-narrow.pth")
    cfg = narrow(CIFAR10, tmp_path / "run", weights=str(source), crop=32, scale=(36, 40), batch_size=64, lr=0.02,
               epochs=2, limit_train=5120, limit_val=500, init="he")
    summary = train(cfg)
    assert summary.best > 20.0, summary  # chance: 10%


def test_fc8_of_other_named_classes_is_not_copied(data, tmp_path):
    from verydeep.io.checkpoint import export_safetensors, model_from_recipe

    recipe = {"config": "A", "num_classes": 4, "outputs": 4, "batch_norm": True, "width": 1 / 8, "dropout": 0.5,
              "crop": 32, "classes": ["cat", "dog", "cow", "emu"], "class_names": ["cat", "dog", "cow", "emu"]}
    export_safetensors(model_from_recipe(recipe), recipe, tmp_path / "animals.safetensors")
    train(narrow(data, tmp_path / "run", weights=str(tmp_path / "animals.safetensors")))
    copied = json.loads((tmp_path / "run" / "recipe.json").read_text())["start"]["copied"]
    assert "classifier.3.weight" in copied and "classifier.6.weight" not in copied  # class0..class3 are others


def test_a_layer_is_copied_whole_or_not_at_all(tmp_path):
    target = VGG("A", num_classes=4, width=1 / 8, input_size=32)
    source = VGG("A", num_classes=4, width=1 / 8, input_size=64).state_dict()  # FC6: same bias, other weight
    bias_before = target.classifier[0].bias.detach().clone()
    copied, new = copy_matching(target, source)
    assert "classifier.0.bias" in new and "classifier.0.weight" in new and "classifier.0.bias" not in copied
    assert torch.equal(target.classifier[0].bias, bias_before)
    assert "classifier.3.weight" in copied and torch.equal(target.classifier[3].weight, source["classifier.3.weight"])


def test_the_start_names_what_was_not_copied(data, tmp_path, capsys):
    source = tmp_path / "other-crop.pth"
    torch.save(VGG("A", num_classes=4, batch_norm=True, width=1 / 8, input_size=64).state_dict(), source)
    train(narrow(data, tmp_path / "run", weights=str(source)))
    said = [line for line in capsys.readouterr().err.splitlines() if "not copied" in line]
    assert said == [f"warning: {source}: not copied (not in the file, another shape, other classes or another "
                    "task), he init: fc6"]


def test_a_net_of_other_crops_is_fine_tuned_at_its_crop_and_scales_unless_they_are_given(data, tmp_path):
    source = tmp_path / "source"
    train(tiny(data, source, scale=(36, 44)))
    flags = ["train", "--data", str(data), "--weights", str(source), "--batch-size", "16", "--epochs", "1",
             "--workers", "0", "--precision", "fp32", "--device", "cpu", "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "tuned")]) == 0  # no --crop: 32 and 36:44, not 224 and 256
    record = json.loads((tmp_path / "tuned" / "recipe.json").read_text())
    assert (record["crop"], record["scale"]) == (32, [36, 44]) and "classifier.0.weight" in record["start"]["copied"]
    assert main([*flags, "--scale", "40", "--out", str(tmp_path / "at-40")]) == 0
    record = json.loads((tmp_path / "at-40" / "recipe.json").read_text())
    assert (record["crop"], record["scale"]) == (32, [40, 40])
    assert main([*flags, "--crop", "64", "--scale", "64", "--out", str(tmp_path / "at-64")]) == 0
    record = json.loads((tmp_path / "at-64" / "recipe.json").read_text())
    assert record["crop"] == 64 and "classifier.0.weight" not in record["start"]["copied"]  # FC6 sees a 2x2 map


def test_preprocess_may_change_the_statistics_not_the_channels_or_scale_the_weights_take(data, tmp_path):
    from dataclasses import replace

    from verydeep.data import IMAGENET
    from verydeep.io.checkpoint import save_checkpoint
    from verydeep.io.weights import CAFFE

    recipe = {"config": "A", "num_classes": 4, "batch_norm": False, "width": 1 / 16, "dropout": 0.5, "crop": 32,
              "preprocess": CAFFE.to_dict()}
    source = save_checkpoint({"model": VGG("A", num_classes=4, width=1 / 16, input_size=32).state_dict(),
                              "recipe": recipe}, tmp_path / "caffe-like.pt")
    with pytest.raises(UserError, match=r"^--preprocess gives RGB input on 0\.\.1, but --weights .*caffe-like\.pt take "
                                        r"BGR on 0\.\.255: drop --preprocess"):
        train(tiny(data, tmp_path / "rgb", weights=str(source), preprocess=IMAGENET))
    assert not (tmp_path / "rgb" / "recipe.json").exists()
    ours = replace(CAFFE, mean=(0.5, 0.5, 0.5))  # other statistics in the weights' convention
    train(tiny(data, tmp_path / "bgr", weights=str(source), preprocess=ours))
    record = json.loads((tmp_path / "bgr" / "recipe.json").read_text())
    assert record["preprocess"] == ours.to_dict()


def test_freezing_every_layer_is_refused_up_front(data, tmp_path):
    source = torchvision_file(tmp_path / "source.pth", num_classes=4)
    with pytest.raises(UserError, match="--freeze fc8 freezes every layer of VGG-A-BN: nothing would be trained"):
        train(narrow(data, tmp_path / "run", weights=str(source), freeze="fc8"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_frozen_batch_norm_stays_in_eval_mode_through_train_calls():
    model = VGG("A", num_classes=4, batch_norm=True, width=1 / 8, input_size=32)
    freeze(model, "conv2_1", [name for name, _ in model.named_parameters()])  # as if all copied
    model.train()
    modes = {name: m.training for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert [modes[f"features.{i}"] for i in (1, 5)] == [False, False]  # bn1_1 and bn2_1: frozen
    assert all(mode for name, mode in modes.items() if name not in ("features.1", "features.5"))


def test_an_edited_record_of_the_copied_tensors_is_refused_on_resume_naming_it(data, tmp_path, capsys):
    """The copied tensors make --lr-copied's group, which the checkpoint's optimizer state holds: a record of
    another form, or of other tensors, is one line naming it, not torch's error about parameter groups."""
    source = torchvision_file(tmp_path / "source.pth", num_classes=1000)
    run = tmp_path / "run"
    train(narrow(data, run, weights=str(source), lr_copied=1e-3, epochs=1))
    capsys.readouterr()  # the training's warning of the new FC8
    record, last = run / "recipe.json", run / "checkpoints" / "last.pt"
    settings = json.loads(record.read_text())
    resume = ["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]
    for start, message in [(5, f"{record}: start must hold 'copied', the names of the tensors copied from the "
                               "weights; got 5"),
                           ({**settings["start"], "copied": "features.0.weight"}, f"{record}: start must hold"),
                           ({**settings["start"], "copied": []}, f"--resume: {record} and {last} name other "
                                                                 "tensors copied from the weights (start): one of "
                                                                 "them was edited")]:
        record.write_text(json.dumps({**settings, "start": start}))
        assert main(resume) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"verydeep train: error: {message}"), err
    record.write_text(json.dumps(settings))
    assert main(resume) == 0
