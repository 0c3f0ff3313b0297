"""Classify images with a trained checkpoint: dense evaluation over the whole image (Sec. 3.2).

Each image is rescaled to every test scale Q of the checkpoint's recipe (see
:func:`verydeep.evaluate.derive_scales`), the fully-convolutional net's class score map averaged
spatially, the mirrored image averaged in, and the posteriors averaged over Q; the top-k classes
are reported with their human-readable names.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from verydeep.checkpoint import load_model
from verydeep.cli import device_name, positive_int
from verydeep.errors import MissingFileError, UserError
from verydeep.evaluate import average, dense_posteriors, derive_scales, parse_scales
from verydeep.report import to_json_dict
from verydeep.runtime import autocast, autocast_dtype, pick_device, prepare


@dataclass(frozen=True)
class RankedClass:
    """One of an image's top classes: its rank, index, class folder (``class_``, ``class`` in JSON),
    human-readable name and posterior probability."""

    rank: int
    index: int
    class_: str
    name: str
    probability: float


@dataclass(frozen=True)
class ImagePrediction:
    image: str
    top: list[RankedClass]


@dataclass(frozen=True)
class Prediction:
    """The top classes of each image, by a checkpoint at test scales ``scales``."""

    checkpoint: str
    scales: list[int]
    flip: bool
    predictions: list[ImagePrediction]

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)


@torch.inference_mode()
def predict(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    topk: int = 5,
    scales: Sequence[int] | None = None,
    flip: bool = True,
    device: str = "auto",
    precision: str = "auto",
) -> Prediction:
    """Top-``topk`` classes of each image. A missing or unreadable image is an error naming the file."""
    from verydeep.data import IMAGENET, Preprocess, RescaleTransform, to_input
    from verydeep.data.datasets import DECODE_ERRORS

    if topk < 1:
        raise UserError(f"--topk must be at least 1; got {topk}")
    for path in map(Path, images):
        if path.is_dir():
            raise UserError(f"{path}: a folder, not an image")
        if not path.is_file():
            raise MissingFileError(f"{path}: no such image")
    torch_device = pick_device(device)
    dtype = autocast_dtype(torch_device, precision)
    model, recipe = load_model(checkpoint)
    model = prepare(model, torch_device).eval()
    dense = model.dense()
    pre = Preprocess.from_dict(recipe["preprocess"]) if recipe.get("preprocess") else IMAGENET
    test_scales = sorted(set(scales)) if scales else derive_scales(recipe)
    if min(test_scales) < model.input_size:
        raise UserError(f"--scales {test_scales} include scales smaller than the crop {model.input_size}")
    classes = recipe.get("classes") or [str(i) for i in range(model.num_classes)]
    names = recipe.get("class_names") or classes
    predictions = []
    for path in images:
        per_scale = []
        for q in test_scales:
            try:
                image = RescaleTransform(q)(path)
            except DECODE_ERRORS as error:
                raise UserError(f"{path}: unreadable image ({type(error).__name__})") from error
            x = to_input(image.unsqueeze(0).to(torch_device), pre).contiguous(memory_format=torch.channels_last)
            with autocast(torch_device, dtype):
                per_scale.append(dense_posteriors(dense, x, flip).cpu())
        posterior = average(per_scale)[0]
        if not posterior.isfinite().all():
            raise UserError(f"{checkpoint}: the net's outputs are not finite (NaN or inf) on {path}")
        probabilities, indices = posterior.topk(min(topk, posterior.numel()))
        top = [RankedClass(rank + 1, int(i), classes[i], names[i], float(p))
               for rank, (p, i) in enumerate(zip(probabilities.tolist(), indices.tolist(), strict=True))]
        predictions.append(ImagePrediction(str(path), top))
    return Prediction(str(checkpoint), test_scales, flip, predictions)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="top-k classes of images, dense over the whole image (Sec. 3.2)")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint, .safetensors or run directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=positive_int, default=5, help="classes to list per image (default 5)")
    p.add_argument("--scales", type=parse_scales, default=None, help="test scales Q (default: from the recipe)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not average in the mirrored image")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    result = predict(args.checkpoint, args.images, args.topk, args.scales, args.flip, args.device, args.precision)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    for prediction in result.predictions:
        print(prediction.image)
        for entry in prediction.top:
            label = entry.name if entry.name == entry.class_ else f"{entry.name} ({entry.class_})"
            print(f"  {entry.rank}. {entry.probability:.3f}  {label}")
