"""A training step with per-image seeded dropout against ``nn.Dropout``'s, in one process.

The same model, batch and SGD update; only the FC6/FC7 dropout (Sec. 3.1) differs: with each image's
seed (``model(x, seeds)``, :class:`verydeep.nn.model.SeededDropout` hashing its masks) or without
(``model(x)``, ``nn.Dropout``'s draws from the global RNG). Rounds alternate and the median of each
is reported, since shared machines are noisy, with the median of the rounds' ratios seeded / plain
and the time of the two dropouts alone on the FC6 output.

    python benchmarks/dropout_step.py                          # A, full-width FC, 32-pixel crops, batch 64
    python benchmarks/dropout_step.py --config D --crop 224 --batch 32 --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from verydeep import vgg
from verydeep.nn.model import SeededDropout
from verydeep.runtime.device import cpu_model, pick_device
from verydeep.runtime.memory import keep_freed_memory


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``work()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Seconds of training steps (forward, backward, SGD update) with seeded and with plain dropout,
    alternating, after a warm-up step of each."""
    model = vgg(args.config, num_classes=10, width=args.width, input_size=args.crop).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    targets = torch.randint(0, 10, (args.batch,), device=device)
    seeds = torch.randint(0, 2**62, (args.batch,), device=device)

    def step(seeded: bool) -> None:
        F.cross_entropy(model(x, seeds if seeded else None), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"seeded": [], "plain": []}
    for round_ in range(args.rounds + 1):
        for name in sorted(times, reverse=round_ % 2 == 1):  # each first in every other round
            seconds = timed(lambda name=name: step(name == "seeded"), device)
            if round_:
                times[name].append(seconds)
    return times


def dropout_times(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds of the two dropouts alone, forward and backward, on an FC6 output (batch x FC width)."""
    drop = SeededDropout(0.5, layer=6).train()
    units = vgg(args.config, width=args.width, input_size=32).classifier[0].out_features
    x = torch.randn(args.batch, units, device=device, requires_grad=True)
    seeds, gradient = torch.randint(0, 2**62, (args.batch,), device=device), torch.randn_like(x)
    runs = {"seeded": lambda: drop(x, seeds).backward(gradient), "plain": lambda: drop(x).backward(gradient)}
    return {name: statistics.median(timed(work, device) for _ in range(20)) for name, work in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="A")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = pick_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does: no fresh pages for every step's tensors
    times = step_times(args, device)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["seeded"], times["plain"], strict=True))
    alone = dropout_times(args, device)
    result = {"config": args.config, "width": args.width, "crop": args.crop, "batch": args.batch,
              "device": str(device), "cpu": cpu_model(),
              "threads": torch.get_num_threads(), "seeded_step_s": round(median["seeded"], 4),
              "plain_step_s": round(median["plain"], 4), "ratio": round(ratio, 3),
              "seeded_dropout_ms": round(alone["seeded"] * 1e3, 3), "plain_dropout_ms": round(alone["plain"] * 1e3, 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.config} width {args.width:g}, {args.batch} crops of {args.crop} on {device} "
              f"({result['threads']} threads): step {median['seeded']:.4f} s seeded, {median['plain']:.4f} s "
              f"nn.Dropout, ratio {result['ratio']:.3f}; the dropout alone {result['seeded_dropout_ms']} ms "
              f"against {result['plain_dropout_ms']} ms")


if __name__ == "__main__":
    main()
