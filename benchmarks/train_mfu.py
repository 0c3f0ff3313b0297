"""Images a second and model FLOPs utilisation (MFU) of a ``verydeep train`` run, from its own records.

The rate is the steady state of the run's step records (``metrics.jsonl``), the first ``--skip`` steps
left out (compilation, loader start); the FLOPs per image are counted from the run's model
(``recipe.json``: 2 per multiply-accumulate of the conv and linear layers, a training step taken as 3
forward passes, as ``verydeep bench`` counts them), and MFU is the rate in FLOP/s over the device's
dense peak in the run's precision (``--peak-tflops``, else this machine's GPU looked up in
:data:`PEAK_BF16_TFLOPS`).

    python benchmarks/train_mfu.py /tmp/e2e-gpu --skip 5 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verydeep import vgg
from verydeep.bench.measure import count_macs
from verydeep.bench.ours import steady_img_s

#: Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, of the GPUs as their makers state them, by a part of
#: the name CUDA reports (the first that matches wins).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "A10": 125.0, "RTX 4090": 165.2, "V100": 125.0}


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (fp16's on a V100, which has no bf16), or None when unknown."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS.items() if part in name), None)


def run_mfu(run: Path, skip: int, peak: float | None) -> dict[str, object]:
    """The run's steady images a second, FLOPs per image and, with a peak, MFU."""
    recipe = json.loads((run / "recipe.json").read_text())
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "step"]
    if len(steps) <= skip:
        raise SystemExit(f"{run}: {len(steps)} step records, no more than the {skip} left out")
    img_s = steady_img_s(run, len(steps) - skip, recipe["batch_size"])
    model = vgg(recipe["config"], num_classes=recipe.get("outputs") or recipe["num_classes"],
                batch_norm=recipe["batch_norm"], width=recipe["width"], input_size=recipe["crop"])
    flops = 6 * count_macs(model, recipe["crop"])
    result: dict[str, object] = {"run": str(run), "decode": recipe.get("decode"), "compile": recipe.get("compile"),
                                 "workers": recipe.get("workers"),
                                 "batch": recipe["batch_size"], "steps": len(steps) - skip, "img_s": round(img_s, 1),
                                 "train_flops_per_image": flops, "tflops": float(f"{img_s * flops / 1e12:.4g}"),
                                 "peak_tflops": peak}
    if peak:
        result["mfu"] = round(img_s * flops / 1e12 / peak, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a verydeep train run's directory (--out)")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (compilation, loader start)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, TFLOP/s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    peak = args.peak_tflops
    if peak is None:
        import torch

        peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    result = run_mfu(args.run, args.skip, peak)
    if args.json:
        print(json.dumps(result))
    else:
        mfu = f", MFU {result['mfu']:.1%} of {peak:g} TFLOP/s" if "mfu" in result else ""
        print(f"{result['img_s']} img/s ({result['tflops']} TFLOP/s){mfu}", file=sys.stdout)


if __name__ == "__main__":
    main()
