"""Helpers and fixtures shared by the tests: generated images and datasets, tiny training runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from verydeep.checkpoint import load_checkpoint
from verydeep.recipe import TrainConfig

#: The shared datasets, beside the work tree; tests that need them skip when they are absent.
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: One colour per class of :func:`write_dataset`.
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 220, 50)]


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image: upsampled colour noise over gradients."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    ramp = np.linspace(0, 60, w, dtype=np.float32)[None, :, None]
    return Image.fromarray(np.clip(base * 0.8 + ramp, 0, 255).astype(np.uint8))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    """Save ``img`` at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def write_dataset(root: Path, per_class: dict[str, int], size: tuple[int, int] = (44, 40), ext: str = "png") -> Path:
    """Class folders of noisy single-colour images (``ext``: png or jpg), one colour per class,
    ``per_class[split]`` each."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.array(colour) + rng.normal(0, 40, (size[1], size[0], 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.{ext}")
    return root


def tiny(data: Path, out: Path, **options) -> TrainConfig:
    """A width-1/16 net A on 32-pixel crops, 4 steps of 16 images per epoch, fp32 on the CPU, no workers."""
    settings = dict(data=data, out=out, width=1 / 16, crop=32, scale=(32, 40), batch_size=16, init="xavier",
                    lr=0.05, epochs=1, workers=0, precision="fp32", device="cpu", progress=False, patience=100)
    return TrainConfig(**{**settings, **options})


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's ``last.pt``."""
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes of 16 training and 4 validation images."""
    return write_dataset(tmp_path_factory.mktemp("data"), {"train": 16, "val": 4})
