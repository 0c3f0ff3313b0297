"""The trainer's bf16 step on bf16 copies of the weights against the same step under autocast's casts, in one process.

Two trainers of one recipe (``verydeep train``'s, bf16 on a CPU): one as it trains, on bf16 copies of its weights
with the fp32 masters updated in one pass (:mod:`verydeep.train.master_weights`), the other with the copies
switched off, so that autocast casts each fp32 weight to bf16 every forward pass, each gradient back to fp32,
and torch's fused SGD updates. Each steps on one loaded batch; rounds alternate which goes first and the median
of each is reported with the median of the rounds' ratios, since shared machines are noisy.

    python benchmarks/master_weights.py                                   # the bench's defaults: D, width 0.5, 128
    python benchmarks/master_weights.py --width 1 --size 224 --batch 8 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import verydeep.train.step as step_module
from verydeep.bench.data import bench_data
from verydeep.bench.settings import add_net_options
from verydeep.eval.nets import paper_scales
from verydeep.runtime.device import cpu_model
from verydeep.runtime.processes import Processes
from verydeep.train import Trainer
from verydeep.train.recipe import TrainConfig


def trainer(root: Path, out: Path, args: argparse.Namespace, copies: bool) -> Any:
    """A bf16 CPU trainer of the bench's net on ``root``, training on the copies or not."""
    s = paper_scales(args.size)[0]
    cfg = TrainConfig(data=str(root), out=str(out), config=args.config, width=args.width, crop=args.size,
                      scale=(s, s), batch_size=args.batch, epochs=1, lr=1e-3, workers=0, device="cpu",
                      precision="bf16", progress=False)
    chosen = step_module.bf16_copies
    if not copies:
        step_module.bf16_copies = lambda model, optimizer: (None, "switched off by the benchmark")
    try:
        made = Trainer(cfg, Processes())
    finally:
        step_module.bf16_copies = chosen
    if (made.stepper.masters is not None) != copies:
        raise SystemExit(f"the trainer {'did not train' if copies else 'trained'} on the copies: {made.how}")
    made.run_dir.mkdir(parents=True, exist_ok=True)
    made.model.train()
    loaded, draws = next(iter(made.loader))
    return made, loaded, draws


def seconds_per_step(run: Any, steps: int) -> float:
    """Mean seconds of ``steps`` of the trainer's steps on its one batch, their figures read."""
    made, batch, draws = run
    start = time.perf_counter()
    for _ in range(steps):
        made.finish_step(made.stepper.micro_step(batch, draws, sync=True), batch.images.shape[0], 0)
    made.steps.pop()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_options(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps of each trainer a round")
    parser.add_argument("--data", type=Path, help="class folders of images (default: generated)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root, _ = bench_data(args.data, Path(scratch), args.size, args.batch)
        runs = {name: trainer(root, Path(scratch) / name, args, name == "copies") for name in ("copies", "casts")}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds + 1):
            for name in sorted(runs, reverse=round_ % 2 == 1):  # each first in every other round
                seconds = seconds_per_step(runs[name], args.steps)
                if round_:  # the first round warms up
                    times[name].append(seconds)
    ratios = [casts / copies for copies, casts in zip(times["copies"], times["casts"], strict=True)]
    result = {"cpu": cpu_model(), "config": args.config, "width": args.width, "size": args.size, "batch": args.batch,
              "copies_s": statistics.median(times["copies"]), "casts_s": statistics.median(times["casts"]),
              "speedup": statistics.median(ratios), "rounds": times}
    for name in runs:
        print(f"{name:7s} {result[name + '_s']:.4f} s a step ({', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"copies faster by {result['speedup']:.3f}x (median of the rounds' ratios)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
