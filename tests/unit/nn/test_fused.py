"""The trunk on a CPU: conv + ReLU pairs in one oneDNN call, the same values and gradients as the modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from verydeep import vgg
from verydeep.nn import fused
from verydeep.nn.fused import run_trunk

pytestmark = pytest.mark.skipif(not fused._fusable(), reason="this torch build has no oneDNN fused convolution")


def calls_of_fused_convolutions(monkeypatch) -> list[str]:
    """The names of the fused calls made from now on: conv_relu, or conv_relu_pool (a pair and its pooling)."""
    calls: list[str] = []

    def counting(name):
        function = getattr(fused, name)

        def counted(conv, x):
            calls.append(name)
            return function(conv, x)
        return counted

    for name in ("conv_relu", "conv_relu_pool"):
        monkeypatch.setattr(fused, name, counting(name))
    return calls


@pytest.mark.parametrize("config, batch_norm", [("A", False), ("A-LRN", False), ("C", False), ("A", True)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_fused_trunk_gives_the_modules_values_bit_for_bit(monkeypatch, config, batch_norm, dtype, channels_last):
    torch.manual_seed(0)
    model = vgg(config, batch_norm=batch_norm, width=1 / 8, input_size=32, num_classes=5).eval()
    if dtype is not None:  # held as `eval` holds a net: weights in bf16, run under autocast
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.to(dtype)
    x = torch.randn(3, 3, 64, 48)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
        expected = model.features(x)
        got = run_trunk(model.features, x)
        dense_expected = model.dense().head(model.features(x))
        dense_got = model.dense()(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(dense_got, dense_expected)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.features)
    assert len(calls) == (0 if batch_norm else 2 * convs)  # batch norm sits between: nothing to fuse


def tiny_net(monkeypatch, channels_last: bool = False) -> torch.nn.Module:
    """Configuration A at 1/8 width on 32-pixel crops, every pair fused in training however small."""
    monkeypatch.setattr(fused, "MIN_TRAINING_ELEMENTS", 0)
    torch.manual_seed(0)
    model = vgg("A", width=1 / 8, input_size=32, num_classes=5)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_in_training_the_fused_pairs_give_the_modules_gradients_bit_for_bit(monkeypatch, dtype, channels_last):
    model = tiny_net(monkeypatch, channels_last)
    model.features[0].weight.requires_grad_(False)  # a frozen layer: no gradient asked of it
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last if channels_last
                                              else torch.contiguous_format).requires_grad_()  # as a saliency map asks

    def gradients(forward):
        model.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):
            out = forward(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out, [x.grad] + [p.grad for p in model.features.parameters() if p.requires_grad]

    expected, expected_grads = gradients(model.features)
    calls = calls_of_fused_convolutions(monkeypatch)
    got, got_grads = gradients(lambda inputs: run_trunk(model.features, inputs))
    assert torch.equal(got, expected) and model.features[0].weight.grad is None
    assert all(torch.equal(a, b) for a, b in zip(got_grads, expected_grads, strict=True))
    assert len(calls) == sum(isinstance(m, torch.nn.Conv2d) for m in model.features)
    assert calls.count("conv_relu_pool") == sum(isinstance(m, torch.nn.MaxPool2d) for m in model.features)


@pytest.mark.parametrize("size", [(36, 44), (33, 35)])
def test_a_pooling_that_drops_a_row_or_a_column_gives_the_modules_gradients(monkeypatch, size):
    """Where a 2x2 pooling floors an odd side, the values it leaves out get no gradient, fused or not."""
    model = tiny_net(monkeypatch, channels_last=True).eval()
    x = torch.randn(2, 3, *size).contiguous(memory_format=torch.channels_last)
    weights = list(model.features.parameters())

    def gradients(trunk):
        with torch.autocast("cpu", torch.bfloat16):
            out = trunk(x)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return out, torch.autograd.grad((out.float() * upstream).sum(), weights)

    expected, expected_grads = gradients(model.features)
    calls = calls_of_fused_convolutions(monkeypatch)
    got, got_grads = gradients(lambda t: run_trunk(model.features, t))
    assert "conv_relu_pool" in calls and torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, expected_grads, strict=True))


def test_a_tapped_relu_before_a_pooling_is_kept_in_training(monkeypatch):
    """extract of a ReLU's output that a pooling follows, with autograd: the pair is fused, the pooling apart."""
    model = tiny_net(monkeypatch).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = model.features[:2](x)
    calls = calls_of_fused_convolutions(monkeypatch)
    got = model.extract(x, ["relu1_1", "pool1"])
    assert calls == ["conv_relu"] and torch.equal(got["relu1_1"], expected)
    assert torch.equal(got["pool1"], F.max_pool2d(expected, 2, 2))


def test_a_gradient_of_a_gradient_is_the_modules(monkeypatch):
    """A Hessian-vector product through the fused pairs (their backward is differentiable) is the modules'."""
    model = tiny_net(monkeypatch).eval()  # no dropout: both products of the same function
    x, v = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    labels = torch.tensor([1, 3])
    calls = calls_of_fused_convolutions(monkeypatch)

    def loss(trunk):
        return lambda inputs: F.cross_entropy(model.classifier(torch.flatten(trunk(inputs), 1)), labels)

    _, fused_hvp = torch.autograd.functional.hvp(loss(lambda t: run_trunk(model.features, t)), x, v)
    assert calls
    _, modules_hvp = torch.autograd.functional.hvp(loss(model.features), x, v)
    assert modules_hvp.abs().sum() > 0 and torch.allclose(fused_hvp, modules_hvp, rtol=1e-4, atol=1e-9)


def test_what_the_fused_pairs_cannot_do_takes_the_modules(monkeypatch):
    """float64 (no oneDNN kernel), torch.func and forward-mode AD, a module's backward hook: the modules run."""
    model = tiny_net(monkeypatch).double()
    calls = calls_of_fused_convolutions(monkeypatch)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: run_trunk(model.features, t).sum(), (x,), fast_mode=True)
    model.float()
    x = torch.randn(2, 3, 32, 32)  # two images: torch's convolution of one small one is not oneDNN's
    grad = torch.func.grad(lambda t: run_trunk(model.features, t).sum())(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(run_trunk(model.features, dual)).tangent
    assert not calls and grad.shape == x.shape and tangent is not None
    fired: list[int] = []
    model.features[1].inplace = False  # torch refuses a full backward hook before an in-place ReLU
    handle = model.features[0].register_full_backward_pre_hook(lambda module, grad_output: fired.append(1))
    run_trunk(model.features, x.clone().requires_grad_()).sum().backward()
    handle.remove()
    assert fired == [1] and len(calls) == sum(isinstance(m, torch.nn.Conv2d) for m in model.features) - 1


def test_a_subclass_hooks_on_the_trunk_and_an_unbatched_crop_take_the_modules(monkeypatch):
    """A Conv2d subclass's own forward runs (fused, it would be skipped); hooks on the trunk itself fire; oneDNN's
    convolution takes batches only."""
    model = tiny_net(monkeypatch)
    calls = calls_of_fused_convolutions(monkeypatch)
    seen: list[str] = []

    class Scaled(torch.nn.Conv2d):
        def forward(self, x):
            seen.append("own forward")
            return super().forward(x) * 0.5

    scaled = Scaled(3, model.features[0].out_channels, 3, padding=1)
    scaled.load_state_dict(model.features[0].state_dict())
    model.features[0] = scaled
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert torch.equal(run_trunk(model.features, x), model.features(x)) and seen == ["own forward"] * 2
    assert len(calls) == sum(type(m) is torch.nn.Conv2d for m in model.features)
    calls.clear()
    handle = model.features.register_forward_hook(lambda module, inputs, output: seen.append("trunk hook"))
    run_trunk(model.features, x)
    handle.remove()
    assert seen[-1] == "trunk hook" and not calls
    crop = torch.randn(3, 32, 32, requires_grad=True)
    assert torch.equal(run_trunk(model.features, crop), model.features(crop)) and not calls


def test_in_training_a_small_pair_runs_as_its_modules(monkeypatch):
    """Below MIN_TRAINING_ELEMENTS outputs a pair costs more fused than apart; without autograd it is fused."""
    model = vgg("A", width=1 / 8, input_size=32, num_classes=5)
    calls = calls_of_fused_convolutions(monkeypatch)
    x = torch.randn(2, 3, 32, 32)  # outputs of 2 x 8 x 32 x 32 at most
    run_trunk(model.features, x).sum().backward()
    assert not calls
    with torch.no_grad():
        run_trunk(model.features, x)
    assert calls


def test_a_nan_in_the_input_comes_through_as_through_the_modules(monkeypatch):
    model = vgg("A", width=1 / 8, input_size=32, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 5, 5] = float("nan")
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.no_grad():
        scores, taps = model(x), model.extract(x, ["relu1_1"])
    assert scores.isnan().all() and taps["relu1_1"].isnan().any() and not calls  # oneDNN's ReLU makes NaN 0
    with torch.no_grad(), pytest.raises(TypeError, match="expected float images"):  # as with autograd: to_input
        model(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad(), pytest.raises(TypeError, match="expected a tensor of images; got a ndarray"):
        model(np.zeros((1, 3, 32, 32), np.float32))


def modules(model, x):
    """The trunk run module by module, as ``nn.Sequential`` runs it."""
    return torch.nn.Sequential.__call__(model.features, x)


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_a_nan_arising_inside_the_net_comes_out_as_through_the_modules(monkeypatch, precision):
    """Finite weights so large that the second convolution overflows: oneDNN's ReLU would make its NaN 0, and the
    net's outputs ordinary posteriors; the pairs past the first take the modules."""
    model = vgg("A", width=1 / 16, input_size=32, num_classes=5).eval()
    with torch.no_grad():
        for i in (0, 3):
            model.features[i].weight.mul_(1e20)
    x = torch.randn(2, 3, 32, 32)
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", precision, enabled=precision != torch.float32):
        got, expected = model(x), model.classifier(torch.flatten(modules(model, x), 1))
    assert got.isnan().all() and torch.equal(got.isnan(), expected.isnan()) and calls == ["conv_relu"]


def test_a_bound_grown_too_loose_is_measured_again_from_the_values_at_hand(monkeypatch):
    """The bound multiplies the weights' largest sums layer by layer, far above the values of a deep net: where it
    would pass the limit, the values at hand are measured again, and every pair is still fused."""
    monkeypatch.setattr(fused, "HEADROOM", torch.finfo(torch.float32).max / 1e4)  # a limit of 1e4
    measured = []
    largest = fused._largest_magnitude
    monkeypatch.setattr(fused, "_largest_magnitude", lambda x: measured.append(1) or largest(x))
    torch.manual_seed(0)
    model = vgg("E", width=1 / 16, input_size=32, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.no_grad():
        got, expected = run_trunk(model.features, x), modules(model, x)
    assert torch.equal(got, expected) and len(calls) == 16 and len(measured) > 1


def test_one_small_fp32_image_which_torch_convolves_with_its_own_kernel_takes_the_modules(monkeypatch):
    """torch's convolution of one fp32 image of up to 20480 values is its own, whose sums round otherwise than
    oneDNN's: fused, relu1_1 differed by 5e-7. Two images, or a larger one, are oneDNN's either way."""
    torch.manual_seed(0)
    model = vgg("D", width=1 / 4, input_size=32, num_classes=10).eval()
    calls = calls_of_fused_convolutions(monkeypatch)
    for x in (torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(1, 3, 96, 96)):
        with torch.no_grad():
            got = model.extract(x, ["relu1_1", "relu3_3", "pool5"])
            expected = {name: model.features[:int(model.tap_names[name].split(".")[1]) + 1](x) for name in got}
        assert all(torch.equal(got[name], expected[name]) for name in got)
    assert calls  # the two images, and the larger one


def test_a_pooled_output_changed_in_place_gives_the_modules_gradients(monkeypatch):
    """Pooling's module keeps its input alone: its output may change in place before the backward pass."""
    model = tiny_net(monkeypatch)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)

    def gradient(trunk):
        x.grad = None
        trunk(x).mul_(2).sum().backward()
        return x.grad

    calls = calls_of_fused_convolutions(monkeypatch)
    assert torch.equal(gradient(lambda t: run_trunk(model.features, t)), gradient(lambda t: modules(model, t)))
    assert "conv_relu_pool" in calls


def test_what_the_modules_refuse_the_fused_trunk_refuses(monkeypatch):
    """An input too small for the last pooling (which the net refuses before its trunk, but the trunk is run alone
    too), a bf16 input to fp32 weights without autocast, an fp32 input to float64 weights: torch's own errors, not
    empty maps or oneDNN's casts."""
    model = vgg("A", width=1 / 16, input_size=32, num_classes=5).eval()
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="Output size is too small"):
            run_trunk(model.features, torch.randn(2, 3, 16, 16))
        assert calls  # the pairs before the last pooling
        calls.clear()
        with pytest.raises(RuntimeError, match="should be the same"):
            model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
        with pytest.raises(RuntimeError, match="should be the same"):
            model.double()(torch.randn(2, 3, 32, 32))
    assert not calls


def test_a_tensor_subclass_sees_the_modules(monkeypatch):
    """A subclass's own dispatch (``__torch_function__``) sees every convolution, as through the modules."""
    seen: list[str] = []

    class Watched(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", ""))
            return super().__torch_function__(func, types, args, kwargs or {})

    model = vgg("A", width=1 / 16, input_size=32, num_classes=5).eval()
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32).as_subclass(Watched))
    assert not calls and seen.count("conv2d") == 8


def test_compiling_sees_the_modules(monkeypatch):
    calls = calls_of_fused_convolutions(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        vgg("A", width=1 / 8, input_size=32, num_classes=5).eval()(torch.randn(1, 3, 32, 32))
    assert not calls


def test_a_convolution_a_hook_watches_runs_on_its_own(monkeypatch):
    """Hooks (the bench's MAC count, its probe of convolution shapes) see every convolution they watch."""
    model = vgg("A", width=1 / 8, input_size=32, num_classes=5).eval()
    seen: list[torch.nn.Module] = []
    handle = model.features[3].register_forward_hook(lambda module, inputs, output: seen.append(module))
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.features)
    assert seen == [model.features[3]] and len(calls) == convs - 1


@pytest.mark.parametrize("shape", [(2, 5, 8, 6), (1, 3, 9, 7), (2, 1, 6, 6), (1, 4, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_max_pool_2x2_is_max_pool2d(shape, dtype, channels_last):
    """The same values and shape as ``max_pool2d(x, 2, 2)`` (odd sizes floored, NaN wins), in the input's
    memory format."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    x[-1, -1, -1, -1] = float("-inf")
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    expected, got = torch.nn.functional.max_pool2d(x, 2, 2), fused.max_pool_2x2(x)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())
    if channels_last and shape[1] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_only_plain_2x2_poolings_are_replaced():
    assert fused._plain_2x2_pool(torch.nn.MaxPool2d(2, 2)) and fused._plain_2x2_pool(torch.nn.MaxPool2d((2, 2)))
    for module in (torch.nn.MaxPool2d(3, 2), torch.nn.MaxPool2d(2, 1), torch.nn.MaxPool2d(2, 2, padding=1),
                   torch.nn.MaxPool2d(2, 2, ceil_mode=True), torch.nn.MaxPool2d(2, 2, return_indices=True),
                   torch.nn.AvgPool2d(2, 2)):
        assert not fused._plain_2x2_pool(module), module


@pytest.mark.parametrize("names", [["conv1_1"], ["relu1_1", "pool1"], ["conv3_1", "relu3_1", "pool5"],
                                   ["relu4_2", "fc7"], ["pool5", "fc6", "fc8"]])
@pytest.mark.parametrize("dense", [False, True])
def test_taps_without_autograd_are_the_modules_taps(monkeypatch, names, dense):
    """``extract`` runs the fused trunk without autograd: the same activations at every kind of tap (a
    convolution's own output keeps that convolution apart from its ReLU), as maps in the dense form too."""
    torch.manual_seed(0)
    model = vgg("A", width=1 / 8, input_size=32, num_classes=5).eval().to(memory_format=torch.channels_last)
    net = model.dense() if dense else model
    x = torch.randn(2, 3, 64 if dense else 32, 32).contiguous(memory_format=torch.channels_last)
    expected = net.extract(x, names)  # autograd on: the modules one by one
    calls = calls_of_fused_convolutions(monkeypatch)
    with torch.no_grad():
        got = net.extract(x, names)
    assert list(got) == list(expected)
    assert bool(calls) == (names != ["conv1_1"])  # the first convolution's own output: nothing fused before it
    for name in names:
        assert torch.equal(got[name], expected[name].detach()), name


def test_a_net_built_and_run_inside_inference_mode_gives_what_it_gives_outside():
    """Inference tensors keep no version counter, which the fused trunk's cached bound keys on: under
    torch.inference_mode it takes the bound every call instead."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    outside = vgg("A", num_classes=5, width=1 / 16, input_size=32).eval()
    with torch.inference_mode():
        torch.manual_seed(0)
        inside = vgg("A", num_classes=5, width=1 / 16, input_size=32).eval()
        torch.testing.assert_close(inside(x), outside(x).detach(), rtol=0, atol=0)
        torch.testing.assert_close(inside.dense()(x), outside.dense()(x).detach(), rtol=0, atol=0)
