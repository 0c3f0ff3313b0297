"""``verydeep data stats DIR``: the training set's mean RGB and RGB covariance eigen-decomposition.

The mean is what the paper subtracts (Sec. 2); the eigenvectors and eigenvalues drive the
AlexNet colour shift (Sec. 3.1). Computed on a random sample of images, at about the training
scale, and stored as ``preprocess.json`` beside the dataset, where :func:`load_preprocess`
finds it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Subset

from verydeep.data.datasets import IndexedImages, LabelledImages, _class_dirs, find_split, images_in
from verydeep.data.decode import ImageFile, decode, to_tensor
from verydeep.data.loaders import image_loader
from verydeep.data.preprocess import KEYS, MIN_STD, PREPROCESS_FILE, Preprocess, read_preprocess
from verydeep.data.splits import open_split
from verydeep.data.transforms import reduction, resized_size
from verydeep.errors import UserError
from verydeep.io.atomic import atomic_write
from verydeep.options import add_workers, input_path, output_file, seed_number
from verydeep.runtime.limits import usable_cores
from verydeep.runtime.progress import progress_bar


@dataclass(frozen=True)
class PixelMoments:
    """An image's pixel moments on the 0..1 scale: (13,) float64 = count, sum (3), sum of
    outer products (3x3). Pixels as decoded, JPEGs reduced (DCT scaling) while the smallest
    side stays at least ``side``; never resampled, so no interpolation bends the statistics; each
    image weighs the pixels it has at the training scale (smallest side ``side``), whatever its size
    and its reduction (a JPEG of side 512, halved, would otherwise count a quarter of one of 511).
    Computed where the image is read (DataLoader workers, one thread each)."""

    side: int

    def __call__(self, path: str | Path, generator: torch.Generator | None = None) -> Tensor:
        file = ImageFile(path)
        k = reduction(file.size, resized_size(file.size, self.side), file.reducible)
        pixels = to_tensor(decode(file.pillow(), k))
        x = pixels.permute(1, 2, 0).reshape(-1, 3).to(torch.float64) / 255.0  # HWC: a free view
        w, h = resized_size(file.size, self.side)
        weight = w * h / x.shape[0]
        count = torch.tensor([x.shape[0]], dtype=torch.float64)
        return torch.cat([count, x.sum(0), (x.T @ x).flatten()]) * weight


def pixel_images(folder: Path, transform: PixelMoments) -> LabelledImages:
    """The images the statistics average: a flat folder's images as they are, whatever label file lies beside
    them, since statistics need no labels; else the split's (its labels unused)."""
    if folder.is_dir() and not _class_dirs(folder):
        images = images_in(folder)
        if images:
            return IndexedImages(images, transform)
    return open_split(folder, transform)


def compute_stats(
    folder: str | Path,
    sample: int = 5000,
    side: int = 256,
    seed: int = 0,
    workers: int = 0,
    mean_only: bool = False,
    progress: bool = True,
) -> tuple[Preprocess, dict[str, Any]]:
    """Mean, per-channel std and covariance eigen-decomposition of RGB pixels (0..1 scale) over
    ``sample`` images of the split ``folder`` drawn with ``seed``.

    Eigenvalues descend; ``eigvec`` columns are the eigenvectors. ``mean_only`` stores the
    paper's preprocessing, std = 1/255 (mean subtraction on the 0..255 scale). Returns the
    statistics and a summary (images used, skipped, pixels).
    """
    dataset = pixel_images(Path(folder), PixelMoments(side))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    subset = Subset(dataset, order[: min(sample, len(dataset))].tolist())
    loader = image_loader(subset, None, workers)
    moments = torch.zeros(13, dtype=torch.float64)
    skipped = []
    with progress_bar(len(subset), progress, desc=f"stats {folder}", unit="img") as bar:
        for image_moments, _, path in loader:
            if image_moments is None:
                skipped.append(path)
            else:
                moments += image_moments
            bar.update()
    pixels = float(moments[0])  # at the training scale: weighted, not whole
    if pixels <= 0:
        raise UserError(f"data folder {folder}: no readable images in the sample")
    mean = moments[1:4] / pixels
    cov = moments[4:].view(3, 3) / pixels - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)
    eigval, eigvec = eigval.flip(0).clamp(min=0), eigvec.flip(1)
    std = (1 / 255,) * 3 if mean_only else tuple(cov.diagonal().clamp(min=0).sqrt().tolist())
    flat = [f"{channel} (std {value:.2g})" for channel, value in zip("RGB", std, strict=True) if value < MIN_STD]
    if flat:
        raise UserError(f"data folder {folder}: the sampled images hardly vary in {', '.join(flat)}, which no "
                        "normalisation can divide by; give --mean-only (the paper's mean subtraction)")
    pre = Preprocess(
        mean=tuple(mean.tolist()),  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        eigval=tuple(eigval.tolist()),  # type: ignore[arg-type]
        eigvec=tuple(tuple(row) for row in eigvec.tolist()),  # type: ignore[arg-type]
    )
    summary = {"folder": str(folder), "images": len(subset) - len(skipped), "skipped": skipped,
               "pixels": round(pixels), "side": side, "seed": seed}
    return pre, summary


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="dataset tools (statistics for preprocessing)")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    s = sub.add_parser("stats", help="mean RGB and RGB covariance eigenvectors of a training set")
    s.add_argument("dir", type=input_path, help="dataset root (its train/ split is used) or a split folder")
    s.add_argument("--out", type=output_file, default=None, help=f"output file (default: DIR/{PREPROCESS_FILE})")
    s.add_argument("--sample", type=int, default=5000, help="number of images sampled (default 5000)")
    s.add_argument("--side", type=int, default=256,
                   help="the training scale: each image weighs its pixels at this smallest side, and JPEGs are "
                        "decoded reduced while their smallest side stays >= it (default 256)")
    s.add_argument("--seed", type=seed_number, default=0, help="seed of the sample (default 0)")
    add_workers(s, default=min(8, usable_cores()), help="data-loading processes, at most the CPU cores (default: "
                                                        "the cores, at most 8)")
    s.add_argument("--mean-only", action="store_true",
                   help="store std = 1/255: the paper's mean subtraction on the 0..255 scale")
    s.set_defaults(func=run_cli)


def earlier_statistics(out: Path) -> dict[str, Any]:
    """What ``--out`` holds when it is earlier statistics, damaged ones included (a JSON object of their keys,
    :data:`KEYS`, the first four among them, and no other), which new ones replace; nothing for no file or an empty
    one. Any other file (a dataset's ``classes.txt`` or ``boxes.txt``, say) is a :class:`UserError` saying why, left
    as it is."""
    if not (out.is_file() and out.stat().st_size):
        return {}
    try:
        held = json.loads(out.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError):
        held = None
    if isinstance(held, dict) and set(KEYS[:4]) <= set(held) <= set(KEYS):
        return held
    try:
        read_preprocess(out)  # for the reason it is not statistics
    except UserError as error:
        why = str(error).removeprefix(f"{out}: bad preprocess statistics ")
        raise UserError(f"--out {out}: not a preprocess statistics file {why}; statistics are written over earlier "
                        "statistics only: give another --out") from None
    return {}


def run_cli(args: argparse.Namespace) -> None:
    if args.sample < 1 or args.side < 1:
        raise UserError(f"--sample and --side must be positive; got {args.sample} and {args.side}")
    folder = find_split(args.dir, "train")
    out = args.out or Path(args.dir) / PREPROCESS_FILE
    earlier = earlier_statistics(out)
    pre, summary = compute_stats(folder, args.sample, args.side, args.seed, args.workers, args.mean_only)
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = {"notes": earlier["notes"]} if "notes" in earlier else {}  # the user's, kept
    text = json.dumps({**pre.to_dict(), "computed_on": {**summary, "skipped": len(summary["skipped"])}, **notes},
                      indent=2)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text + "\n"))  # a file linked to it is left whole
    for path in summary["skipped"]:
        print(f"skipped {path}")
    fmt = ", ".join
    print(f"{summary['images']} images, {summary['pixels']} pixels at side {summary['side']}, "
          f"{len(summary['skipped'])} skipped")
    print(f"mean   {fmt(f'{v:.4f}' for v in pre.mean)}")
    print(f"std    {fmt(f'{v:.4f}' for v in pre.std)}")
    print(f"eigval {fmt(f'{v:.4f}' for v in pre.eigval)}")
    for row in pre.eigvec:
        print(f"eigvec {fmt(f'{v:+.4f}' for v in row)}")
    print(f"wrote {out}")
