"""``verydeep bench``: speed against the hardware's limit, measured in one run.

On the machine at hand, in rounds that alternate between the contenders (medians reported, since
shared machines are noisy; a ratio or roofline share is the median of the rounds' own, each
between measurements taken moments apart): the roofline of each precision a contender runs in (the
fastest rate the machine reaches in it: large ``torch.mm`` and the convolutions of the net's own
shapes, :mod:`verydeep.roofline`, the kernel that set it named), torchvision's VGG in a plain fp32
loop (NCHW, no autocast) as the reference, torchvision's VGG as a user at their best runs it
(:mod:`verydeep.peer`: autocast, channels_last, the fused update, eager or compiled, whichever is
faster here), our training step and inference as ``verydeep train`` and ``verydeep eval`` run them
(the trainer's own step, autocast at the precision ``auto`` picks, channels_last; evaluation's net
with its weights held in that precision), the trainer end to end on JPEGs (data loading included,
in steady state: from the trainer's own step records, leaving out a step for each loader process,
and one, after the loader starts, since the batches its processes made while the first step waited
are not the steady state), and dense against 150-crop evaluation (Q = 3 scales) per image. FLOPs
per image are counted from the model (2 per multiply-accumulate of the conv and linear layers; a
training step is taken as 3 forward passes), so each rate is also a share of its precision's
roofline, and the roofline over torchvision's rate is the ratio a net at 100% of the roofline
would reach.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from verydeep import roofline, runtime
from verydeep.cli import add_device, add_workers, positive_int, width_multiplier
from verydeep.errors import UserError
from verydeep.peer import VARIANTS, best_variant, peer_contenders, peer_dtype
from verydeep.roofline import precision_name

#: torchvision's builder of each configuration it has.
TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
#: Images the bench trains on when present, beside the repository.
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenette"
#: Settings that fit each kind of device: a few minutes on 2 CPU cores, the paper's size on a GPU.
DEFAULTS = {"cpu": {"width": 0.5, "size": 128, "batch": 16, "steps": 5, "gemm": 2048},
            "cuda": {"width": 1.0, "size": 224, "batch": 64, "steps": 5, "gemm": 8192}}
#: Training steps before any timing (allocator, kernels, loader workers).
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Settings:
    """What one bench run measures (``steps`` timed per contender and round; ``gemm``: the matrix side)."""

    config: str
    size: int
    width: float
    batch: int
    rounds: int
    steps: int
    device: str
    gemm: int
    data: Path | None = None
    workers: int | None = None
    compile: bool = False
    compiled_peer: bool = True


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], Any], images: int, steps: int, device: torch.device) -> float:
    """Images per second of ``steps`` calls of ``step``, each on ``images`` images."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return images * steps / (time.perf_counter() - start)


def plain_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None) -> tuple[Callable[[], None], Callable[[], None]]:
    """A plain training step (forward, cross-entropy, backward, SGD with momentum) and an inference
    step of ``model`` on ``x``, under autocast to ``dtype`` (None: fp32)."""
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        with runtime.autocast(device, dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    @torch.inference_mode()
    def infer_step() -> None:
        model.eval()
        with runtime.autocast(device, dtype):
            model(x)
        model.train()

    return train_step, infer_step


def reference_model(config: str, width: float, size: int, num_classes: int) -> nn.Module:
    """torchvision's VGG of ``config``; at another width or input size its layers are ours (the
    same modules and shapes) inside torchvision's model."""
    from verydeep import vgg

    reference = getattr(torchvision.models, TORCHVISION[config])(weights=None, num_classes=num_classes)
    if width != 1.0 or size != 224:
        ours = vgg(config, num_classes=num_classes, width=width, input_size=size)
        reference.features, reference.classifier = ours.features, ours.classifier
        reference.avgpool = nn.AdaptiveAvgPool2d(size // 32)
    return reference


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates per image of ``model``'s conv and linear layers on a ``size`` x ``size``
    RGB image, counted with forward hooks."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    parameter = next(model.parameters())
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=parameter.device))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return total


def alternate(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each contender's measurements, one per round, the contenders taking turns in every round."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, measure in contenders.items():
            results[name].append(measure())
    return results


def test_scales(size: int) -> list[int]:
    """Three test scales Q for a ``size`` crop, as 256, 384, 512 are for 224."""
    s = round(size * 8 / 7)
    return [s, round(1.5 * s), 2 * s]


def bench_data(data: Path | None, scratch: Path, size: int, count: int) -> tuple[Path, str]:
    """A dataset folder under ``scratch`` (train/ and val/): links to ``data``'s class folders, else
    ``count`` generated 4:3 JPEGs in 10 classes, their short side 1.2 times the training scale."""
    from verydeep.data.datasets import find_split

    root = scratch / "data"
    root.mkdir()
    if data is not None:
        train = find_split(data, "train")
        try:
            val = find_split(data, "val")
        except UserError:
            val = train
        (root / "train").symlink_to(train.resolve(), target_is_directory=True)
        (root / "val").symlink_to(val.resolve(), target_is_directory=True)
        return root, str(data)
    rng = np.random.default_rng(0)
    side = round(1.2 * test_scales(size)[0])
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
        for split in ("train", "val"):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < 10:
                img.save(folder / f"{i}.jpg", quality=90)
    return root, f"{count} generated {side * 4 // 3}x{side} JPEGs"


def left_out(workers: int) -> int:
    """Steps left out of an end-to-end measurement after the loader starts: one for each of its processes
    and one."""
    return workers + 1


def training_steps(settings: Settings, workers: int) -> int:
    """Training steps the bench takes from one epoch: the step alone's warm-up and rounds, then end to end the
    warm-up and each round's steps with those left out."""
    skip = left_out(workers)
    return 2 * WARMUP_STEPS + skip + settings.rounds * (2 * settings.steps + skip)


def open_trainer(settings: Settings, root: Path, scratch: Path) -> Any:
    """The trainer ``verydeep train`` would build for these settings, on the images at ``root``."""
    from verydeep.train import Trainer
    from verydeep.train.recipe import TrainConfig

    s = test_scales(settings.size)[0]
    cfg = TrainConfig(data=str(root), out=str(scratch / "run"), config=settings.config, width=settings.width,
                      crop=settings.size, scale=(s, s), batch_size=settings.batch, epochs=1, lr=1e-3,
                      workers=settings.workers, device=settings.device, precision="auto", progress=False,
                      compile=settings.compile)
    trainer = Trainer(cfg, runtime.Processes())
    need = training_steps(settings, trainer.workers)
    if trainer.sampler.steps_per_epoch < need:
        raise UserError(f"--data {settings.data}: {len(trainer.data.train_indices)} training images, fewer than the "
                        f"{need * settings.batch} the bench's {need} steps of {settings.batch} need")
    trainer.run_dir.mkdir(parents=True, exist_ok=True)  # for the step records, as a run makes it
    trainer.model.train()
    return trainer


def inference_net(trainer: Any) -> nn.Module:
    """A copy of the trainer's model as evaluation holds a net: eval mode, weights in the autocast dtype."""
    return runtime.prepare(copy.deepcopy(trainer.model), trainer.device, trainer.cfg.channels_last,
                           trainer.dtype).eval()


def steady_img_s(run_dir: Path, steps: int, batch: int) -> float:
    """Images per second of the last ``steps`` training steps, from the trainer's step records."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("kind") == "step"][-steps:]
    return steps * batch / sum(batch / r["img_s"] for r in records)


def trainer_contenders(trainer: Any, model: nn.Module, steps: int) -> dict[str, Callable[[], float]]:
    """Our training step (the trainer's own, on one loaded batch), inference of ``model`` (the trainer's net
    as :func:`inference_net` holds it), and the trainer end to end (data loading included; the steps
    :func:`left_out` after the loader starts not counted), each as images per second over ``steps``."""
    device = trainer.device
    loaded, draws = next(iter(trainer.loader))
    batch, draws = trainer.stepper.on_device(loaded, draws)
    images = batch.images.shape[0]
    x = trainer.stepper.input(batch, draws.shifts).clone(memory_format=torch.preserve_format)

    def train_step() -> None:
        start = time.perf_counter()
        loss = trainer.stepper.micro_step(batch, draws, sync=True)
        trainer.finish_step(loss, images, 0, start)

    @torch.inference_mode()
    def infer_step() -> None:
        with runtime.autocast(device, trainer.dtype):
            model(x)

    def end_to_end(count: int = steps) -> float:
        target = trainer.step + left_out(trainer.workers) + count
        if trainer.train_epoch(stop_after_steps=target) or trainer.step != target:
            raise UserError("the bench ran out of training images within an epoch; give more with --data")
        return steady_img_s(trainer.run_dir, count, trainer.cfg.batch_size)

    end_to_end(WARMUP_STEPS)
    for _ in range(WARMUP_STEPS):
        train_step()
        infer_step()
    return {"train": lambda: images_per_second(train_step, images, steps, device),
            "infer": lambda: images_per_second(infer_step, images, steps, device),
            "end_to_end": end_to_end}


def protocol_contenders(trainer: Any, model: nn.Module, photo: Path) -> dict[str, Callable[[], float]]:
    """Seconds per image of dense and of 150-crop multi-crop evaluation over three scales Q, with and
    without the mirror image, of ``model`` (the trainer's net as :func:`inference_net` holds it) on ``photo``."""
    from verydeep.data import RescaleTransform, to_input
    from verydeep.eval.evaluate import dense_posteriors, multicrop_posteriors

    device, crop = trainer.device, trainer.cfg.crop
    inputs = [to_input(RescaleTransform(q)(photo).unsqueeze(0).to(device), trainer.pre)
              .contiguous(memory_format=torch.channels_last) for q in test_scales(crop)]
    dense = model.dense()

    def seconds(protocol: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], float]:
        @torch.inference_mode()
        def measure() -> float:
            sync(device)
            start = time.perf_counter()
            with runtime.autocast(device, trainer.dtype):
                for x in inputs:
                    protocol(x)
            sync(device)
            return time.perf_counter() - start

        measure()
        return measure

    return {"multicrop_s": seconds(lambda x: multicrop_posteriors(model, x, crop, flip=True)),
            "dense_s": seconds(lambda x: dense_posteriors(dense, x, flip=True))}


def reference_contenders(settings: Settings, num_classes: int, device: torch.device) -> dict[str, Callable[[], float]]:
    """torchvision's VGG, plain fp32 and NCHW: training step and inference, images per second."""
    torch.manual_seed(0)
    model = reference_model(settings.config, settings.width, settings.size, num_classes).to(device)
    x = torch.randn(settings.batch, 3, settings.size, settings.size, device=device)
    y = torch.randint(0, num_classes, (settings.batch,), device=device)
    train_step, infer_step = plain_steps(model, x, y, device, None)
    model.train()
    for _ in range(WARMUP_STEPS):
        train_step()
        infer_step()
    return {"torchvision_train": lambda: images_per_second(train_step, settings.batch, settings.steps, device),
            "torchvision_infer": lambda: images_per_second(infer_step, settings.batch, settings.steps, device)}


def roofline_contenders(settings: Settings, model: nn.Module, dtypes: set[torch.dtype | None],
                        device: torch.device) -> dict[str, roofline.Roofline]:
    """The roofline of each precision in ``dtypes`` (None: fp32), in TFLOP/s each time it is measured: a large
    ``torch.mm`` (``gemm_<p>_tflops``) and the convolutions of ``model``'s shapes at the bench's batch
    (``conv_<p>_tflops``), each recording the kernel that set it."""
    contenders = {}
    for dtype in sorted(dtypes, key=lambda d: list(roofline.PRECISIONS).index(d)):
        p = precision_name(dtype)
        contenders[f"gemm_{p}_tflops"] = roofline.gemm_roofline(device, dtype, settings.gemm)
        contenders[f"conv_{p}_tflops"] = roofline.conv_roofline(model, settings.size, settings.batch, device, dtype)
    return contenders


def best_contenders(settings: Settings, num_classes: int, device: torch.device,
                    dtype: torch.dtype | None) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
    """torchvision's VGG at its best (:mod:`verydeep.peer`) in ``dtype``, eager and, unless the settings leave
    it out, compiled: training step and inference, images per second; and what the peer is."""
    torch.manual_seed(0)
    model = reference_model(settings.config, settings.width, settings.size, num_classes).to(device)
    x = torch.randn(settings.batch, 3, settings.size, settings.size, device=device)
    y = torch.randint(0, num_classes, (settings.batch,), device=device)
    return peer_contenders(model, x, y, dtype, settings.steps, WARMUP_STEPS, settings.compiled_peer)


def machine(device: torch.device) -> dict[str, Any]:
    """The hardware and software the figures belong to."""
    info: dict[str, Any] = {
        "cpu": runtime.cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
        "avx2": bool(torch.cpu._is_avx2_supported()), "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory: the device's allocations on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_bench(settings: Settings) -> dict[str, Any]:
    """Every measurement of the bench, in alternating rounds; the result as :func:`summarise` gives it."""
    device = runtime.pick_device(settings.device)
    dtype, peer = runtime.autocast_dtype(device, "auto"), peer_dtype(device)
    with tempfile.TemporaryDirectory() as scratch:
        workers = runtime.default_workers() if settings.workers is None else settings.workers
        need = (training_steps(settings, workers) + 1) * settings.batch
        root, source = bench_data(settings.data, Path(scratch), settings.size, need)
        trainer = open_trainer(settings, root, Path(scratch))
        photo = next(p for p in sorted((root / "train").rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg"))
        net = inference_net(trainer)
        rooflines = roofline_contenders(settings, trainer.model, {None, dtype, peer}, device)
        best, peer_info = best_contenders(settings, len(trainer.data.classes), device, peer)
        contenders = {**rooflines, **reference_contenders(settings, len(trainer.data.classes), device), **best,
                      **trainer_contenders(trainer, net, settings.steps),  # the loader's prefetching after
                      **protocol_contenders(trainer, net, photo)}  # the end-to-end steps falls in the multi-crop
        rounds = alternate(contenders, settings.rounds)
        macs = count_macs(trainer.model, settings.size)
    kernels = {name: measured.winners for name, measured in rooflines.items()}
    return summarise(rounds, macs, dtype, settings, source, machine(device), peak_memory_gib(device), kernels,
                     peer_info)


def sig(value: float) -> float:
    """``value`` to four significant digits."""
    return float(f"{value:.4g}")


def paired(numerator: list[float], denominator: list[float], scale: float = 1.0) -> float:
    """The median over the rounds of each round's ``scale * numerator / denominator``."""
    return sig(statistics.median(scale * a / b for a, b in zip(numerator, denominator, strict=True)))


def peer_fields(rounds: dict[str, list[float]], peer: dict[str, Any], roof: list[float],
                flops: dict[str, int]) -> dict[str, Any]:
    """The peer at its best (its faster variant at each of ``train`` and ``infer``, named): its rates, our
    ratios to them and its share of its precision's roofline ``roof`` (per round)."""
    info = dict(peer)
    fields: dict[str, Any] = {"torchvision_best": info}
    for mode in ("train", "infer"):
        variant = info[mode] = best_variant(rounds, mode)
        for v in VARIANTS:
            key = f"torchvision_best_{v}_{mode}"
            info[f"{v}_{mode}_img_s"] = sig(statistics.median(rounds[key])) if key in rounds else None
        best = rounds[f"torchvision_best_{variant}_{mode}"]
        fields[f"torchvision_best_{mode}_img_s"] = sig(statistics.median(best))
        fields[f"{mode}_ratio_vs_torchvision_best"] = paired(rounds[mode], best)
        fields[f"torchvision_best_{mode}_roofline_share"] = paired(best, roof, flops[mode] / 1e12)
    return fields


def summarise(rounds: dict[str, list[float]], macs: int, dtype: torch.dtype | None, settings: Settings,
              source: str, hardware: dict[str, Any], peak_gib: float, kernels: dict[str, list[str]] | None = None,
              peer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Medians, ratios and roofline shares (each the median of the rounds' own, against each round's roofline)
    of the rounds' measurements, as one JSON-ready dict; ``kernels``: the kernel that set each roofline
    measurement, ``peer``: what torchvision at its best is (its rounds ``torchvision_best_*``)."""
    m = {name: statistics.median(values) for name, values in rounds.items()}
    precision = precision_name(dtype)
    roofs = {p: roofline.per_round(rounds, kernels or {}, p) for p in roofline.DTYPES
             if f"gemm_{p}_tflops" in rounds or f"conv_{p}_tflops" in rounds}
    top = {p: roofline.summary(*measured) for p, measured in roofs.items()}
    flops = {"train": 6 * macs, "infer": 2 * macs}

    def share(name: str, mode: str, p: str = precision) -> float:
        return paired(rounds[name], roofs[p][0], flops[mode] / 1e12)

    def at_roofline(mode: str) -> float:  # the roofline over torchvision fp32's rate, in its FLOPs
        return sig(top[precision]["tflops"] * 1e12 / (m[f"torchvision_{mode}"] * flops[mode]))

    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": hardware,
        "settings": {**asdict(settings), "data": source, "warmup_steps": WARMUP_STEPS,
                     "test_scales": test_scales(settings.size)},
        "precision": precision,
        "gemm_tflops": {p: sig(m[f"gemm_{p}_tflops"]) for p in roofs if f"gemm_{p}_tflops" in m},
        "conv_tflops": {p: sig(m[f"conv_{p}_tflops"]) for p in roofs if f"conv_{p}_tflops" in m},
        "rooflines": {p: {"tflops": sig(t["tflops"]), "kernel": t["kernel"]} for p, t in top.items()},
        "roofline_tflops": sig(top[precision]["tflops"]), "roofline_kernel": top[precision]["kernel"],
        "macs_per_image": macs, "train_flops_per_image": flops["train"], "infer_flops_per_image": flops["infer"],
        "train_img_s": sig(m["train"]), "infer_img_s": sig(m["infer"]),
        "torchvision_fp32_train_img_s": sig(m["torchvision_train"]),
        "torchvision_fp32_infer_img_s": sig(m["torchvision_infer"]),
        "train_ratio_vs_torchvision_fp32": paired(rounds["train"], rounds["torchvision_train"]),
        "infer_ratio_vs_torchvision_fp32": paired(rounds["infer"], rounds["torchvision_infer"]),
        "train_ratio_at_roofline": at_roofline("train"), "infer_ratio_at_roofline": at_roofline("infer"),
        "train_roofline_share": share("train", "train"), "infer_roofline_share": share("infer", "infer"),
        "torchvision_fp32_train_roofline_share": share("torchvision_train", "train", "fp32"),
        "torchvision_fp32_infer_roofline_share": share("torchvision_infer", "infer", "fp32"),
    }
    if peer is not None:
        result.update(peer_fields(rounds, peer, roofs[peer["precision"]][0], flops))
    return result | {
        "end_to_end_img_s": sig(m["end_to_end"]),
        "end_to_end_vs_step": paired(rounds["end_to_end"], rounds["train"]),
        "dense_s_per_image": sig(m["dense_s"]), "multicrop_s_per_image": sig(m["multicrop_s"]),
        "multicrop_vs_dense": sig(m["multicrop_s"] / m["dense_s"]),
        "peak_memory_gib": sig(peak_gib),
        "rounds": {name: [sig(v) for v in values] for name, values in rounds.items()},
        "roofline_kernels": kernels or {},
    }


def row(name: str, result: dict[str, Any], rate: str, share: str) -> str:
    """A contender's line of the table: training and inference rates (``rate`` and ``share`` formatted with
    ``train``, ``infer``) and roofline shares."""
    return (f"{name:<26}{result[rate.format('train')]:>12.1f}{result[share.format('train')]:>8.0%}"
            f"{result[rate.format('infer')]:>13.1f}{result[share.format('infer')]:>8.0%}")


def peer_rows(result: dict[str, Any]) -> list[str]:
    """The table's lines of torchvision at its best, when measured: its row, our ratios to it, its compiler's
    failure."""
    if "torchvision_best" not in result:
        return []
    best = result["torchvision_best"]
    lines = [row(f"torchvision best {best['precision']}", result, "torchvision_best_{}_img_s",
                 "torchvision_best_{}_roofline_share"),
             f"{'':<4}({best['train']} for training, {best['infer']} for inference; ratio vs it: train "
             f"{result['train_ratio_vs_torchvision_best']:.2f}x, "
             f"inference {result['infer_ratio_vs_torchvision_best']:.2f}x)"]
    if best["compile_error"]:
        lines.append(f"{'':<4}(not compiled: {best['compile_error']})")
    return lines


def render(result: dict[str, Any]) -> str:
    """The result as a short table."""
    s, hw = result["settings"], result["machine"]
    where = hw.get("gpu") or f"{hw['cpu']}, {hw['threads']} threads"
    lines = [
        f"VGG-{s['config']} width {s['width']:g}, {s['size']}x{s['size']}, batch {s['batch']}, on {where}; "
        f"precision {result['precision']}{', trainer compiled' if s.get('compile') else ''}; {s['rounds']} rounds, "
        f"medians; images: {s['data']}",
        *(f"roofline {p}: {r['tflops']:.3f} TFLOP/s ({r['kernel']})" for p, r in result["rooflines"].items()),
        f"{'':<26}{'train img/s':>12}{'share':>8}{'infer img/s':>13}{'share':>8}",
        row("torchvision fp32 NCHW", result, "torchvision_fp32_{}_img_s", "torchvision_fp32_{}_roofline_share"),
        *peer_rows(result),
        row(f"verydeep {result['precision']}", result, "{}_img_s", "{}_roofline_share"),
        f"ratio vs torchvision fp32: train {result['train_ratio_vs_torchvision_fp32']:.2f}x "
        f"(at the roofline {result['train_ratio_at_roofline']:.2f}x), inference "
        f"{result['infer_ratio_vs_torchvision_fp32']:.2f}x (at the roofline {result['infer_ratio_at_roofline']:.2f}x)",
        f"end to end (data loading included): {result['end_to_end_img_s']:.1f} img/s, "
        f"{result['end_to_end_vs_step']:.0%} of the step",
        f"evaluation per image over Q={','.join(map(str, s['test_scales']))}: dense "
        f"{result['dense_s_per_image']:.3f} s, 150 crops {result['multicrop_s_per_image']:.3f} s "
        f"({result['multicrop_vs_dense']:.1f}x)",
        f"peak memory {result['peak_memory_gib']:.2f} GiB; {result['macs_per_image'] / 1e9:.3f} GMACs per image",
    ]
    return "\n".join(lines)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="speed against the hardware's limit: roofline, torchvision (fp32, at its best), our "
                      "train/eval, end to end",
        description="Measure, in one run on this machine, the roofline (the fastest matrix product or convolution "
                    "of the net's shapes), torchvision's VGG in fp32 and at its best (autocast, channels_last, "
                    "fused update, eager or compiled), our training step and inference, training end to end and "
                    "dense vs 150-crop evaluation. Defaults: on a CPU width 0.5, size 128, batch 16; on CUDA "
                    "width 1, size 224, batch 64.")
    p.add_argument("--config", default="D", help="configuration of Table 1 torchvision has: A, B, D, E")
    p.add_argument("--size", type=positive_int, default=None, help="input side, a multiple of 32")
    p.add_argument("--width", type=width_multiplier, default=None, help="width multiplier")
    p.add_argument("--batch", type=positive_int, default=None, help="images per step")
    add_device(p)
    p.add_argument("--rounds", type=positive_int, default=5, help="rounds alternating the contenders")
    p.add_argument("--data", type=Path, default=None,
                   help=f"folder of JPEGs in class folders (default: {DEFAULT_DATA} when present, else generated)")
    add_workers(p)
    p.add_argument("--compile", action="store_true", help="the trainer as `train --compile` runs it")
    p.add_argument("--no-compiled-peer", dest="compiled_peer", action="store_false",
                   help="torchvision at its best eager only, not also compiled (compiling takes minutes on a CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    if args.config not in TORCHVISION:
        raise UserError(f"--config {args.config}: torchvision has no such VGG; give one of {', '.join(TORCHVISION)}")
    device = runtime.pick_device(args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    size = args.size or defaults["size"]
    if size % 32:
        raise UserError(f"--size {size}: must be a multiple of 32")
    data = args.data if args.data is not None else (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    settings = Settings(args.config, size, args.width or defaults["width"], args.batch or defaults["batch"],
                        args.rounds, defaults["steps"], str(device), defaults["gemm"], data, args.workers,
                        args.compile, args.compiled_peer)
    result = run_bench(settings)
    print(render(result))
    if args.json:
        print(json.dumps(result))
