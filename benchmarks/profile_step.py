"""Where the trainer's training step goes: ``torch.profiler`` over the step ``verydeep bench`` times.

The trainer is the one ``verydeep bench`` builds (``verydeep train``'s, on generated JPEGs); after
warm-up steps, ``--steps`` of its own steps (forward and backward, then the update) are profiled and
the operators' own CPU time is printed by kind (convolutions forward and backward, matrix products,
pooling, ReLU, casts and copies, the update, the gradients' finiteness check, the rest) and as the top
operators, each as a share of the profiled time.

    python benchmarks/profile_step.py                             # the bench's CPU defaults
    python benchmarks/profile_step.py --width 1 --size 224 --batch 8 --steps 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from verydeep.bench.data import bench_data
from verydeep.bench.ours import inference_net, open_trainer, trainer_contenders, training_steps
from verydeep.bench.settings import Settings, add_net_options

#: Each kind of operator by the names of the aten operators it covers (the first match wins).
KINDS = {
    "conv backward": ("convolution_backward",),
    "conv forward": ("mkldnn_convolution", "_convolution", "convolution", "conv2d", "_nnpack", "slow_conv"),
    "matrix products": ("addmm", "mm", "bmm", "linear", "matmul"),
    "pooling": ("max_pool", "adaptive_avg_pool"),
    "relu": ("relu", "threshold_backward"),
    "update": ("_fused_sgd", "_foreach_", "sgd"),
    "finiteness check": ("linalg_vector_norm", "_foreach_norm", "isfinite", "stack"),
    "casts and copies": ("_to_copy", "copy_", "to", "clone", "contiguous", "empty_like"),
}


def kind_of(name: str) -> str:
    """The kind an operator's name falls under (``other`` when none)."""
    bare = name.removeprefix("aten::")
    for kind, names in KINDS.items():
        if any(bare == n or bare.startswith(n) for n in names):
            return kind
    return "other"


def profile_steps(settings: Settings, steps: int) -> dict[str, object]:
    """The trainer's step profiled over ``steps`` steps: seconds a step, own CPU time by kind and top operators."""
    with tempfile.TemporaryDirectory() as scratch:
        count = (training_steps(settings, 0) + 1) * settings.batch
        root, _ = bench_data(None, Path(scratch), settings.size, count)
        trainer = open_trainer(settings, root, Path(scratch))
        train = trainer_contenders(trainer, inference_net(trainer), steps)["train"]  # warmed up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds = settings.batch / train()
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ops)
    by_kind: dict[str, float] = defaultdict(float)
    for e in ops:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total / total
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:15]
    return {"seconds_per_step": round(seconds, 4), "by_kind": {k: round(v, 3) for k, v in
                                                               sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": {e.key: round(e.self_cpu_time_total / total, 3) for e in top}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_options(parser)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = Settings(args.config, args.size, args.width, args.batch, 1, args.steps, args.device, 0, None, 0)
    result = profile_steps(settings, args.steps)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['seconds_per_step']:.3f} s a step; own CPU time by kind:")
    for kind, share in result["by_kind"].items():  # type: ignore[union-attr]
        print(f"  {kind:<20}{share:>7.1%}")
    print("top operators:")
    for name, share in result["top"].items():  # type: ignore[union-attr]
        print(f"  {name:<40}{share:>7.1%}")


if __name__ == "__main__":
    main()
