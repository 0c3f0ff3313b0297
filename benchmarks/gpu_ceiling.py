"""What the GPU's kernels allow a VGG training step: the ceiling under any MFU target, and where a step goes.

For each batch size (``--batch``) every convolution of the net is timed alone in bf16, channels_last,
with cuDNN's autotuner (forward, backward to the input, except for the first layer, whose input needs
no gradient, and backward to the weights and bias), and every FC layer's three matrix products; their
sum is the fastest a training step built on these kernels can be, its MFU the ceiling of any training
run's (``kernel_ceiling_mfu``), the bias included as torch runs it beside cuDNN's kernels (an addition over
the output, a sum of its gradient): ``verydeep bench``'s kernel ceiling leaves those out, since a compiled
step fuses them into its Triton kernels. The first convolution is also timed with its 3 input channels padded
with zeros to 4, 8 and 16, in NCHW, as an im2col matrix product and as a padded module under autograd
(``first_conv_variants``: whether padding would lift it; ``--first-conv-only`` times just these). Then a
whole training step of the same net (our VGG under bf16 autocast with per-image dropout seeds, the
trainer's fused SGD), eager and with ``--compile`` compiled, each with and without host reads of the
loss and the gradients' finiteness before the update (the trainer's old waits), and a profile of one step's GPU
kernels by kind (convolutions, matrix products, Triton's fused kernels, the rest) with the GPU's idle
share, so the gap between the step and the ceiling is named.

    python benchmarks/gpu_ceiling.py --batch 128 256 --compile --json docs/benchmarks/ceiling.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from verydeep import vgg
from verydeep.bench.measure import count_macs

#: Kernel kinds by parts of their names (the first that matches wins).
KINDS = {"triton (fused)": ("triton",), "convolution": ("fprop", "dgrad", "wgrad", "conv", "implicit"),
         "matrix product": ("gemm", "nvjet", "cutlass"), "pooling": ("pool",),
         "elementwise": ("elementwise", "vectorized", "relu")}


def cuda_time(fn: Callable[[], Any], repeats: int = 10, back_to_back: int = 1) -> float:
    """Median seconds of ``fn`` on the GPU over ``repeats`` timings of ``back_to_back`` runs each (the host
    launching each run while the GPU works on the one before), after two warm-ups (cuDNN autotunes then)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(back_to_back):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / back_to_back)
    return sorted(times)[len(times) // 2]


def time_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: Any, to_input: bool = True
              ) -> dict[str, float]:
    """Seconds of a convolution's forward pass and of its backward passes to the input (``to_input``) and to
    the weights and bias, on the GPU."""
    g = torch.randn_like(F.conv2d(x, w, b, padding=padding))

    def backward(mask: list[bool]) -> Any:
        return torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], [1, 1], list(padding), [1, 1], False,
                                                   [0, 0], 1, mask)

    return {"forward_s": cuda_time(lambda: F.conv2d(x, w, b, padding=padding)),
            "to_input_s": cuda_time(lambda: backward([True, False, False])) if to_input else 0.0,
            "to_weight_s": cuda_time(lambda: backward([False, True, True]))}


def bf16(tensor: torch.Tensor, channels: int | None = None, layout: torch.memory_format = torch.channels_last
         ) -> torch.Tensor:
    """``tensor`` in bf16 and ``layout``, its dim 1 padded with zeros to ``channels``."""
    if channels is not None:
        tensor = F.pad(tensor, (0, 0, 0, 0, 0, channels - tensor.shape[1]))
    tensor = tensor.detach().to(torch.bfloat16)
    return tensor.contiguous(memory_format=layout) if tensor.dim() == 4 else tensor


def conv_times(model: torch.nn.Module, batch: int, size: int) -> list[dict[str, Any]]:
    """Each convolution's forward, backward-to-input and backward-to-weight seconds at ``batch``."""
    rows, side = [], size
    for module in model.features:
        if isinstance(module, torch.nn.MaxPool2d):
            side //= 2
        elif isinstance(module, torch.nn.Conv2d):
            x = bf16(torch.randn(batch, module.in_channels, side, side, device="cuda"))
            macs = batch * module.out_channels * side * side * module.in_channels * module.kernel_size[0] ** 2
            rows.append({"layer": f"{module.in_channels}->{module.out_channels} at {side}", "macs": macs,
                         **time_conv(x, bf16(module.weight), bf16(module.bias), module.padding, to_input=bool(rows))})
    return rows


def first_conv_variants(model: torch.nn.Module, batch: int, size: int) -> list[dict[str, Any]]:
    """The first convolution (3 input channels: too few for the tensor cores' tiles) in channels_last and NCHW,
    with its input and weights padded with zero channels to 4, 8 and 16 (the same outputs), as an im2col matrix
    product (27 taps padded to 32), and as a padded module would run it under autograd (the pads of the input
    and of the weights, forward and backward, included): what padding would gain."""
    conv = model.features[0]
    x = torch.randn(batch, 3, size, size, device="cuda")
    rows = []
    for channels, name in ((3, "channels_last"), (3, "NCHW"), (4, "channels_last"), (8, "channels_last"),
                           (16, "channels_last")):
        layout = torch.channels_last if name == "channels_last" else torch.contiguous_format
        rows.append({"channels": channels, "layout": name,
                     **time_conv(bf16(x, channels, layout), bf16(conv.weight, channels, layout), bf16(conv.bias),
                                 conv.padding, to_input=False)})
    rows.append({"channels": 32, "layout": "im2col matrix product", **time_im2col(x, conv)})
    rows.append({"channels": 32, "layout": "shifted views, matrix product", **time_shifted_views(x, conv)})
    compiled = torch.compile(shifted_view_columns)
    rows.append({"channels": 32, "layout": "shifted views compiled, matrix product",
                 **time_shifted_views(x, conv, compiled)})
    direct = torch.compile(direct_conv)
    rows.append({"channels": 3, "layout": "direct compiled", **time_direct(x, conv, direct)})
    rows.append({"channels": 3, "layout": "direct compiled with ReLU",
                 **time_direct(x, conv, torch.compile(lambda *a: direct_conv(*a).relu()), relu=True)})
    for channels in (3, 4, 8, 16):
        rows.append({"channels": channels, "layout": "padded, autograd", **time_padded_autograd(x, conv, channels)})
    return rows


def time_im2col(x: torch.Tensor, conv: torch.nn.Conv2d) -> dict[str, float]:
    """The first convolution as unfold + one matrix product (taps padded to 32), forward and to the weights."""
    xb = bf16(x)
    w = F.pad(conv.weight.detach().reshape(conv.out_channels, -1), (0, 5)).to(torch.bfloat16)

    def columns() -> torch.Tensor:
        cols = F.unfold(xb, 3, padding=1).transpose(1, 2).reshape(-1, 27)
        return F.pad(cols, (0, 5))

    cols = columns()
    g = torch.randn(cols.shape[0], conv.out_channels, device="cuda", dtype=torch.bfloat16)
    return {"forward_s": cuda_time(lambda: columns() @ w.t()), "to_input_s": 0.0,
            "to_weight_s": cuda_time(lambda: g.t() @ cols)}


def shifted_view_columns(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 neighbourhoods of a channels_last image batch as rows of 27 taps padded to 32: (N*H*W, 32)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # N, H+2, W+2, C
    taps = [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
    taps.append(x.new_zeros(n, h, w, 32 - 9 * c))
    return torch.cat(taps, dim=3).reshape(n * h * w, 32)


def time_shifted_views(x: torch.Tensor, conv: torch.nn.Conv2d,
                       columns: Callable[[torch.Tensor], torch.Tensor] = shifted_view_columns) -> dict[str, float]:
    """The first convolution as one matrix product over the 3x3 neighbourhoods gathered from nine shifted views
    (the output is channels_last as it comes), forward with the bias, and to the weights."""
    xb = bf16(x)
    w = F.pad(conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.out_channels, -1), (0, 5)).to(torch.bfloat16)
    b = conv.bias.detach().to(torch.bfloat16)
    cols = columns(xb)
    g = torch.randn(cols.shape[0], conv.out_channels, device="cuda", dtype=torch.bfloat16)
    return {"forward_s": cuda_time(lambda: torch.addmm(b, columns(xb), w.t())), "to_input_s": 0.0,
            "to_weight_s": cuda_time(lambda: g.t() @ cols)}


def direct_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution (padding 1) of a few input channels as the sum of its taps' products, each output
    element computed where it is written: one pointwise kernel once compiled. channels_last out."""
    n, c, h, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).float()  # N, H+2, W+2, C
    taps = w.permute(2, 3, 1, 0).float()  # 3, 3, C, O
    out = b.float().expand(n, h, width, -1)
    for i in range(3):
        for j in range(3):
            for k in range(c):
                out = out + padded[:, i:i + h, j:j + width, k:k + 1] * taps[i, j, k]
    return out.to(x.dtype).permute(0, 3, 1, 2)


def time_direct(x: torch.Tensor, conv: torch.nn.Conv2d, run: Callable[..., torch.Tensor], relu: bool = False
                ) -> dict[str, float]:
    """The first convolution's forward as :func:`direct_conv` (compiled by the caller; with its ``relu``): time
    and the largest difference from ``F.conv2d`` in fp32."""
    xb, w, b = bf16(x), conv.weight.detach().to(torch.bfloat16), conv.bias.detach().to(torch.bfloat16)
    reference = F.conv2d(xb.float(), w.float(), b.float(), padding=1)
    error = (run(xb, w, b).float() - (reference.relu() if relu else reference)).abs().max().item()
    return {"forward_s": cuda_time(lambda: run(xb, w, b)), "to_input_s": 0.0, "to_weight_s": 0.0,
            "max_abs_error": error}


def time_padded_autograd(x: torch.Tensor, conv: torch.nn.Conv2d, channels: int) -> dict[str, float]:
    """Forward and backward of conv(pad(x), pad(w)) under bf16 autocast with w requiring a gradient: the whole
    cost a padded first layer would add to a step, the pads and the gradient's slice included."""
    xb = bf16(x)
    w = conv.weight.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()
    pad = (0, 0, 0, 0, 0, channels - 3)

    def forward() -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            return F.conv2d(F.pad(xb, pad).contiguous(memory_format=torch.channels_last),
                            F.pad(w, pad).contiguous(memory_format=torch.channels_last), b, padding=conv.padding)

    y = forward()
    g = torch.randn_like(y)
    total, forward_s = cuda_time(lambda: forward().backward(g)), cuda_time(forward)
    return {"forward_s": forward_s, "to_input_s": 0.0, "to_weight_s": total - forward_s}


def fc_times(model: torch.nn.Module, batch: int) -> list[dict[str, Any]]:
    """Each FC layer's forward and two backward matrix products, seconds at ``batch``."""
    rows = []
    for module in (m for m in model.classifier if isinstance(m, torch.nn.Linear)):
        x = torch.randn(batch, module.in_features, device="cuda", dtype=torch.bfloat16)
        w = module.weight.detach().to(torch.bfloat16)
        g = torch.randn(batch, module.out_features, device="cuda", dtype=torch.bfloat16)
        rows.append({"layer": f"fc {module.in_features}->{module.out_features}", "macs": batch * w.numel(),
                     "forward_s": cuda_time(lambda x=x, w=w: x @ w.t()),
                     "to_input_s": cuda_time(lambda g=g, w=w: g @ w),
                     "to_weight_s": cuda_time(lambda g=g, x=x: g.t() @ x)})
    return rows


def training_step(model: torch.nn.Module, net: torch.nn.Module, batch: int, size: int,
                  host_checks: bool) -> Callable[[], None]:
    """One step as the trainer takes it: bf16 autocast, channels_last, per-image dropout seeds, fused SGD; with
    ``host_checks`` the loss and the gradients' finiteness read on the host before the update, as the trainer
    did before it queued the update (two waits for the GPU a step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    seeds = torch.randint(0, 2**62, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(net(x, seeds).float(), y, reduction="sum")
        (loss / batch).backward()
        if host_checks:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert math.isfinite(loss.item()) and torch.nn.utils.get_total_norm(grads).isfinite()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def kernel_profile(step: Callable[[], None], seconds: float, steps: int = 3) -> dict[str, Any]:
    """A step's GPU kernel time by kind (``steps`` back to back), as shares of the step's time ``seconds``
    (the rest: the GPU idle)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if "cuda" not in str(event.device_type).lower():
            continue
        elapsed = event.time_range.elapsed_us() / 1e6 / steps
        name = event.name.lower()
        kind = next((k for k, parts in KINDS.items() if any(p in name for p in parts)), "other")
        by_kind[kind] += elapsed
        by_name[event.name[:90]] += elapsed
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {"kernel_s": busy, "idle_share": round(max(0.0, 1 - busy / seconds), 4),
            "shares": {k: round(v / seconds, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: round(v * 1e3, 3) for k, v in top}}


def measure(config: str, batch: int, size: int, compiled: bool, peak: float) -> dict[str, Any]:
    """The ceiling and the step at one batch size."""
    torch.manual_seed(0)
    model = vgg(config, input_size=size).cuda().to(memory_format=torch.channels_last)
    flops = 6 * count_macs(model, size)
    rows = conv_times(model, batch, size) + fc_times(model, batch)
    kernels = sum(r["forward_s"] + r["to_input_s"] + r["to_weight_s"] for r in rows)
    for r in rows:
        r["tflops"] = round(6 * r["macs"] / (r["forward_s"] + r["to_input_s"] + r["to_weight_s"]) / 1e12, 1)
    out: dict[str, Any] = {"batch": batch, "train_flops_per_image": flops, "kernel_ceiling_s": kernels,
                           "kernel_ceiling_img_s": round(batch / kernels, 1),
                           "kernel_ceiling_mfu": round(batch * flops / kernels / 1e12 / peak, 4), "layers": rows,
                           "first_conv_variants": first_conv_variants(model, batch, size)}
    nets = {"eager": model, "compiled": torch.compile(model)} if compiled else {"eager": model}
    for variant, host_checks in product(nets, (True, False)):
        start = time.perf_counter()
        step = training_step(model, nets[variant], batch, size, host_checks)
        seconds = cuda_time(step, repeats=3, back_to_back=5)
        variant += "" if host_checks else ", no host checks"
        out[variant] = {"img_s": round(batch / seconds, 1), "mfu": round(batch * flops / seconds / 1e12 / peak, 4),
                        "setup_s": round(time.perf_counter() - start, 1), "profile": kernel_profile(step, seconds)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="D")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[128])
    parser.add_argument("--compile", action="store_true", help="also time and profile the compiled step")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="the GPU's dense bf16 peak (H100/H200)")
    parser.add_argument("--first-conv-only", action="store_true", help="time only the first convolution's variants")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
              "size": args.size, "peak_tflops": args.peak_tflops, "runs": []}
    for batch in args.batch:
        if args.first_conv_only:
            model = vgg(args.config, input_size=args.size).cuda()
            result["runs"].append({"batch": batch, "first_conv_variants": first_conv_variants(model, batch, args.size)})
        else:
            result["runs"].append(measure(args.config, batch, args.size, args.compile and batch == args.batch[0],
                                          args.peak_tflops))
        if args.json:  # after each batch size, so that a cut keeps what was measured
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result["runs"][-1].items() if k != "layers"}), flush=True)


if __name__ == "__main__":
    main()
