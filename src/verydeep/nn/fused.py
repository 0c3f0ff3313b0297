"""The trunk in inference on a CPU: each convolution with its ReLU in one oneDNN call, and 2x2 max-pooling
without the indices it would keep for a backward pass.

VGG's trunk is thirteen to sixteen conv + ReLU pairs and five 2x2 max-poolings (Sec. 2.1). Run one
module at a time, each ReLU reads and writes back the whole activation the convolution has just
written; oneDNN applies the ReLU as the convolution writes its output, with the same arithmetic (the
same values, bit for bit, for a finite input: its ReLU maps NaN to 0, so a non-finite one takes the
modules). torch's max-pooling on a CPU computes and writes an int64 index for every
output, four times the bytes of a bf16 output, even where no gradient will need them; the maxima of
the four shifted views are the same values without them. Training keeps the modules: their backward
passes are the step's larger part, fusing the forward alone gained nothing measurable there
(docs/benchmarks.md), and the maximum's gradient splits ties where pooling's does not.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator

import torch
from torch import Tensor, nn


@functools.cache
def _built_with_fused_convolution() -> bool:
    """oneDNN's fused convolution is in this build of torch (asked once)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _fusable() -> bool:
    """oneDNN's fused convolution is in this build, and nothing is tracing, compiling or exporting the
    model (those see the modules)."""
    # asked first: a compiler then never traces the cached question
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return _built_with_fused_convolution()


def _fast(x: Tensor) -> bool:
    """The fused path applies: no autograd, ``x`` on a CPU, oneDNN's fused convolution at hand, and ``x``
    floating-point and finite (oneDNN's fused ReLU maps NaN to 0, where ``nn.ReLU`` keeps it; a check of
    the input is cheap beside the convolutions, and weights are checked finite when loaded)."""
    # integer images and arrays: the modules refuse them, as with autograd
    return (isinstance(x, Tensor) and not torch.is_grad_enabled() and x.device.type == "cpu" and _fusable()
            and x.is_floating_point() and bool(x.isfinite().all()))


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook watches ``module`` (a MAC count, a probe of shapes): it runs on its own then."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def conv_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``relu(conv(x))`` in one oneDNN call, in the dtype autocast would give the convolution."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else conv.weight.dtype
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dtype), conv.weight.to(dtype), bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "relu", [], "")


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
    """``(i, output of features[i])`` in order. Without autograd on a CPU each convolution followed by a ReLU
    runs as one call (:func:`conv_relu`), giving the ReLU's index alone, unless the convolution's own output
    is ``kept``, and each 2x2 max-pooling as :func:`max_pool_2x2`; never a module a forward hook watches."""
    fast = _fast(x)
    modules = list(features)
    i = 0
    while i < len(modules):
        module = modules[i]
        following = modules[i + 1] if i + 1 < len(modules) else None
        if (fast and isinstance(module, nn.Conv2d) and isinstance(following, nn.ReLU) and i not in kept
                and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
                and not (_hooked(module) or _hooked(following))):
            x = conv_relu(module, x)
            i += 1
        elif fast and _plain_2x2_pool(module) and not _hooked(module) and x.dim() == 4:
            x = max_pool_2x2(x)
        else:
            x = module(x)
        yield i, x
        i += 1


def run_trunk(features: nn.Sequential, x: Tensor) -> Tensor:
    """``features(x)``, through :func:`trunk_outputs` (faster without autograd on a CPU)."""
    if not _fast(x):
        return features(x)
    out = x
    for _, output in trunk_outputs(features, x):
        out = output
    return out
