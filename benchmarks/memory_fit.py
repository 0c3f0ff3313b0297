"""The CPU's count of a training step's memory, which fits the micro-batch, against the step's measured peak.

A CPU allocator counts nothing, so without ``--micro-batch`` the trainer counts what the forward pass
saves for the backward pass (and room for the gradients flowing back) on two probes, and adds the
gradients and momentum still to come (``MemoryProbe.activation_bytes``). This script builds the trainer
as ``verydeep train --micro-batch`` would on a folder of JPEGs (the batch whole, so no probe runs
first), takes two real training steps and reads how much the process's peak resident memory grew,
then counts, and prints both and their ratio.

    python benchmarks/memory_fit.py --config D --width 0.5 --size 128 --batch 16
    python benchmarks/memory_fit.py --config D --width 1 --size 224 --batch 8 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from verydeep.bench.data import DEFAULT_DATA, bench_data
from verydeep.bench.settings import add_net_options
from verydeep.runtime.processes import Processes
from verydeep.train import Trainer
from verydeep.train.recipe import TrainConfig


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_options(parser)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else None,
                        help="folder of JPEGs in class folders (default: Imagenette beside the repository, else "
                             "generated)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root, source = bench_data(args.data, Path(scratch), args.size, 4 * args.batch)
        scale = round(args.size * 8 / 7)
        cfg = TrainConfig(data=str(root), out=str(Path(scratch) / "run"), config=args.config, width=args.width,
                          crop=args.size, scale=(scale, scale), batch_size=args.batch, micro_batch=args.batch,
                          epochs=1, workers=0, device="cpu", precision="auto", progress=False)
        trainer = Trainer(cfg, Processes())
        trainer.run_dir.mkdir(parents=True, exist_ok=True)  # for the step records, as a run makes it
        before = peak_rss_bytes()
        loaded, shifts = next(iter(trainer.loader))
        for _ in range(2):
            trainer.finish_step(trainer.stepper.micro_step(loaded, shifts, sync=True), args.batch, 0)
        grown = peak_rss_bytes() - before
        weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
        counted = trainer.memory.activation_bytes(args.batch) + 2 * weights
    print(f"VGG-{args.config} width {args.width:g}, {args.batch} crops of {args.size} ({source}): counted "
          f"{counted / 2**20:.0f} MiB, the peak grew by {grown / 2**20:.0f} MiB over two steps "
          f"(count / measured {counted / max(grown, 1):.2f})")
    if args.json:
        print(json.dumps({"config": args.config, "width": args.width, "size": args.size, "batch": args.batch,
                          "counted_bytes": counted, "measured_growth_bytes": grown,
                          "ratio": counted / max(grown, 1)}))


if __name__ == "__main__":
    main()
