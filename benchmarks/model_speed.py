"""Training-step and inference speed of verydeep's VGG against torchvision's, in the same process.

Both models get the same treatment (device, autocast dtype, memory format, optional
torch.compile), so the ratio isolates the model code; the absolute images/s tell what this
machine can do. Rounds alternate between the two models and the median is reported, because
shared machines are noisy.

    python benchmarks/model_speed.py --config D --batch 64 --size 224          # a GPU
    python benchmarks/model_speed.py --config D --width 0.25 --size 32 --batch 64   # a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from verydeep import vgg
from verydeep.bench.measure import images_per_second
from verydeep.bench.reference import plain_steps, reference_model
from verydeep.bench.settings import TORCHVISION
from verydeep.runtime.device import pick_device, prepare
from verydeep.runtime.precision import autocast_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="D", choices=sorted(TORCHVISION))
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (both models)")
    parser.add_argument("--size", type=int, default=224, help="input side (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()

    device = pick_device(args.device)
    dtype = autocast_dtype(device, args.precision)
    channels_last = not args.no_channels_last
    torch.manual_seed(0)
    ours = vgg(args.config, num_classes=1000, width=args.width, input_size=args.size)
    reference = reference_model(args.config, args.width, args.size, 1000)
    models = {"verydeep": ours, "torchvision": reference}
    models = {name: prepare(m, device, channels_last) for name, m in models.items()}
    if args.compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    steps = {name: plain_steps(m, x, y, device, dtype) for name, m in models.items()}
    for train_step, infer_step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            train_step()
            infer_step()
    rates: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in steps}
    for _ in range(args.rounds):
        for name, (train_step, infer_step) in steps.items():
            rates[name]["train"].append(images_per_second(train_step, args.batch, args.steps, device))
            rates[name]["infer"].append(images_per_second(infer_step, args.batch, args.steps, device))
    median = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rates.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "config": args.config, "width": args.width, "size": args.size, "batch": args.batch,
        "dtype": str(dtype or torch.float32), "channels_last": channels_last, "compile": args.compile,
        "train_img_s": {n: round(m["train"], 1) for n, m in median.items()},
        "infer_img_s": {n: round(m["infer"], 1) for n, m in median.items()},
        "train_ratio_vs_torchvision": round(median["verydeep"]["train"] / median["torchvision"]["train"], 3),
        "infer_ratio_vs_torchvision": round(median["verydeep"]["infer"] / median["torchvision"]["infer"], 3),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    for name in steps:
        print(f"{name:<12} train {median[name]['train']:>9.1f} img/s   inference {median[name]['infer']:>9.1f} img/s")
    print(f"ratio verydeep/torchvision: train {result['train_ratio_vs_torchvision']}, "
          f"inference {result['infer_ratio_vs_torchvision']}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
