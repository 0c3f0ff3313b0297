"""Cost per image of dense versus 150-crop multi-crop evaluation at Q = {256, 384, 512} (Sec. 3.2, 4.3).

The same net, images and settings for both protocols, in one run: dense applies the
fully-convolutional net to the whole rescaled image and its mirror (2 passes per scale);
multi-crop runs the plain net on 50 crops per scale (5x5 grid and mirrors), 150 over the three
scales. The net is held as ``verydeep eval`` holds it (weights in the autocast dtype). As the
reference for dense evaluation, the usual conversion runs beside it: FC layers as convolutions
(FC6 a 7x7 conv over the trunk map) on fp32 weights under autocast. Images are decoded and
rescaled before timing, so the figures are the network's cost. Uses real photos from
``../shared/data/imagenet-samples`` when present, else generated ones.

    python benchmarks/eval_protocols.py                        # CPU: D at width 1/4, 4 images
    python benchmarks/eval_protocols.py --device cuda --width 1 --images 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from verydeep import vgg
from verydeep.data import IMAGENET, RescaleTransform, to_input
from verydeep.eval.sweep import dense_posteriors, multicrop_posteriors
from verydeep.options import parse_scales
from verydeep.runtime.device import pick_device, prepare
from verydeep.runtime.precision import autocast, autocast_dtype

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"


def photo_paths(count: int, folder: Path, scratch: Path) -> tuple[list[Path], str]:
    """``count`` real JPEGs from ``folder``, else generated 500x375 ones written to ``scratch``."""
    if folder.is_dir():
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[:count]
        if photos:
            return photos, str(folder)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = scratch / f"generated_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths, "generated 500x375 JPEGs"


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class ConvHead(nn.Module):
    """The reference dense net: the trunk, then FC6 as a ``grid x grid`` convolution and FC7, FC8 as 1x1
    convolutions whose weights are views of the FC layers'."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, kernel = self.model.features(x), self.model.grid
        for module in self.model.classifier:
            if isinstance(module, nn.Linear):
                x = F.conv2d(x, module.weight.view(module.out_features, -1, kernel, kernel), module.bias)
                kernel = 1
            else:
                x = module(x)
        return x


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="D")
    parser.add_argument("--width", type=float, default=0.25, help="width multiplier (default 1/4 for a CPU)")
    parser.add_argument("--images", type=int, default=4, help="images to evaluate (default 4)")
    parser.add_argument("--scales", type=parse_scales, default="256,384,512", help="test scales Q")
    parser.add_argument("--data", type=Path, default=SAMPLES, help="folder of JPEG photos")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images must be at least 1; got {args.images}")
    return args


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    scales = args.scales
    device = pick_device(args.device)
    dtype = autocast_dtype(device, args.precision)
    torch.manual_seed(0)
    reference = prepare(vgg(args.config, width=args.width), device).eval()
    model = prepare(vgg(args.config, width=args.width), device, dtype=dtype).eval()
    model.load_state_dict(reference.state_dict())
    dense, conv_head = model.dense(), ConvHead(reference)

    with tempfile.TemporaryDirectory() as scratch:
        paths, source = photo_paths(args.images, args.data, Path(scratch))
        inputs = {q: [to_input(RescaleTransform(q)(p).unsqueeze(0).to(device), IMAGENET)
                      .contiguous(memory_format=torch.channels_last) for p in paths] for q in scales}

    protocols = {"dense": lambda x: dense_posteriors(dense, x, flip=True),
                 "dense_conv_head": lambda x: dense_posteriors(conv_head, x, flip=True),
                 "multicrop": lambda x: multicrop_posteriors(model, x, model.input_size, flip=True)}
    with autocast(device, dtype):
        for run in protocols.values():  # warm-up (allocator, kernels)
            run(inputs[scales[0]][0])
        per_scale = []
        for q in scales:
            seconds = {name: sum(timed(lambda x=x, run=run: run(x), device) for x in inputs[q]) / len(paths)
                       for name, run in protocols.items()}
            per_scale.append({"q": q, **{f"{name}_s_per_image": value for name, value in seconds.items()}})
            print(f"Q={q}: dense {seconds['dense']:.3f} s/image (reference {seconds['dense_conv_head']:.3f}), "
                  f"multi-crop (50 crops) {seconds['multicrop']:.3f} s/image, ratio "
                  f"{seconds['multicrop'] / seconds['dense']:.1f}x")
    summary = {"config": model.config, "width": args.width, "device": str(device),
               "precision": "bf16" if dtype else "fp32", "images": len(paths), "source": source, "scales": scales}
    report(summary, per_scale, args.json)


def report(summary: dict, per_scale: list[dict], as_json: bool) -> None:
    """The totals over the scales, as a line and, with ``as_json``, one JSON object."""
    names = ("dense", "dense_conv_head", "multicrop")
    total = {name: sum(s[f"{name}_s_per_image"] for s in per_scale) for name in names}
    ratio, speedup = total["multicrop"] / total["dense"], total["dense_conv_head"] / total["dense"]
    scales = summary["scales"]
    print(f"VGG-{summary['config']} width {summary['width']:g} on {summary['device']} ({summary['precision']}), "
          f"{summary['images']} images from {summary['source']}:")
    print(f"  dense over Q={{{','.join(map(str, scales))}}}: {total['dense']:.3f} s/image ({speedup:.2f}x faster than "
          f"FC layers as convolutions on fp32 weights, {total['dense_conv_head']:.3f}); {50 * len(scales)}-crop "
          f"multi-crop: {total['multicrop']:.3f} s/image; multi-crop costs {ratio:.1f}x dense")
    if as_json:
        print(json.dumps({
            **summary, "per_scale": per_scale, "dense_s_per_image": total["dense"],
            "multicrop_s_per_image": total["multicrop"], "dense_conv_head_s_per_image": total["dense_conv_head"],
            "dense_speedup_vs_conv_head": speedup, "crops_per_image": 50 * len(scales),
            "ratio_multicrop_vs_dense": ratio,
        }))


if __name__ == "__main__":
    main()
