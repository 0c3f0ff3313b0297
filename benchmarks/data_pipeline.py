"""Images per second of the paper's training transform against torchvision's usual pipeline.

Ours: ``verydeep.data.ImageFolder`` + ``TrainTransform`` (S=256 by default: rescale, random
crop, flip; only the crop's box of a JPEG decoded, then resized, uint8) + ``collate``, then ``to_input``
(PCA colour shift and mean subtraction) on the CPU in the main process, so the comparison
ends at the same float32 normalised batch. Torchvision: ``ImageFolder`` + ``RandomResizedCrop``
+ ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``. Same images, workers and batch size,
in the same run; rounds alternate and the medians are reported (shared machines are noisy).
The main process gets the cores the workers leave (at least one thread). Beside images/s it
reports CPU milliseconds per image (main process plus workers, from ``/proc`` on Linux): what a
pipeline costs whatever else the machine is running, the better figure on a busy machine.

Images: the real ImageNet photos of ``../shared/data/imagenet-samples`` when present, else
generated photo-sized JPEGs. With ``--device cuda`` it also times the GPU path
(``verydeep.data.gpu``: workers plan the same crops and send the bytes; nvJPEG decodes the
batch and the crops are cut and resized on the device).

    python benchmarks/data_pipeline.py --workers 2
    python benchmarks/data_pipeline.py --workers 8 --device cuda --json
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from verydeep.data import IMAGENET, ImageFolder, TrainTransform, collate, pca_shift, to_input

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"


def image_tree(root: Path, count: int) -> str:
    """A class-per-folder tree under ``root``: links to the real samples, else generated JPEGs."""
    if SAMPLES.is_dir():
        for path in sorted(SAMPLES.glob("*.JPEG")):
            (root / path.name.split("_")[0]).mkdir(exist_ok=True)
            (root / path.name.split("_")[0] / path.name).symlink_to(path)
        return f"{SAMPLES} (real ImageNet photos)"
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (26, 34, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
        (root / f"c{i % 10}").mkdir(exist_ok=True)
        img.save(root / f"c{i % 10}" / f"{i}.jpg", quality=90)
    return f"{count} generated 500x375 JPEGs"


def record_pid(pids, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: note this worker's process id (for its CPU time)."""
    pids[worker_id] = os.getpid()


def cpu_seconds(pids) -> float:
    """CPU time (user + system) of this process and the worker processes ``pids``; NaN off Linux."""
    total = sum(os.times()[:2])
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def time_loader(loader: DataLoader, finish: Callable, epochs: int) -> tuple[float, float]:
    """Images per second and CPU milliseconds per image over ``epochs`` passes (workers already
    started and warm)."""
    pids = loader.worker_init_fn.args[0] if loader.num_workers else []
    images = 0
    cpu = cpu_seconds(pids)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += finish(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start), 1000 * (cpu_seconds(pids) - cpu) / images


def gpu_pipeline(root: str, loader: Callable, args: argparse.Namespace) -> tuple[DataLoader, Callable]:
    """Workers read bytes and plan the crops; nvJPEG decodes and the plans are cut on the device;
    then to_input."""
    from verydeep.data.gpu import EncodedTransform, collate_encoded, decode_batch

    device = torch.device(args.device)
    dataset = ImageFolder(root, EncodedTransform(TrainTransform(args.crop, tuple(args.scale))))
    encoded = loader(dataset, collate_fn=collate_encoded, pin_memory=True)

    def finish(encoded) -> int:
        images = decode_batch(encoded, device).images
        return to_input(images, IMAGENET, pca_shift(len(images), IMAGENET, 0.1)).shape[0]

    return encoded, finish


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--scale", type=int, nargs=2, default=(256, 256), metavar=("SMIN", "SMAX"))
    parser.add_argument("--epochs", type=int, default=2, help="passes over the images per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=200, help="generated images when no real ones")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to time the GPU path too")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    return parser.parse_args()


def measure(args: argparse.Namespace) -> tuple[str, dict[str, list[float]], dict[str, list[float]]]:
    """The images' source, and each pipeline's images per second and CPU ms per image, one per round."""
    with tempfile.TemporaryDirectory() as tmp:
        source = image_tree(Path(tmp), args.images)
        common = dict(batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                      persistent_workers=args.workers > 0)

        def loader(dataset, **kwargs) -> DataLoader:  # each with its own record of worker pids
            pids = multiprocessing.Array("i", args.workers, lock=False)
            return DataLoader(dataset, worker_init_fn=functools.partial(record_pid, pids), **common, **kwargs)

        ours = loader(ImageFolder(tmp, TrainTransform(args.crop, tuple(args.scale))), collate_fn=collate)
        tv_transform = T.Compose([
            T.RandomResizedCrop(args.crop), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize(IMAGENET.mean, IMAGENET.std),
        ])
        tv = loader(torchvision.datasets.ImageFolder(tmp, tv_transform))

        memory = torch.empty(args.batch_size * 3 * args.crop**2)  # reused, as the trainer does

        def finish_ours(batch) -> int:
            n = len(batch.images)
            return to_input(batch.images, IMAGENET, pca_shift(n, IMAGENET, 0.1), memory).shape[0]

        def finish_tv(batch) -> int:
            return batch[0].shape[0]

        pipelines: dict[str, tuple[DataLoader, Callable]] = {"verydeep": (ours, finish_ours),
                                                              "torchvision": (tv, finish_tv)}
        if args.device.startswith("cuda"):
            pipelines["verydeep-gpu"] = gpu_pipeline(tmp, loader, args)
        for data, finish in pipelines.values():  # warm-up: start workers, fill the page cache
            time_loader(data, finish, 1)
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        costs: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, (data, finish) in pipelines.items():
                rate, cost = time_loader(data, finish, args.epochs)
                rates[name].append(rate)
                costs[name].append(cost)
    return source, rates, costs


def report(args: argparse.Namespace, source: str, rates: dict[str, list[float]], costs: dict[str, list[float]]) -> None:
    """Medians and ratios as lines and, with ``--json``, one JSON object."""
    medians = {name: statistics.median(r) for name, r in rates.items()}
    cpu_ms = {name: statistics.median(c) for name, c in costs.items()}
    ratio = medians["verydeep"] / medians["torchvision"]
    cpu_ratio = cpu_ms["torchvision"] / cpu_ms["verydeep"]
    print(f"images: {source}; crop {args.crop}, S in [{args.scale[0]}, {args.scale[1]}], "
          f"{args.workers} workers, batch {args.batch_size}, {args.rounds} rounds x {args.epochs} passes")
    for name, rate in medians.items():
        print(f"{name:12s} {rate:8.1f} images/s  (rounds: {', '.join(f'{r:.0f}' for r in rates[name])}), "
              f"{cpu_ms[name]:.2f} CPU ms/image")
    print(f"verydeep / torchvision: {ratio:.2f}x the images/s, {cpu_ratio:.2f}x less CPU per image")
    if "verydeep-gpu" in medians:
        print(f"verydeep-gpu / torchvision: {medians['verydeep-gpu'] / medians['torchvision']:.2f}x")
    if args.json:
        print(json.dumps({
            "source": source, "workers": args.workers, "batch_size": args.batch_size,
            "crop": args.crop, "scale": list(args.scale),
            "images_per_s": {k: round(v, 1) for k, v in medians.items()},
            "cpu_ms_per_image": {k: round(v, 3) for k, v in cpu_ms.items()},
            "ratio_vs_torchvision": round(ratio, 3),
            "cpu_ratio_vs_torchvision": round(cpu_ratio, 3),
            **({"gpu_ratio_vs_torchvision": round(medians["verydeep-gpu"] / medians["torchvision"], 3)}
               if "verydeep-gpu" in medians else {}),
        }))


def main() -> None:
    args = parse_args()
    # the workers own one core each; the main process (our to_input) gets the cores left over,
    # since OpenMP threads competing with busy workers slow everything down
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))
    report(args, *measure(args))


if __name__ == "__main__":
    main()
