"""Where a training step goes, ours against torchvision's at its best: ``torch.profiler`` over the steps
``verydeep bench`` times.

Ours is the trainer's own step as ``verydeep bench`` builds it (``verydeep train``'s, on generated JPEGs),
the peer torchvision's VGG under autocast, channels_last, fused SGD (:mod:`verydeep.bench.peer`), eager or,
with ``--compile``, both compiled. After warm-up steps, ``--steps`` steps of each are profiled; printed by
kind (convolutions forward and backward, matrix products, pooling, ReLU, casts and copies, the update, the
gradients' finiteness check, the rest) as shares of each step's time, and the top operators: on a CPU the
operators' own CPU time, on CUDA also the GPU kernels' time (kernels named by what they do, a compiled
step's fused Triton kernels apart), so that the two steps' differences show kind by kind.

    python benchmarks/profile_step.py                             # the bench's CPU defaults
    python benchmarks/profile_step.py --width 1 --size 224 --batch 8 --steps 2
    python benchmarks/profile_step.py --device cuda --width 1 --size 224 --batch 64 --compile --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from verydeep.bench.data import bench_data
from verydeep.bench.ours import inference_net, open_trainer, trainer_contenders, training_steps
from verydeep.bench.peer import peer_dtype
from verydeep.bench.reference import best_contenders
from verydeep.bench.settings import Settings, add_net_options

#: Each kind of operator by the names of the aten operators it covers (the first match wins).
KINDS = {
    "conv backward": ("convolution_backward",),
    # "_convolution" also covers oneDNN's convolution with its ReLU (mkldnn::_convolution_pointwise)
    "conv forward": ("mkldnn_convolution", "_convolution", "convolution", "conv2d", "_nnpack", "slow_conv"),
    "matrix products": ("addmm", "mm", "bmm", "linear", "matmul"),
    "pooling": ("max_pool", "adaptive_avg_pool"),
    "relu": ("relu", "threshold_backward"),
    "update": ("_fused_sgd", "_foreach_", "sgd"),
    "finiteness check": ("linalg_vector_norm", "_foreach_norm", "isfinite", "stack"),
    "casts and copies": ("_to_copy", "copy_", "to", "clone", "contiguous", "empty_like"),
    "compiled graphs": ("## Call CompiledFxGraph",),  # a compiled update, or a compiled step's fused loops
}
#: The profiler's entries counted on a CPU: the operators (oneDNN's fused convolution is ``mkldnn::``) and the
#: compiled graphs, each once (the entries above them, Python functions and modules, hold them).
COUNTED = ("aten::", "mkldnn::", "## Call CompiledFxGraph")
#: Each kind of GPU kernel by words in its name (lower case; the first match wins).
KERNEL_KINDS = {
    "compiled (Triton)": ("triton",),
    "conv backward": ("dgrad", "wgrad"),
    "conv forward": ("fprop", "conv", "implicit_convolve", "xmma_fprop"),
    "matrix products": ("gemm", "nvjet", "cutlass", "xmma"),
    "pooling": ("max_pool", "pool"),
    "relu": ("threshold", "clamp_min", "relu"),
    "finiteness check": ("norm", "isfinite"),  # before the update: both run as multi_tensor_apply kernels
    "update": ("fused_sgd", "sgd", "multi_tensor_apply"),
    "copies and fills": ("memcpy", "memset", "copy", "fill"),
}


def kind_of(name: str, kinds: dict[str, tuple[str, ...]] = KINDS) -> str:
    """The kind an operator's name falls under (``other`` when none)."""
    bare = name.removeprefix("aten::").removeprefix("mkldnn::")
    for kind, names in kinds.items():
        if any(bare == n or bare.startswith(n) for n in names):
            return kind
    return "other"


def kernel_kind(name: str) -> str:
    """The kind a GPU kernel's name falls under (``other`` when none)."""
    lower = name.lower()
    return next((kind for kind, words in KERNEL_KINDS.items() if any(w in lower for w in words)), "other")


def shares(events: Iterable[tuple[str, float]], kind: Callable[[str], str]) -> dict[str, object]:
    """``(name, time)`` events as shares of their total: by kind, and the top fifteen."""
    events = [(name, t) for name, t in events if t > 0]
    total = sum(t for _, t in events) or 1.0
    by_kind: dict[str, float] = defaultdict(float)
    for name, t in events:
        by_kind[kind(name)] += t / total
    top = sorted(events, key=lambda e: -e[1])[:15]
    return {"by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": {name[:80]: round(t / total, 3) for name, t in top}}


def profile_step(step: Callable[[], float], batch: int, device: torch.device) -> dict[str, object]:
    """``step`` (a bench contender: images a second over its steps) profiled: seconds a step, the operators'
    own CPU time and, on CUDA, the kernels' time, each as shares."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        seconds = batch / step()
    averages = prof.key_averages()
    result = {"seconds_per_step": round(seconds, 4),
              "cpu": shares(((e.key, e.self_cpu_time_total) for e in averages if e.key.startswith(COUNTED)), kind_of)}
    if cuda:
        kernels = ((e.key, e.self_device_time_total) for e in averages if e.device_type == DeviceType.CUDA)
        result["gpu"] = shares(kernels, kernel_kind)
    return result


def profile_steps(settings: Settings, steps: int) -> dict[str, object]:
    """Our step and the peer's, each warmed up, then profiled over ``steps`` steps."""
    with tempfile.TemporaryDirectory() as scratch:
        count = (training_steps(settings, 0) + 1) * settings.batch
        root, _ = bench_data(None, Path(scratch), settings.size, count)
        trainer = open_trainer(settings, root, Path(scratch))
        ours = trainer_contenders(trainer, inference_net(trainer), steps)["train"]  # warmed up
        device = trainer.device
        peers, _ = best_contenders(settings, trainer.model.num_classes, device, peer_dtype(device))
        peer = peers[f"torchvision_best_{'compiled' if settings.compile else 'eager'}_train"]  # warmed up
        return {"ours": profile_step(ours, settings.batch, device),
                "torchvision_best": profile_step(peer, settings.batch, device)}


def print_side_by_side(result: dict[str, dict[str, object]]) -> None:
    """Each contender's step and its shares by kind, ours beside the peer's, then each one's top entries."""
    ours, peer = result["ours"], result["torchvision_best"]
    print(f"seconds a step: ours {ours['seconds_per_step']:.4f}, "
          f"torchvision at its best {peer['seconds_per_step']:.4f}")
    for where in [w for w in ("cpu", "gpu") if w in ours]:
        print(f"{'own CPU time' if where == 'cpu' else 'GPU kernel time'} by kind     ours   peer")
        kinds = list(dict.fromkeys([*ours[where]["by_kind"], *peer[where]["by_kind"]]))
        for kind in kinds:
            print(f"  {kind:<26}{ours[where]['by_kind'].get(kind, 0):>7.1%}{peer[where]['by_kind'].get(kind, 0):>7.1%}")
        for name, figures in (("ours", ours), ("torchvision at its best", peer)):
            print(f"  top ({name}):")
            for op, share in figures[where]["top"].items():
                print(f"    {op:<70}{share:>7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_options(parser)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="our trainer compiled, and the peer compiled")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = Settings(args.config, args.size, args.width, args.batch, 1, args.steps, args.device, 0, None, 0,
                        compile=args.compile, compiled_peer=args.compile)
    result = profile_steps(settings, args.steps)
    if args.json:
        print(json.dumps(result))
        return
    print_side_by_side(result)


if __name__ == "__main__":
    main()
