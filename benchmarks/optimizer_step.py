"""The SGD update of a VGG's weights: the trainer's fused step against torch's plain loop, in one process.

Both optimizers update the same weights with the same gradients (momentum 0.9, weight decay 5e-4);
rounds alternate and the median of each is reported, since shared machines are noisy. The update
touches every weight three times (weight, gradient, momentum), so for VGG-16's 138M weights it is
a visible part of a CPU training step.

    python benchmarks/optimizer_step.py --config D            # the paper's D, full width
    python benchmarks/optimizer_step.py --config A --width 0.25 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from verydeep import vgg
from verydeep.runtime.device import pick_device


def seconds_per_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Wall time of one ``optimizer.step()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="D")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = pick_device(args.device)
    model = vgg(args.config, width=args.width).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    settings = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
    contenders = {"plain": torch.optim.SGD(model.parameters(), **settings),
                  "fused": torch.optim.SGD(model.parameters(), **settings, fused=True)}
    for optimizer in contenders.values():
        optimizer.step()  # momentum buffers allocated before timing
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, optimizer in contenders.items():
            times[name].append(seconds_per_step(optimizer, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {"config": args.config, "width": args.width, "device": str(device), "threads": torch.get_num_threads(),
              "weights": sum(p.numel() for p in model.parameters()), "plain_s": round(median["plain"], 4),
              "fused_s": round(median["fused"], 4), "speedup": round(median["plain"] / median["fused"], 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.config} x{args.width:g} on {device} ({result['weights'] / 1e6:.1f}M weights): plain SGD "
              f"{result['plain_s']:.3f} s, fused {result['fused_s']:.3f} s per step ({result['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
