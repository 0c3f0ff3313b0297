"""The trunk on a CPU: each convolution with its ReLU in one oneDNN call, and in inference 2x2 max-pooling
without the indices it would keep for a backward pass.

VGG's trunk is thirteen to sixteen conv + ReLU pairs and five 2x2 max-poolings (Sec. 2.1). Run one
module at a time, each ReLU reads and writes back the whole activation the convolution has just
written; oneDNN applies the ReLU as the convolution writes its output, with the same arithmetic where torch's
own convolution is oneDNN's too (the same values, bit for bit: a pair torch would convolve otherwise, one small
fp32 image, takes the modules). Its ReLU maps NaN to 0 where ``nn.ReLU`` keeps it, so a convolution is fused
only where it cannot overflow (a bound from the input's largest magnitude and the weights, asked at each call):
a non-finite input, or a NaN that would arise inside the net, comes out as through the modules. In training the
pair's backward pass is the modules' own (ReLU's gradient from the output, then the convolution's), so the
gradients are the same bit for bit too, and the pairs of small outputs stay modules.
torch's max-pooling on a CPU computes and writes an int64 index for every output, four times the bytes of a
bf16 output, even where no gradient will need them; without autograd the maxima of the four shifted views are
the same values without them (training keeps torch's pooling: the maximum's gradient splits ties where
pooling's does not). In training, a pair that such a pooling follows runs with it as one autograd function,
which takes ReLU's gradient at the pooled output, a quarter of the values (:class:`ConvReLUPool`).
"""

from __future__ import annotations

import functools
import math
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
    """The fused path applies: ``x`` a plain tensor on a CPU (a subclass's own dispatch sees the modules),
    batched and floating-point, and oneDNN's fused convolution at hand."""
    # integer images and arrays: the modules refuse them; float64: oneDNN has no kernel for it; an unbatched
    # (C, H, W) crop: oneDNN's convolution takes batches only
    return (type(x) is Tensor and x.device.type == "cpu" and x.dim() == 4 and x.dtype in FUSED_DTYPES
            and _fusable())


def _compute_dtype(conv: nn.Conv2d) -> torch.dtype:
    """The dtype ``conv`` runs in: autocast's, else its weight's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else conv.weight.dtype


#: A convolution is fused only where its outputs' bound stays this many times below the dtype's largest value (a
#: margin for the sums' rounding).
HEADROOM = 4.0


class _Headroom:
    """Whether a convolution of the trunk can overflow, asked before each is fused. oneDNN's fused ReLU maps NaN
    to 0 where ``nn.ReLU`` keeps it, and with finite values and weights a NaN arises only from an overflow (inf -
    inf), so a pair whose convolution cannot overflow gives the modules' values. The bound: the values' largest
    magnitude, measured at the input, times each convolution's largest sum of absolute weights over an output,
    plus its largest bias, kept through ReLU, max-pooling, dropout and LRN (k >= 1), which never raise it. Where
    it grows too loose (a deep net, large weights), the values at hand are measured again; a non-finite one sends
    the rest of the trunk to the modules."""

    def __init__(self, x: Tensor) -> None:
        self.bound = _largest_magnitude(x)

    def allows(self, conv: nn.Conv2d, x: Tensor) -> bool:
        """``conv`` on ``x`` cannot overflow; if so, the bound moves past it."""
        limit = _largest_value(_compute_dtype(conv)) / HEADROOM
        after = _past(conv, self.bound)
        if not after < limit and not math.isnan(self.bound):  # NaN: a NaN was measured
            self.bound = _largest_magnitude(x)
            after = _past(conv, self.bound)
        if after < limit:
            self.bound = after
            return True
        return False

    def passes(self, module: nn.Module) -> None:
        """The bound past ``module`` run as it is."""
        if isinstance(module, nn.Conv2d):
            self.bound = _past(module, self.bound)
        elif not (isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity))
                  or (isinstance(module, nn.LocalResponseNorm) and module.k >= 1)):
            self.bound = math.inf


def _past(conv: nn.Conv2d, bound: float) -> float:
    """The bound on ``conv``'s outputs from ``bound`` on its inputs."""
    weights, bias = _largest_output_weights(conv)
    return bound * weights + bias


@functools.cache
def _largest_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def _largest_magnitude(x: Tensor) -> float:
    """The largest absolute value of ``x`` (NaN if it holds one), by two passes: half the time of one through a
    copy of ``|x|``."""
    x = x.detach()
    return float(torch.maximum(x.amax(), -x.amin())) if x.numel() else 0.0


#: The attribute a convolution keeps its :func:`_largest_output_weights` in.
_OUTPUT_WEIGHTS = "_verydeep_largest_output_weights"


def _largest_output_weights(conv: nn.Conv2d) -> tuple[float, float]:
    """The largest sum of absolute weights over one of ``conv``'s outputs, and its largest absolute bias: no output
    exceeds the first times the input's largest magnitude, plus the second."""
    tensors = (conv.weight,) if conv.bias is None else (conv.weight, conv.bias)
    # an inference tensor (made under torch.inference_mode) keeps no version to tell a change by: never kept
    key = None if any(t.is_inference() for t in tensors) else tuple((t._version, t.data_ptr(), t.dtype)
                                                                      for t in tensors)
    # kept on the module with the versions, places and dtypes they were taken at: taken again when the weight or
    # the bias changes (every step in training, load_state_dict, an in-place change under no_grad). A change
    # through ``.data`` bumps no version, as autograd does not see it either: taking them again every call would
    # cost a tenth of a batch of one's inference
    cached = conv.__dict__.get(_OUTPUT_WEIGHTS)
    if cached is None or key is None or cached[0] != key:
        weight, *bias = (t.detach() for t in tensors)
        sums = weight.abs().sum(dim=tuple(range(1, weight.dim())), dtype=torch.float32)
        largest = (float(sums.amax()) if sums.numel() else 0.0, float(bias[0].abs().amax()) if bias else 0.0)
        cached = conv.__dict__[_OUTPUT_WEIGHTS] = (key, largest)
    return cached[1]



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
    dtype = _compute_dtype(conv)
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
        ctx.save_for_backward(x, weight, y, indices)
        # the output, kept aside from autograd's saved tensors, which refuse an output changed in place (pooling's
        # module keeps its input alone): changed, it is pooled again from y
        ctx.pooled, ctx.pooled_version = pooled.detach(), pooled._version
        ctx.conv, ctx.has_bias = conv, bias is not None
        ctx.mark_non_differentiable(indices)
        return pooled

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, y, indices = ctx.saved_tensors
        pooled = ctx.pooled if ctx.pooled._version == ctx.pooled_version else torch.max_pool2d(y, 2, 2)
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
    """:func:`trunk_outputs`, fused where ``fast`` (:func:`_fast` of the input, asked once) and each convolution
    cannot overflow (:class:`_Headroom`)."""
    pool_fast = fast and not torch.is_grad_enabled()
    headroom = _Headroom(x) if fast else None
    modules = list(features)
    i = 0
    while i < len(modules):
        module, following, after = (modules[j] if j < len(modules) else None for j in (i, i + 1, i + 2))
        if (headroom is not None and i not in kept and _fusable_pair(module, following, x)
                and headroom.allows(module, x)):
            if torch.is_grad_enabled() and i + 1 not in kept and _plain_2x2_pool(after) and not _hooked(after):
                x, i = conv_relu_pool(module, x), i + 2
            else:
                x, i = conv_relu(module, x), i + 1
        elif pool_fast and _plain_2x2_pool(module) and not _hooked(module) and min(x.shape[-2:]) >= 2:
            x = max_pool_2x2(x)  # a side below 2: the module's own error (no output)
        else:
            x = module(x)
            if headroom is not None:
                headroom.passes(module)
        yield i, x
        i += 1


def _fusable_pair(conv: nn.Module, relu: nn.Module | None, x: Tensor) -> bool:
    """``conv`` then ``relu`` can run as one call on ``x``: exactly these classes (a subclass's own forward, a
    fake-quantised weight, is not the fused call's), zero padding, no hooks, and worth it at ``x``'s size."""
    return (type(conv) is nn.Conv2d and type(relu) is nn.ReLU and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and not (_hooked(conv) or _hooked(relu)) and _worth_fusing(conv, x)
            and _same_kernel_as_torch(conv, x))


@functools.cache
def _onednn_takes(dtype: torch.dtype) -> bool:
    """torch convolves ``dtype`` (bf16, fp16) with oneDNN on this CPU (asked once)."""
    supported = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype)
    return supported is not None and bool(supported())


#: torch convolves one fp32 image of at most this many input elements with its own kernel, not oneDNN's (aten's
#: ``use_mkldnn``), whose sums round otherwise.
NATIVE_CONV_ELEMENTS = 20480


def _same_kernel_as_torch(conv: nn.Conv2d, x: Tensor) -> bool:
    """torch's own convolution of ``x`` by ``conv`` would be oneDNN's too (aten's ``use_mkldnn``), so the fused
    call's sums are the same: ``x`` in the weights' dtype or under autocast (the modules refuse mixed dtypes),
    bf16 and fp16 where oneDNN takes them, fp32 but for one small image, or a 1x1 kernel on one thread below
    16 images."""
    dtype = _compute_dtype(conv)
    if not torch.is_autocast_enabled("cpu") and x.dtype != dtype:
        return False
    if dtype != torch.float32:
        return _onednn_takes(dtype)
    if conv.kernel_size == (1, 1) and x.shape[0] < 16 and torch.get_num_threads() == 1:
        return False
    return x.shape[0] > 1 or x.numel() > NATIVE_CONV_ELEMENTS or conv.groups > 1


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
