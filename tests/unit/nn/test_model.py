"""Table 1 configurations, torchvision compatibility, dense form, init protocols."""

import json

import numpy as np
import pytest
import torch
import torchvision

from verydeep import VGG, vgg, warm_start
from verydeep.cli import main
from verydeep.errors import UserError
from verydeep.nn import configs
from verydeep.nn.init import initialise, warm_start_layers
from verydeep.nn.model import SeededDropout, dropout_keep

EXPECTED_PARAMS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", list(EXPECTED_PARAMS))
def test_parameter_counts_match_table_2(config):
    with torch.device("meta"):
        model = VGG(config)
    assert count(model) == EXPECTED_PARAMS[config]


@pytest.mark.parametrize("alias,key", list(configs.ALIASES.items()))
def test_aliases_resolve(alias, key):
    assert VGG(alias, width=1 / 16, input_size=32).config == key


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown VGG configuration 'F'"):
        VGG("F")


@pytest.mark.parametrize("width", [0, -1, float("nan"), float("inf"), "0.5"])
def test_a_width_not_positive_and_finite_is_a_clear_error(width):
    with pytest.raises(UserError, match=f"width must be positive and finite; got {width!r}"):
        VGG("A", width=width, input_size=32)


@pytest.mark.parametrize("argument, message", [
    (dict(config=None), "unknown VGG configuration None"),
    (dict(num_classes=0), "num_classes must be an int, at least 1; got 0"),
    (dict(num_classes=2.0), "num_classes must be an int, at least 1; got 2.0"),
    (dict(input_size=64.0), "input_size must be an int, a multiple of 32 .*; got 64.0"),
    (dict(dropout=float("nan")), "dropout must be a probability from 0 to below 1; got nan"),
    (dict(dropout=1), "dropout must be a probability from 0 to below 1; got 1"),
    (dict(batch_norm="no"), "batch_norm must be True or False; got 'no'"),
    (dict(adaptive_pool=1), "adaptive_pool must be True or False; got 1"),
])
def test_arguments_that_could_build_no_net_are_named(argument, message):
    with pytest.raises(UserError, match=message):
        VGG(**{"config": "A", "width": 1 / 16, "input_size": 32} | argument)
    assert VGG("A", num_classes=np.int64(3), width=np.float64(1 / 16), input_size=32).num_classes == 3
    assert VGG("A", width=1 / 16, input_size=32, batch_norm=np.bool_(True)).name == "VGG-A-BN"


def test_configuration_c_has_three_1x1_convs_and_a_lrn_one_lrn():
    c = VGG("C", width=1 / 16, input_size=32)
    kernels = [m.kernel_size[0] for m in c.conv_layers().values()]
    assert kernels.count(1) == 3 and len(kernels) == 13
    assert [n for n, m in c.conv_layers().items() if m.kernel_size[0] == 1] == ["conv3_3", "conv4_3", "conv5_3"]
    a_lrn = VGG("A-LRN", width=1 / 16, input_size=32)
    assert isinstance(a_lrn.features[2], torch.nn.LocalResponseNorm)
    assert a_lrn.features[2].size == 5 and a_lrn.features[2].k == 2.0
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in a_lrn.modules()) == 1


def test_a_lrn_normalises_as_caffe_does_with_alpha_divided_by_the_size():
    lrn = VGG("A-LRN", width=1 / 16, input_size=32).features[2]
    x = torch.rand(1, 8, 3, 3, dtype=torch.float64) * 50
    squares = torch.nn.functional.pad(x**2, (0, 0, 0, 0, 2, 2))  # the window of 5 channels around each
    window = sum(squares[:, i:i + 8] for i in range(5))
    torch.testing.assert_close(lrn(x), x / (2 + 1e-4 / 5 * window) ** 0.75)


def test_summary_json_reports_params_and_macs(capsys):
    assert main(["summary", "D", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 138_357_544
    assert report["gmacs"] == 15.47
    assert sum(r["macs"] for r in report["layers"]) == report["macs"]
    assert (report["crop"], report["input"], report["dense"]) == (224, 224, False)
    assert main(["summary", "D", "--crop", "32", "--input", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["crop"], report["input"], report["dense"]) == (32, 64, True)


def test_summary_counts_nets_too_large_to_hold_without_building_them(capsys):
    assert main(["summary", "A", "--num-classes", "3000000", "--crop", "4096", "--json"]) == 0  # ~1.6 TB of weights
    report = json.loads(capsys.readouterr().out)
    fc = {row["name"]: row["params"] for row in report["layers"]}
    assert fc["fc6"] == 512 * 128 * 128 * 4096 + 4096 and fc["fc8"] == 4096 * 3_000_000 + 3_000_000
    with pytest.raises(SystemExit) as refused:
        main(["summary", "A", "--crop", "99999968"])  # beyond what 64 bits count
    assert refused.value.code == 2 and "argument --crop: at most 65536 pixels" in capsys.readouterr().err


def test_summary_table_and_dense_form(capsys):
    assert main(["summary", "E", "--input", "256"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "conv7-4096" in out and "143,667,240" in out


def test_summary_columns_widen_to_fit_the_largest_input(capsys):
    assert main(["summary", "D", "--input", "10000000"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:-1]  # the header, the layers and the total
    header = lines[0]
    ends = [header.index(title) + len(title) for title in ("output (CxHxW)", "params", "MACs")]
    for line in lines[1:]:
        cells = line.split()
        total = cells[0] == "total"
        assert len(cells) == (3 if total else 5), line  # no two columns run together
        for cell, end in zip(cells[-2:] if total else cells[-3:], ends[-2:] if total else ends, strict=True):
            assert line[:end].endswith(cell), line  # each entry right-aligned under its title
    assert "172,800,000,000,000,000" in lines[1]


@pytest.mark.parametrize("name,config,bn", [
    ("vgg11", "A", False), ("vgg13", "B", False), ("vgg16", "D", False), ("vgg19", "E", False),
    ("vgg11_bn", "A", True), ("vgg13_bn", "B", True), ("vgg16_bn", "D", True), ("vgg19_bn", "E", True),
])
def test_torchvision_weights_load_and_match(name, config, bn):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    if bn:  # non-trivial running statistics, so that BN really is compared
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = vgg(config, batch_norm=bn).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)


def test_other_input_size_points_to_dense_form():
    model = vgg("A", width=1 / 16)
    with pytest.raises(ValueError, match=r"model.dense\(\)"):
        model(torch.randn(1, 3, 256, 256))
    adaptive = vgg("A", width=1 / 16, adaptive_pool=True)
    assert adaptive(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


def test_dense_equals_plain_and_gives_score_map():
    torch.manual_seed(0)
    model = vgg("D", width=1 / 8).eval()
    dense = model.dense()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain, scores = model(x), dense(x)
        assert scores.shape == (2, 1000, 1, 1)
        torch.testing.assert_close(scores[:, :, 0, 0], plain, atol=1e-4, rtol=0)
        assert dense(torch.randn(1, 3, 256, 320)).shape == (1, 1000, 2, 4)
    assert dense.classifier[0].weight is model.classifier[0].weight  # shared, not copied
    with pytest.raises(ValueError, match="at least 224"):
        dense(torch.randn(1, 3, 160, 320))


def test_dense_score_map_is_the_classifier_on_each_window():
    """Location (i, j) of the score map is the plain classifier on the trunk map's grid x grid window at
    (i, j), flattened as the plain model flattens pool5; the relu7 tap is that window's FC7 activation."""
    torch.manual_seed(0)
    model = vgg("A", num_classes=7, width=1 / 16, input_size=64).eval()
    dense = model.dense()
    trunk = torch.randn(2, model.classifier[0].in_features // 4, 5, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        scores = dense.head(trunk)
        assert scores.shape == (2, 7, 4, 3)
        for i, j in ((0, 0), (3, 1), (1, 2)):
            window = trunk[:, :, i:i + 2, j:j + 2].flatten(1)
            torch.testing.assert_close(scores[:, :, i, j], model.classifier(window), atol=1e-5, rtol=0)
        small = torch.randn(1, 3, 32, 32)  # under the crop: a trunk map, but no window for the classifier
        torch.testing.assert_close(dense.extract(small, ["pool5"])["pool5"], model.features(small))
        fc7 = dense.extract(torch.randn(1, 3, 128, 96), ["relu7", "fc8"])
        assert fc7["relu7"].shape == (1, 256, 3, 2) and fc7["relu7"].min() >= 0
        torch.testing.assert_close(model.classifier[6](fc7["relu7"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
                                   fc7["fc8"], atol=1e-5, rtol=0)


def test_small_input_size_keeps_structure():
    model = vgg("E", num_classes=10, width=1 / 16, input_size=32)
    assert model.classifier[0].in_features == 32  # 512/16 channels x 1x1 map
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert model.dense()(torch.randn(1, 3, 64, 96)).shape == (1, 10, 2, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        vgg("A", input_size=100)


def test_extract_named_layers_plain_and_dense():
    torch.manual_seed(0)
    model = vgg("D", num_classes=10, width=1 / 16, input_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = model.extract(x, ["relu4_3", "pool5", "fc7", "fc8"])
        assert taps["relu4_3"].shape == (1, 32, 8, 8)
        assert taps["pool5"].shape == (1, 32, 2, 2)
        torch.testing.assert_close(taps["fc8"], model(x))
        dense_taps = model.dense().extract(torch.randn(1, 3, 96, 64), ["fc7"])
        twice = model.extract(torch.randn(1, 3, 40, 40), ["relu1_1", "relu1_1"])  # one tap, any size in the trunk
        again = model.dense().extract(x, ["pool5", "fc7", "pool5"])
    assert list(twice) == ["relu1_1"] and twice["relu1_1"].shape == (1, 4, 40, 40)
    assert list(again) == ["pool5", "fc7"] and torch.equal(again["pool5"], taps["pool5"])
    assert dense_taps["fc7"].shape == (1, 256, 2, 1)
    with pytest.raises(KeyError, match="unknown layer"):
        model.extract(x, ["conv9_9"])
    for net in (model, model.dense()):  # not torch's errors from deep inside
        with pytest.raises(ValueError, match=r"expected a batch of images \(N, 3, H, W\); got .* \(3, 64, 64\)"):
            net(x[0])
        with pytest.raises(TypeError, match="expected float images .*to_input.*; got torch.uint8"):
            net(x.to(torch.uint8))
    with pytest.raises(ValueError, match=r"takes 64x64 crops .* but the input here is \(80, 80\)"):
        model(torch.randn(1, 3, 80, 80))  # one larger than the crop: refused, not its top-left crop
    with pytest.raises(TypeError, match=r"got the single name 'fc7'; give \['fc7'\]"):  # not 'f', 'c', '7'
        model.extract(x, "fc7")


def test_an_input_too_small_for_the_layers_asked_is_named_before_the_trunk_runs():
    """Not torch's "Output size is too small" from inside a pooling: the size needed, for each way in."""
    model = vgg("D", num_classes=3, width=1 / 16, input_size=64).eval()
    dense, wanted = model.dense(), r"dense evaluation needs inputs of at least 64 pixels a side"
    for side in (31, 32):
        with pytest.raises(ValueError, match=rf"{wanted} \(a 2x2 trunk map\); got \({side}, {side}\)"):
            dense(torch.randn(1, 3, side, side))
    with pytest.raises(ValueError, match=rf"{wanted} .*; got \(40, 40\)"):
        dense.extract(torch.randn(1, 3, 40, 40), ["fc7"])
    with pytest.raises(ValueError, match=r"pool5 lies after 5 2x2 poolings: it needs inputs of at least 32 pixels"):
        model.extract(torch.randn(1, 3, 16, 16), ["conv1_1", "pool5"])
    with pytest.raises(ValueError, match=r"takes 64x64 crops .* the input here is \(16, 16\)"):
        model.extract(torch.randn(1, 3, 16, 16), ["fc7"])
    assert model.extract(torch.randn(1, 3, 16, 16), ["pool4"])["pool4"].shape == (1, 32, 1, 1)  # 16 = 2^4: fits
    pooled = vgg("A", num_classes=3, width=1 / 16, input_size=32, adaptive_pool=True).eval()
    with pytest.raises(ValueError, match=r"with adaptive pooling takes inputs of at least 32 pixels a side"):
        pooled(torch.randn(1, 3, 31, 40))
    assert pooled(torch.randn(1, 3, 32, 40)).shape == (1, 3)


def test_init_protocols():
    torch.manual_seed(0)
    paper = vgg("A", init="paper")
    w = paper.features[0].weight
    assert abs(w.std().item() - 0.01) < 1e-3 and paper.features[0].bias.abs().sum() == 0
    xavier = vgg("A", init="xavier")
    fc = xavier.classifier[0].weight
    bound = (6 / (fc.shape[0] + fc.shape[1])) ** 0.5
    assert fc.abs().max() <= bound and fc.abs().max() > 0.9 * bound
    he = vgg("E", num_classes=10, width=1 / 2, input_size=32, init="he", dropout=0.0)
    assert 0.2 < he(torch.randn(8, 3, 32, 32)).std() < 5  # the signal survives 19 layers
    kaiming = vgg("E", num_classes=10, width=1 / 2, input_size=32, init="kaiming", dropout=0.0)
    assert kaiming(torch.randn(8, 3, 32, 32)).std() < 0.01  # torchvision's FC init starves narrow nets
    with pytest.raises(ValueError, match="unknown init"):
        vgg("A", init="uniform")


def test_initialising_again_resets_batch_norm_running_statistics_too():
    """A re-initialised trained net is a fresh net, in eval mode too: no statistics of the old one's batches."""
    model = vgg("A", num_classes=3, width=1 / 16, input_size=32, batch_norm=True)
    fresh = {name: value.clone() for name, value in model.state_dict().items()
             if "running" in name or "tracked" in name}
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.fill_(5), bn.running_var.fill_(9), bn.num_batches_tracked.fill_(7)
        bn.weight.data.fill_(3)
    initialise(model, "he")
    state = model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in fresh.items())
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_warm_start_copies_exactly_the_papers_layers():
    torch.manual_seed(0)
    a = vgg("A", num_classes=10, width=1 / 16, input_size=32, init="paper")
    d = vgg("D", num_classes=10, width=1 / 16, input_size=32, init="xavier")
    before = {k: v.clone() for k, v in d.state_dict().items()}
    copied = warm_start(d, a)
    assert copied == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]
    assert copied == warm_start_layers(a)
    a_layers = {**a.conv_layers(), **a.fc_layers()}
    d_layers = {**d.conv_layers(), **d.fc_layers()}
    for name in copied:
        assert torch.equal(d_layers[name].weight, a_layers[name].weight)
        assert torch.equal(d_layers[name].bias, a_layers[name].bias)
    untouched = [n for n in d_layers if n not in copied]
    assert len(untouched) == 13 + 3 - 7
    for name in untouched:
        key = d.tap_names[name] + ".weight"
        assert torch.equal(d.state_dict()[key], before[key])


def test_warm_start_copies_a_layer_whole_with_its_batch_norm_and_leaves_fc8_when_asked():
    """A convolution of a batch-norm net was trained under its batch norm's scale and statistics: both come with
    it. FC8 left out (other classes) stays as initialised; batch norm in one net only is refused."""
    torch.manual_seed(0)
    a = vgg("A", num_classes=10, width=1 / 16, input_size=32, batch_norm=True)
    for module in a.modules():  # statistics and scales of a trained net, not the init's ones and zeros
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    d = vgg("D", num_classes=10, width=1 / 16, input_size=32, batch_norm=True)
    fc8_before = d.fc_layers()["fc8"].weight.clone()
    assert warm_start(d, a, fc8=False) == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7"]
    for name in ("bn1_1", "bn2_1", "bn3_1", "bn3_2"):
        mine, theirs = d.get_submodule(d.tap_names[name]), a.get_submodule(a.tap_names[name])
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), (name, key)
    assert d.get_submodule(d.tap_names["bn1_2"]).running_var.eq(1).all()  # not a copied layer's
    assert torch.equal(d.fc_layers()["fc8"].weight, fc8_before)
    with pytest.raises(UserError, match="warm start: conv1_1 has batch norm in only one of"):
        warm_start(vgg("D", num_classes=10, width=1 / 16, input_size=32), a)


def test_warm_start_shape_mismatch_is_clear_and_copies_nothing():
    a = vgg("A", num_classes=10, width=1 / 16, input_size=32)
    d = vgg("D", num_classes=100, width=1 / 16, input_size=32)
    before = d.features[0].weight.clone()
    with pytest.raises(ValueError, match="fc8.weight"):
        warm_start(d, a)
    assert torch.equal(d.features[0].weight, before)


def splitmix64(state: int, k: int) -> int:
    """Output ``k`` (from 1) of splitmix64 seeded by ``state``, in plain integers."""
    z = (state + k * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_an_images_dropout_mask_is_its_own_in_any_batch():
    """Sec. 3.1 dropout with each image's seed: the same mask in any batch, at any position, as the
    splitmix64 stream of the image's seed says; other layers and other seeds draw other masks."""
    drop = SeededDropout(0.5, layer=6).train()
    x, seeds = torch.randn(6, 300), torch.randint(0, 2**63 - 1, (6,))
    whole = drop(x, seeds)
    order = [4, 0, 5]
    assert torch.equal(drop(x[order], seeds[order]), whole[order])
    assert torch.equal(drop(x[2:3], seeds[2:3]), whole[2:3])
    others = torch.randn(3, 300), torch.randint(0, 2**63 - 1, (3,))
    mixed = drop(torch.cat([others[0], x[:2]]), torch.cat([others[1], seeds[:2]]))
    assert torch.equal(mixed[3:], whole[:2])
    key = splitmix64(int(seeds[1]), 7)
    draws = [(splitmix64(key, j // 2 + 1) >> (32 * (j % 2)) & 0xFFFFFFFF) ^ 2**31 for j in range(301)]
    for p in (0.5, 0.3):
        expected = [draw >= round(p * 2**32) for draw in draws]
        assert dropout_keep(seeds[1:2], 6, 301, p)[0].tolist() == expected
    fc7 = SeededDropout(0.5, layer=7).train()(x, seeds)
    assert 0.4 < ((fc7 == 0) != (whole == 0)).float().mean() < 0.6  # independent of FC6's mask
    assert not torch.equal(drop(x, seeds + 1), whole)


def test_a_vgg_with_image_seeds_drops_each_images_units_whatever_its_batch():
    torch.manual_seed(0)
    model = vgg("A", num_classes=10, width=1 / 16, input_size=32).train()
    x, seeds = torch.randn(4, 3, 32, 32), torch.tensor([11, 22, 33, 44])
    whole = model(x, seeds)
    torch.testing.assert_close(model(x[[3, 1]], seeds[[3, 1]]), whole[[3, 1]], atol=1e-6, rtol=0)
    assert not torch.allclose(model(x, seeds + 1), whole)  # the masks are the seeds'


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_seeded_dropout_drops_at_rate_p_and_scales_the_kept_units(p):
    drop = SeededDropout(p, layer=7).train()
    x = torch.full((64, 4096), 3.0, requires_grad=True)
    out = drop(x, torch.arange(64) * 1_000_003)
    dropped = out == 0
    sigma = (p * (1 - p) / dropped.numel()) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    torch.testing.assert_close(out[~dropped], torch.full(((~dropped).sum().item(),), 3 / (1 - p)))
    out.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / (1 - p))


def test_without_seeds_it_is_nn_dropout_and_in_eval_the_identity():
    drop, reference = SeededDropout(0.5, layer=6).train(), torch.nn.Dropout(0.5)
    x, seeds = torch.randn(8, 100), torch.arange(8)
    torch.manual_seed(1)
    plain = drop(x)
    torch.manual_seed(1)
    assert torch.equal(plain, reference(x))
    assert torch.equal(drop.eval()(x, seeds), x)
    assert torch.equal(SeededDropout(0.0).train()(x, seeds), x)
    with pytest.raises(ValueError, match="one seed an image"):
        drop.train()(x, seeds[:3])


def test_compiled_seeded_dropout_draws_the_eager_masks():
    """Under torch.compile (as `train --compile` runs the net) an image's masks and gradients stay its own."""
    torch._dynamo.reset()
    head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU())
    drop = SeededDropout(0.5, layer=6).train()

    def forward(x, seeds):
        return drop(head(x), seeds)

    x, seeds = torch.randn(6, 32), torch.arange(6) * 7919
    eager = forward(x, seeds)
    assert torch._dynamo.explain(forward)(x, seeds).graph_break_count == 0  # the masks one op in the graph
    torch._dynamo.reset()
    compiled = torch.compile(forward)(x, seeds)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(compiled == 0, ~dropout_keep(seeds, 6, 64, 0.5) | (head(x) == 0))
