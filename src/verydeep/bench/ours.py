"""Our contenders, as ``verydeep train`` and ``verydeep eval`` run them: the trainer's own step (Sec. 3.1),
inference with the net held as evaluation holds it, the trainer end to end on JPEGs, and dense against
150-crop evaluation (Sec. 3.2)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep.bench.measure import images_per_second, sync
from verydeep.bench.settings import WARMUP_STEPS, Settings
from verydeep.data import RescaleTransform, to_input
from verydeep.errors import UserError
from verydeep.eval.nets import paper_scales
from verydeep.eval.sweep import dense_posteriors, multicrop_posteriors
from verydeep.io.rundir import RunDir
from verydeep.runtime.device import prepare
from verydeep.runtime.precision import autocast
from verydeep.runtime.processes import Processes
from verydeep.train import Trainer
from verydeep.train.recipe import TrainConfig


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
    s = paper_scales(settings.size)[0]
    cfg = TrainConfig(data=str(root), out=str(scratch / "run"), config=settings.config, width=settings.width,
                      crop=settings.size, scale=(s, s), batch_size=settings.batch, epochs=1, lr=1e-3,
                      workers=settings.workers, device=settings.device, precision="auto", progress=False,
                      compile=settings.compile)
    trainer = Trainer(cfg, Processes())
    need = training_steps(settings, trainer.workers)
    if trainer.sampler.steps_per_epoch < need:
        raise UserError(f"--data {settings.data}: {len(trainer.data.train_indices)} training images, fewer than the "
                        f"{need * settings.batch} the bench's {need} steps of {settings.batch} need")
    trainer.run_dir.mkdir(parents=True, exist_ok=True)  # for the step records, as a run makes it
    trainer.model.train()
    return trainer


def inference_net(trainer: Any) -> nn.Module:
    """A copy of the trainer's model as evaluation holds a net: eval mode, weights in the autocast dtype."""
    return prepare(copy.deepcopy(trainer.model), trainer.device, trainer.cfg.channels_last,
                           trainer.dtype).eval()


def as_run(trainer: Any, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` as the bench runs it: through ``torch.compile`` when the trainer compiles (``--compile``:
    ``train --compile`` and ``eval --compile``), else itself."""
    return torch.compile(module) if trainer.cfg.compile else module


def steady_img_s(run_dir: Path, last_step: int, steps: int, batch: int) -> float:
    """Images per second of training steps ``last_step - steps + 1`` to ``last_step``, from the trainer's step
    records (a step none of whose images could be read has none: a :class:`UserError`)."""
    records = [r for r in map(json.loads, RunDir(run_dir).metrics.read_text().splitlines())
               if r.get("kind") == "step" and last_step - steps < r["step"] <= last_step]
    if len(records) < steps:
        raise UserError("--data: a timed training step read none of its images (all unreadable); give the bench "
                        "readable images")
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
    forward = as_run(trainer, model)

    def train_step() -> None:
        trainer.finish_step(trainer.stepper.micro_step(batch, draws, sync=True), images, 0)

    @torch.inference_mode()
    def infer_step() -> None:
        with autocast(device, trainer.dtype):
            forward(x)

    def end_to_end(count: int = steps) -> float:
        target = trainer.step + left_out(trainer.workers) + count
        if trainer.train_epoch(stop_after_steps=target) or trainer.step != target:
            raise UserError("the bench ran out of training images within an epoch; give more with --data")
        return steady_img_s(trainer.run_dir, target, count, trainer.cfg.batch_size)

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
    device, crop = trainer.device, trainer.cfg.crop
    inputs = [to_input(RescaleTransform(q)(photo).unsqueeze(0).to(device), trainer.pre)
              .contiguous(memory_format=torch.channels_last) for q in paper_scales(crop)]
    forward, dense = as_run(trainer, model), as_run(trainer, model.dense())

    def seconds(protocol: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], float]:
        @torch.inference_mode()
        def measure() -> float:
            sync(device)
            start = time.perf_counter()
            with autocast(device, trainer.dtype):
                for x in inputs:
                    protocol(x)
            sync(device)
            return time.perf_counter() - start

        measure()
        return measure

    return {"multicrop_s": seconds(lambda x: multicrop_posteriors(model, x, crop, flip=True, forward=forward)),
            "dense_s": seconds(lambda x: dense_posteriors(dense, x, flip=True))}
