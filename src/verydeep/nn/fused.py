"""The trunk in inference on a CPU: each 3x3 convolution and the ReLU after it in one oneDNN call.

VGG's trunk is thirteen to sixteen conv + ReLU pairs (Sec. 2.1). Run one module at a time, each
ReLU reads and writes back the whole activation the convolution has just written; oneDNN applies
the ReLU as the convolution writes its output, with the same arithmetic (the same values, bit for
bit), so a forward pass makes one trip over every activation fewer. Training keeps the modules:
their backward passes are the step's larger part, and fusing the forward alone gained nothing
measurable there (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _fusable() -> bool:
    """oneDNN's fused convolution is in this build, and nothing is tracing, compiling or exporting the
    model (those see the modules)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()))


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


def run_trunk(features: nn.Sequential, x: Tensor) -> Tensor:
    """``features(x)``; without autograd on a CPU, each convolution followed by a ReLU as one call
    (:func:`conv_relu`), but where a forward hook watches either."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or not _fusable():
        return features(x)
    modules = list(features)
    i = 0
    while i < len(modules):
        module = modules[i]
        following = modules[i + 1] if i + 1 < len(modules) else None
        if (isinstance(module, nn.Conv2d) and isinstance(following, nn.ReLU) and module.padding_mode == "zeros"
                and isinstance(module.padding, tuple) and not (_hooked(module) or _hooked(following))):
            x = conv_relu(module, x)
            i += 2
        else:
            x = module(x)
            i += 1
    return x
