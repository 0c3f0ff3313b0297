"""``verydeep bench``: the command, and the run that measures every contender in alternating rounds and
summarises them."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from verydeep.bench import ceiling
from verydeep.bench.data import DEFAULT_DATA, bench_data, first_photo
from verydeep.bench.measure import alternate, count_macs
from verydeep.bench.ours import inference_net, open_trainer, protocol_contenders, trainer_contenders, training_steps
from verydeep.bench.peer import peer_dtype
from verydeep.bench.reference import best_contenders, reference_contenders
from verydeep.bench.roofline import roofline_contenders
from verydeep.bench.settings import DEFAULTS, TORCHVISION, Settings, add_net_options
from verydeep.bench.summary import peak_memory_gib, render, summarise
from verydeep.data.datasets import require_folder
from verydeep.errors import UserError
from verydeep.options import add_device, add_workers, positive_int
from verydeep.runtime.device import machine, pick_device
from verydeep.runtime.limits import MAX_SIDE
from verydeep.runtime.precision import autocast_dtype, precision_name
from verydeep.runtime.processes import loader_workers


def run_bench(settings: Settings) -> dict[str, Any]:
    """Every measurement of the bench, in alternating rounds; the result as :func:`summarise` gives it."""
    device = pick_device(settings.device)
    dtype, peer = autocast_dtype(device, "auto"), peer_dtype(device)
    with tempfile.TemporaryDirectory() as scratch:
        workers = loader_workers(settings.workers)
        need = (training_steps(settings, workers) + 1) * settings.batch
        root, source = bench_data(settings.data, Path(scratch), settings.size, need)
        trainer = open_trainer(settings, root, Path(scratch))
        photo = first_photo(root)
        net = inference_net(trainer)
        layer_kernels = {dtype: ceiling.layer_kernels(trainer.model, settings.size, settings.batch, device, dtype)}
        rooflines = roofline_contenders(settings, trainer.model, {None, dtype, peer}, device, layer_kernels)
        best, peer_info = best_contenders(settings, len(trainer.data.classes), device, peer)
        contenders = {**rooflines, **reference_contenders(settings, len(trainer.data.classes), device), **best,
                      **trainer_contenders(trainer, net, settings.steps),  # the loader's prefetching after
                      **protocol_contenders(trainer, net, photo)}  # the end-to-end steps falls in the multi-crop
        rounds = alternate(contenders, settings.rounds)
        macs = count_macs(trainer.model, settings.size)
        net_layers = ceiling.layers(trainer.model, settings.size, settings.batch)
    rounds |= ceiling.per_round(rooflines[f"conv_{precision_name(dtype)}_tflops"].rates, net_layers,
                                6 * macs * settings.batch, 2 * macs * settings.batch)
    kernels = {name: measured.winners for name, measured in rooflines.items()}
    return summarise(rounds, macs, dtype, settings, source, machine(device), peak_memory_gib(device), kernels,
                     peer_info)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="speed against the hardware's limit: roofline, torchvision (fp32, at its best), our "
                      "train/eval, end to end",
        description="Measure, in one run on this machine, the roofline (the fastest matrix product or convolution "
                    "of the net's shapes), torchvision's VGG in fp32 and at its best (autocast, channels_last, "
                    "fused update, eager or compiled), our training step and inference, training end to end and "
                    "dense vs 150-crop evaluation. Defaults: on a CPU width 0.5, size 128, batch 16; on CUDA "
                    "width 1, size 224, batch 64.")
    add_net_options(p, defaults=None)
    add_device(p)
    p.add_argument("--rounds", type=positive_int, default=5, help="rounds alternating the contenders")
    p.add_argument("--data", type=Path, default=None,
                   help=f"folder of JPEGs in class folders (default: {DEFAULT_DATA} when present, else generated)")
    add_workers(p)
    p.add_argument("--compile", action="store_true",
                   help="the trainer as `train --compile` runs it, inference and evaluation as `eval --compile`")
    p.add_argument("--no-compiled-peer", dest="compiled_peer", action="store_false",
                   help="torchvision at its best eager only, not also compiled (compiling takes minutes on a CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    if args.config not in TORCHVISION:
        raise UserError(f"--config {args.config}: torchvision has no such VGG; give one of {', '.join(TORCHVISION)}")
    device = pick_device(args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    size = args.size or defaults["size"]
    largest = MAX_SIDE * 224 // 256  # its training scale S, 256/224 of it, at most MAX_SIDE
    if size % 32 or size > largest:
        raise UserError(f"--size {size}: must be a multiple of 32, at most {largest}")
    if args.data is not None:
        require_folder(args.data, "--data")
    data = args.data if args.data is not None else (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    settings = Settings(args.config, size, args.width or defaults["width"], args.batch or defaults["batch"],
                        args.rounds, defaults["steps"], str(device), defaults["gemm"], data, args.workers,
                        args.compile, args.compiled_peer)
    result = run_bench(settings)
    print(render(result))
    if args.json:
        print(json.dumps(result))
