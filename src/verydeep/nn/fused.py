"""The trunk on a CPU: each convolution with its ReLU in one oneDNN call, and in inference 2x2 max-pooling
without the indices it would keep for a backward pass.

VGG's trunk is thirteen to sixteen conv + ReLU pairs and five 2x2 max-poolings (Sec. 2.1). Run one
module at a time, each ReLU reads and writes back the whole activation the convolution has just
written; oneDNN applies the ReLU as the convolution writes its output, with the same arithmetic (the
same values, bit for bit, for a finite input: its ReLU maps NaN to 0, so a non-finite one takes the
modules). In training the pair's backward pass is the modules' own (ReLU's gradient from the output, then
the convolution's), so the gradients are the same bit for bit too, and the pairs of small outputs stay
modules; a NaN arising inside the net shows in the gradients (whose check skips the step), not in the loss.
torch's max-pooling on a CPU computes and writes an int64 index for every output, four times the bytes of a
bf16 output, even where no gradient will need them; without autograd the maxima of the four shifted views are
the same values without them (training keeps torch's pooling: the maximum's gradient splits ties where
pooling's does not). In training, a pair that such a pooling follows runs with it as one autograd function,
which takes ReLU's gradient at the pooled output, a quarter of the values (:class:`ConvReLUPool`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

#: The dtypes oneDNN's fused convolution takes (float64 is not among them).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: In training, a pair is fused when its output has at least this many elements: the ReLU pass it saves (two
#: megabytes and more in bf16) then outweighs the autograd function's own cost, two Python calls a step; fusing
#: every pair, small nets trained 2-10% slower (docs/benchmarks.md).
MIN_TRAINING_ELEMENTS = 1 << 20


@functools.cache
def _built_with_fused_convolution() -> bool:
    """oneDNN's fused convolution is in this build of torch (asked once)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _fusable() -> bool:
    """oneDNN's fused convolution is in this build, and nothing is tracing, compiling, exporting or
    transforming the model (torch.func, forward-mode AD: those see the modules)."""
    # asked first: a compiler then never traces the cached question
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return False
    return _built_with_fused_convolution()


def _fast(x: Tensor) -> bool:
    """The fused path applies: ``x`` on a CPU, oneDNN's fused convolution at hand, and ``x`` floating-point and
    finite (oneDNN's fused ReLU maps NaN to 0, where ``nn.ReLU`` keeps it; weights are checked finite when
    loaded, and a training step with a non-finite gradient is skipped)."""
    # integer images and arrays: the modules refuse them; float64: oneDNN has no kernel for it; an unbatched
    # (C, H, W) crop: oneDNN's convolution takes batches only
    return (isinstance(x, Tensor) and x.device.type == "cpu" and x.dim() == 4 and x.dtype in FUSED_DTYPES
            and _fusable() and _finite(x))


def _finite(x: Tensor) -> bool:
    """Every element of ``x`` is finite: its sum is (a NaN or an infinity makes it NaN or infinite; a sum
    overflowing only sends a finite input to the modules). One pass over ``x``, a fraction of
    ``isfinite().all()``'s."""
    return bool(torch.isfinite(x.detach().sum(dtype=torch.float32)))


def _hooked(module: nn.Module) -> bool:
    """Whether a hook watches ``module`` (a MAC count, a probe of shapes, a backward hook): it runs on its own
    then."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    shared = nn.modules.module
    return any(own) or bool(shared._global_forward_hooks or shared._global_forward_pre_hooks
                            or shared._global_backward_hooks or shared._global_backward_pre_hooks)


def conv_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``relu(conv(x))`` in one oneDNN call, in the dtype autocast would give the convolution; differentiable."""
    x, weight, bias = _operands(conv, x)
    if torch.is_grad_enabled():
        return ConvReLU.apply(x, weight, bias, conv)
    return _convolution_relu(x, weight, bias, conv)


def conv_relu_pool(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``max_pool2d(relu(conv(x)), 2, 2)`` as :func:`conv_relu` then torch's pooling, in training: ReLU's mask is
    applied to the pooled gradient, a quarter of the values (:class:`ConvReLUPool`)."""
    return ConvReLUPool.apply(*_operands(conv, x), conv)


def _operands(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``x`` and ``conv``'s weight and bias in the dtype autocast would give the convolution."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else conv.weight.dtype
    return x.to(dtype), conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)


def _convolution_relu(x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
    """oneDNN's convolution of ``x`` by ``weight`` and ``bias`` at ``conv``'s settings, its output through ReLU."""
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                  list(conv.dilation), conv.groups, "relu", [], "")


class ConvReLU(torch.autograd.Function):
    """``relu(conv(x))`` forward in one oneDNN call; backward as autograd runs the two modules' (ReLU's
    gradient from the output, then the convolution's), so gradients are theirs bit for bit. The backward is
    made of differentiable operations: a gradient of a gradient (a Hessian-vector product) is the modules' too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
        y = _convolution_relu(x, weight, bias, conv)
        ctx.save_for_backward(x, weight, y)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, y = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, y, 0)
        return (*_convolution_backward(ctx, grad, x, weight), None)


class ConvReLUPool(torch.autograd.Function):
    """``max_pool2d(relu(conv(x)), 2, 2)``: the fused convolution, then torch's pooling with its indices. Pooling
    sends each output's gradient to the one input its index names, whose ReLU output is the pooled value; so ReLU's
    gradient, taken from the pooled output before pooling's backward rather than from the whole output after it,
    is the modules' bit for bit, at a quarter of the memory traffic (VGG's largest activations, each block's last)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
        y = _convolution_relu(x, weight, bias, conv)
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(y, [2, 2], [2, 2])
        ctx.save_for_backward(x, weight, y, pooled, indices)
        ctx.conv, ctx.has_bias = conv, bias is not None
        ctx.mark_non_differentiable(indices)
        return pooled

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, y, pooled, indices = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, pooled, 0)
        grad = torch.ops.aten.max_pool2d_with_indices_backward(grad, y, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                                indices)
        return (*_convolution_backward(ctx, grad, x, weight), None)


def _convolution_backward(ctx: Any, grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients to ``x``, the weight and the bias that ``ctx``'s function needs, from the gradient to its
    convolution's output."""
    conv = ctx.conv
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0, 0], conv.groups, wanted)


def _worth_fusing(conv: nn.Conv2d, x: Tensor) -> bool:
    """Without autograd always; in training when the pair's output (about ``x``'s size at ``conv``'s channels) has
    at least :data:`MIN_TRAINING_ELEMENTS` elements."""
    return not torch.is_grad_enabled() or x.numel() // max(x.shape[1], 1) * conv.out_channels >= MIN_TRAINING_ELEMENTS


def max_pool_2x2(x: Tensor) -> Tensor:
    """``max_pool2d(x, 2, 2)`` of a 4-D ``x`` as the maximum of its four shifted views, in ``x``'s memory format
    (NaN wins, as in pooling; an odd last row or column is left out)."""
    last = x.stride(1) == 1 and x.shape[1] > 1  # channels_last: split the spatial dims of the NHWC view
    y = x.permute(0, 2, 3, 1) if last else x
    dim = 1 if last else 2  # the height's dimension in y; the width's is the next
    h, w = y.shape[dim] // 2, y.shape[dim + 1] // 2
    y = y.narrow(dim, 0, 2 * h).narrow(dim + 1, 0, 2 * w).unflatten(dim + 1, (w, 2)).unflatten(dim, (h, 2))
    rows = torch.maximum(y.select(dim + 1, 0), y.select(dim + 1, 1))
    out = torch.maximum(rows.select(dim + 2, 0), rows.select(dim + 2, 1))
    return out.permute(0, 3, 1, 2) if last else out


def _plain_2x2_pool(module: nn.Module) -> bool:
    """``module`` is ``nn.MaxPool2d(2, 2)``: no padding, dilation, ceiling or indices."""
    if not isinstance(module, nn.MaxPool2d) or module.ceil_mode or module.return_indices:
        return False
    settings = {"kernel_size": 2, "stride": 2, "padding": 0, "dilation": 1}
    return all(getattr(module, name) in (value, (value, value)) for name, value in settings.items())


def trunk_outputs(features: nn.Sequential, x: Tensor, kept: Collection[int] = ()) -> Iterator[tuple[int, Tensor]]:
    """``(i, output of features[i])`` in order. On a CPU each convolution followed by a ReLU runs as one call
    (:func:`conv_relu`), giving the ReLU's index alone, unless the convolution's own output is ``kept``; with
    autograd, with the 2x2 max-pooling after it unless the ReLU's output is kept (:func:`conv_relu_pool`, giving
    the pooling's index alone); without autograd each 2x2 max-pooling runs as :func:`max_pool_2x2`; never a
    module a forward hook watches."""
    return _trunk_outputs(features, x, kept, _fast(x))


def _trunk_outputs(features: nn.Sequential, x: Tensor, kept: Collection[int], fast: bool
                   ) -> Iterator[tuple[int, Tensor]]:
    """:func:`trunk_outputs`, fused where ``fast`` (:func:`_fast` of the input, asked once)."""
    pool_fast = fast and not torch.is_grad_enabled()
    modules = list(features)
    i = 0
    while i < len(modules):
        module, following, after = (modules[j] if j < len(modules) else None for j in (i, i + 1, i + 2))
        if fast and _fusable_pair(module, following, x) and i not in kept:
            if torch.is_grad_enabled() and i + 1 not in kept and _plain_2x2_pool(after) and not _hooked(after):
                x, i = conv_relu_pool(module, x), i + 2
            else:
                x, i = conv_relu(module, x), i + 1
        elif pool_fast and _plain_2x2_pool(module) and not _hooked(module) and x.dim() == 4:
            x = max_pool_2x2(x)
        else:
            x = module(x)
        yield i, x
        i += 1


def _fusable_pair(conv: nn.Module, relu: nn.Module | None, x: Tensor) -> bool:
    """``conv`` then ``relu`` can run as one call on ``x``: exactly these classes (a subclass's own forward, a
    fake-quantised weight, is not the fused call's), zero padding, no hooks, and worth it at ``x``'s size."""
    return (type(conv) is nn.Conv2d and type(relu) is nn.ReLU and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and not (_hooked(conv) or _hooked(relu)) and _worth_fusing(conv, x))


def run_trunk(features: nn.Sequential, x: Tensor) -> Tensor:
    """``features(x)``, through :func:`trunk_outputs` (faster on a CPU); in training the modules alone when not
    even the first pair, whose output is VGG's largest, is worth fusing."""
    first = next((m for m in features if isinstance(m, nn.Conv2d)), None)
    # _fast first: a compiler or an exporter must not see the size test (a guard on the batch)
    if first is None or _hooked(features) or not _fast(x) or not _worth_fusing(first, x):
        return features(x)
    out = x
    for _, output in _trunk_outputs(features, x, (), True):
        out = output
    return out
