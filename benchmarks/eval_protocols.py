"""Cost per image of dense versus 150-crop multi-crop evaluation at Q = {256, 384, 512} (Sec. 3.2, 4.3).

The same net, images and settings for both protocols, in one run: dense applies the
fully-convolutional net to the whole rescaled image and its mirror (2 passes per scale);
multi-crop runs the plain net on 50 crops per scale (5x5 grid and mirrors), 150 over the three
scales. Images are decoded and rescaled before timing, so the figures are the network's cost.
Uses real photos from ``../shared/data/imagenet-samples`` when present, else generated ones.

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
from PIL import Image

from verydeep import vgg
from verydeep.data import IMAGENET, RescaleTransform, to_input
from verydeep.evaluate import dense_posteriors, multicrop_posteriors, parse_scales
from verydeep.runtime import autocast, autocast_dtype, pick_device, prepare

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


@torch.inference_mode()
def main() -> None:
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
    scales = args.scales
    device = pick_device(args.device)
    dtype = autocast_dtype(device, args.precision)
    torch.manual_seed(0)
    model = prepare(vgg(args.config, width=args.width), device).eval()
    dense = model.dense()

    with tempfile.TemporaryDirectory() as scratch:
        paths, source = photo_paths(args.images, args.data, Path(scratch))
        inputs = {q: [to_input(RescaleTransform(q)(p).unsqueeze(0).to(device), IMAGENET)
                      .contiguous(memory_format=torch.channels_last) for p in paths] for q in scales}

    def run_dense(x: torch.Tensor) -> None:
        with autocast(device, dtype):
            dense_posteriors(dense, x, flip=True)

    def run_multicrop(x: torch.Tensor) -> None:
        with autocast(device, dtype):
            multicrop_posteriors(model, x, model.input_size, flip=True)

    run_dense(inputs[scales[0]][0])  # warm-up (allocator, kernels)
    run_multicrop(inputs[scales[0]][0])
    per_scale = []
    for q in scales:
        dense_s = sum(timed(lambda x=x: run_dense(x), device) for x in inputs[q]) / len(paths)
        crops_s = sum(timed(lambda x=x: run_multicrop(x), device) for x in inputs[q]) / len(paths)
        per_scale.append({"q": q, "dense_s_per_image": dense_s, "multicrop_s_per_image": crops_s})
        print(f"Q={q}: dense {dense_s:.3f} s/image, multi-crop (50 crops) {crops_s:.3f} s/image, "
              f"ratio {crops_s / dense_s:.1f}x")
    dense_total = sum(s["dense_s_per_image"] for s in per_scale)
    crops_total = sum(s["multicrop_s_per_image"] for s in per_scale)
    ratio = crops_total / dense_total
    name = f"VGG-{model.config} width {args.width:g}"
    print(f"{name} on {device} ({'bf16' if dtype else 'fp32'}), {len(paths)} images from {source}:")
    print(f"  dense over Q={{{','.join(map(str, scales))}}}: {dense_total:.3f} s/image; "
          f"{50 * len(scales)}-crop multi-crop: {crops_total:.3f} s/image; multi-crop costs {ratio:.1f}x dense")
    if args.json:
        print(json.dumps({
            "config": model.config, "width": args.width, "device": str(device),
            "precision": "bf16" if dtype else "fp32", "images": len(paths), "source": source, "scales": scales,
            "per_scale": per_scale, "dense_s_per_image": dense_total, "multicrop_s_per_image": crops_total,
            "crops_per_image": 50 * len(scales), "ratio_multicrop_vs_dense": ratio,
        }))


if __name__ == "__main__":
    main()
