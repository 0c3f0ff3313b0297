"""CPU inference with each conv + ReLU pair in one oneDNN call against the trunk's modules one by one.

The net is held as ``eval`` holds it (weights in bf16 where autocast picks bf16, channels_last); the
trunk runs ``--rounds`` times each way, alternating, ``--steps`` forward passes a round; the ratio is
the median of the rounds' own, so a slow spell of a shared machine cancels. The outputs are checked
equal first.

    python benchmarks/fused_trunk.py                               # VGG-D at half width, 128, batch 16
    python benchmarks/fused_trunk.py --width 1 --size 224 --batch 8 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from verydeep import vgg
from verydeep.bench.settings import add_net_options
from verydeep.nn.fused import run_trunk
from verydeep.runtime.device import cpu_model, prepare
from verydeep.runtime.precision import autocast, autocast_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_options(parser)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype = autocast_dtype(device)
    model = prepare(vgg(args.config, width=args.width, input_size=args.size), device, True, dtype).eval()
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    ways = {"modules": lambda: model.features(x), "fused": lambda: run_trunk(model.features, x)}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode(), autocast(device, dtype):
        if not torch.equal(ways["modules"](), ways["fused"]()):
            raise SystemExit("the fused trunk's output differs from the modules'")
        for _ in range(args.rounds + 1):
            for name, forward in ways.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    forward()
                rates[name].append(args.batch * args.steps / (time.perf_counter() - start))
    rates = {name: r[1:] for name, r in rates.items()}  # the first round warms the kernels up
    ratio = statistics.median(f / m for f, m in zip(rates["fused"], rates["modules"], strict=True))
    result = {"config": args.config, "width": args.width, "size": args.size, "batch": args.batch,
              "precision": "bf16" if dtype else "fp32", "cpu": cpu_model(), "threads": torch.get_num_threads(),
              **{f"{name}_img_s": round(statistics.median(r), 1) for name, r in rates.items()},
              "fused_vs_modules": round(ratio, 3)}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
