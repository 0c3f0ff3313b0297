"""CPU: each conv + ReLU pair in one oneDNN call against the trunk's modules one by one.

Inference (the default): the net held as ``eval`` holds it (weights in bf16 where autocast picks bf16,
channels_last), the trunk's forward pass. ``--train``: a training step as the trainer takes it (fp32
weights under autocast, the whole net, cross-entropy, backward, fused SGD), the trunk's pairs fused or
not. Each way runs ``--rounds`` times, alternating, ``--steps`` passes a round; the ratio is the median
of the rounds' own, so a slow spell of a shared machine cancels. The trunk's outputs are checked equal
first.

    python benchmarks/fused_trunk.py                               # VGG-D at half width, 128, batch 16
    python benchmarks/fused_trunk.py --width 1 --size 224 --batch 8 --json
    python benchmarks/fused_trunk.py --train --width 1 --size 224 --batch 8 --rounds 6 --steps 2
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
from verydeep.bench.settings import add_net_options
from verydeep.nn.fused import run_trunk
from verydeep.nn.model import VGG, run_head
from verydeep.runtime.device import cpu_model, prepare
from verydeep.runtime.memory import keep_freed_memory
from verydeep.runtime.precision import autocast, autocast_dtype

Trunk = Callable[[torch.Tensor], torch.Tensor]


def training_step(model: VGG, x: torch.Tensor, dtype: torch.dtype | None, trunk: Trunk) -> Callable[[], None]:
    """One SGD step of ``model`` on ``x`` (labels drawn once), its trunk run by ``trunk``."""
    labels = torch.randint(0, model.num_classes, (x.shape[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True)
    device = torch.device("cpu")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            scores = run_head(model.classifier, torch.flatten(trunk(x), 1))
        F.cross_entropy(scores.float(), labels).backward()
        optimizer.step()
    return step


def rounds(ways: dict[str, Callable[[], object]], count: int, steps: int, batch: int) -> dict[str, list[float]]:
    """Images a second of each way in ``count`` alternating rounds of ``steps`` calls, after a round of warm-up."""
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(count + 1):
        for name, run in ways.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            rates[name].append(batch * steps / (time.perf_counter() - start))
    return {name: r[1:] for name, r in rates.items()}  # the first round warms the kernels up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_options(parser)
    parser.add_argument("--train", action="store_true", help="time a training step, not the trunk's inference")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype = autocast_dtype(device)
    keep_freed_memory()  # as the trainer runs
    model = prepare(vgg(args.config, width=args.width, input_size=args.size), device, True,
                    None if args.train else dtype)
    model.train(args.train)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    trunks: dict[str, Trunk] = {"modules": model.features, "fused": lambda t: run_trunk(model.features, t)}
    with torch.inference_mode(not args.train), autocast(device, dtype):
        if not torch.equal(trunks["modules"](x), trunks["fused"](x)):
            raise SystemExit("the fused trunk's output differs from the modules'")
    if args.train:
        rates = rounds({name: training_step(model, x, dtype, trunk) for name, trunk in trunks.items()},
                       args.rounds, args.steps, args.batch)
    else:
        with torch.inference_mode(), autocast(device, dtype):
            rates = rounds({name: (lambda trunk=trunk: trunk(x)) for name, trunk in trunks.items()},
                           args.rounds, args.steps, args.batch)
    ratio = statistics.median(f / m for f, m in zip(rates["fused"], rates["modules"], strict=True))
    result = {"config": args.config, "width": args.width, "size": args.size, "batch": args.batch,
              "pass": "training step" if args.train else "inference", "precision": "bf16" if dtype else "fp32",
              "cpu": cpu_model(), "threads": torch.get_num_threads(),
              **{f"{name}_img_s": round(statistics.median(r), 1) for name, r in rates.items()},
              "fused_vs_modules": round(ratio, 3)}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
