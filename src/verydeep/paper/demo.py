"""``verydeep demo``: the whole system on a real dataset that ships with scikit-learn, offline.

scikit-learn's handwritten digits (1,797 scans of 8x8 pixels, 10 classes, UCI) are written once
as an ImageFolder tree of 32x32 RGB PNGs (``train/`` and ``val/``), a narrow VGG is trained on
them with the paper's augmentation, evaluated with the paper's protocols (single-scale,
multi-scale, dense, multi-crop and combined), and the tables, a learning-curve plot and a
markdown report are written to the run directory.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from verydeep.io.outputs import refuse_a_training_run
from verydeep.options import add_device, add_progress, output_dir, positive_int
from verydeep.paper.presets import PRESETS, within_budget
from verydeep.paper.reproduce import reproduce
from verydeep.runtime.device import pick_device

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits(root: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's digits as ``root/{train,val}/<digit>/<n>.png`` (once); returns ``root``."""
    from sklearn.datasets import load_digits

    if (root / "val").is_dir() and (root / "classes.txt").is_file():
        return root
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_val = round(len(order) * val_fraction)
    for split, indices in (("val", order[:n_val]), ("train", order[n_val:])):
        for i in indices:
            folder = root / split / DIGIT_NAMES[digits.target[i]]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
            image.convert("RGB").save(folder / f"{i:04d}.png")
    (root / "classes.txt").write_text("".join(f"{name} {name}\n" for name in DIGIT_NAMES))
    return root


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train and evaluate a narrow VGG on scikit-learn's digits, offline")
    p.add_argument("--out", type=output_dir, default=Path("runs/demo"), help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training budget (default: the digits preset's)")
    add_device(p)
    add_progress(p)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    start = time.time()
    out = Path(args.out)
    refuse_a_training_run(out)
    pick_device(args.device)  # checked before the digits are written into --out
    data = write_digits(out / "data")
    preset = PRESETS["digits"]
    if args.epochs is not None:
        preset = within_budget(replace(preset, epochs=args.epochs))
    from verydeep.cli import command_line  # the command line's module imports this one

    report = reproduce(data, preset, "digits", out, device=args.device, progress=args.progress,
                       command=command_line())
    print(report.markdown)
    print(f"\nDemo finished in {time.time() - start:.0f} s. Report: {out / 'REPRODUCTION.md'}; "
          f"plots: {out / 'learning_curves.png'}, {out / 'errors.png'}")
    print("\nThe same on your own ImageNet-style folder (DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg):")
    print("  verydeep train --data DIR --config D --scale 256:512 --out runs/mine")
    print("  verydeep eval --checkpoint runs/mine --data DIR --protocol dense+multicrop")
    print("  verydeep reproduce --data DIR --preset imagenette --out runs/reproduce")
