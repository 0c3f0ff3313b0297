"""Where ``--decode gpu`` spends a batch: nvJPEG's decoding against cutting (resampling each plan's box).

Batches of ``--batch`` training images of a folder (Imagenette by default) are planned as the DataLoader
workers plan them (``EncodedTransform(TrainTransform)``), then each batch is decoded on the GPU
(``device_decode``: torchvision's batched nvJPEG, the hardware decoder where the GPU has one) and decoded
and cut (``decode_batch``, as training runs it). Both are timed on the host (what the decoding thread
spends) with the GPU synchronised after each batch, medians over the batches.

    python benchmarks/gpu_decode.py ../shared/data/imagenette/train --batch 128 --batches 6 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from verydeep.data import TrainTransform
from verydeep.data.gpu import EncodedTransform, collate_encoded, decode_batch, device_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of JPEGs (searched recursively)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--scale", type=int, default=256, help="S of the training transform (crop 224)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    paths = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    transform = EncodedTransform(TrainTransform(crop=224, scale=(args.scale, args.scale)))
    generator = torch.Generator().manual_seed(0)
    batches = [collate_encoded([(transform(p, generator), 0, str(p)) for p in paths[i:i + args.batch]])
               for i in range(0, min(len(paths), args.batch * args.batches), args.batch)]
    times: dict[str, list[float]] = {"decode": [], "decode_and_cut": []}
    for round_ in range(2):  # the first round warms nvJPEG and the allocator up
        for batch in batches:
            for name, work in (("decode", lambda b: device_decode([p for p in b.payloads() if p.dim() == 1], device)),
                               ("decode_and_cut", lambda b: decode_batch(b, device))):
                torch.cuda.synchronize()
                start = time.perf_counter()
                work(batch)
                torch.cuda.synchronize()
                if round_:
                    times[name].append(time.perf_counter() - start)
    result = {"gpu": torch.cuda.get_device_name(), "images": len(paths), "batch": args.batch,
              **{f"{name}_ms": round(statistics.median(t) * 1e3, 2) for name, t in times.items()},
              **{f"{name}_img_s": round(args.batch / statistics.median(t), 1) for name, t in times.items()}}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
