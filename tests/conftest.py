"""Helpers and fixtures shared by the tests: generated images and datasets, tiny training runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from verydeep.io.checkpoint import load_checkpoint
from verydeep.train.recipe import TrainConfig

#: The shared datasets, beside the work tree; tests that need them skip when they are absent.
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"



def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip, with the reason, a ``gpu`` test without a CUDA device and a ``real_data(FOLDER)`` test whose
    folder under ``../shared/data`` is absent."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    real = item.get_closest_marker("real_data")
    if real and not (SHARED / real.args[0]).is_dir():
        pytest.skip(f"real data not found at {SHARED / real.args[0]} (../shared/data beside the repo)")


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
    """A width-1/16 net A on 32-pixel crops, 4 steps of 16 images per epoch, fp32 on the CPU, no workers; Glorot's
    init, but for a net started from weights, whose new layers take the default (an init given is refused
    when every layer is copied)."""
    settings = dict(data=data, out=out, width=1 / 16, crop=32, scale=(32, 40), batch_size=16,
                    init="he" if options.get("weights") else "xavier", lr=0.05, epochs=1, workers=0,
                    precision="fp32", device="cpu", progress=False, patience=100)
    return TrainConfig(**{**settings, **options})


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's ``last.pt``."""
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes of 16 training and 4 validation images."""
    return write_dataset(tmp_path_factory.mktemp("data"), {"train": 16, "val": 4})


def write_classifier(path: Path, seed: int = 0, classes: int = 10, sharpen: float = 3000.0) -> Path:
    """A checkpoint of a random width-1/16 net A on 32-pixel crops (S = 36) with ``classes`` named classes,
    its FC8 weights multiplied by ``sharpen`` so that its posteriors differ clearly between classes."""
    from verydeep.data import IMAGENET
    from verydeep.io.checkpoint import model_from_recipe, save_checkpoint

    recipe = {"config": "A", "num_classes": classes, "batch_norm": False, "width": 1 / 16, "dropout": 0.5,
              "crop": 32, "scale": [36, 36], "preprocess": IMAGENET.to_dict(),
              "classes": [f"n{i:08d}" for i in range(classes)], "class_names": [f"thing {i}" for i in range(classes)]}
    torch.manual_seed(seed)
    model = model_from_recipe(recipe)
    with torch.no_grad():
        model.classifier[6].weight.mul_(sharpen)
    save_checkpoint({"model": model.state_dict(), "recipe": recipe}, path)
    return path


def write_localiser(path: Path, classifier: Path, seed: int = 1) -> Path:
    """A checkpoint of a random per-class box regression net (protocol 2's localisation net) with the classes of
    ``classifier``, trained at S = 32; its box codes standardised about a central box of half the crop's side."""
    from verydeep.io.checkpoint import model_from_recipe, save_checkpoint

    recipe = {**load_checkpoint(classifier)["recipe"], "scale": [32, 32]}
    classes = recipe["num_classes"]
    recipe.update(task="localisation-pcr", outputs=4 * classes, box_targets="standardised",
                  box_code_mean=[0.5, 0.5, 0.5, 0.5], box_code_std=[0.1, 0.1, 0.1, 0.1])
    torch.manual_seed(seed)
    save_checkpoint({"model": model_from_recipe(recipe).state_dict(), "recipe": recipe}, path)
    return path


@contextmanager
def serving(looker: Any) -> Iterator[str]:
    """``verydeep serve``'s application of ``looker`` (:class:`verydeep.serve.Looker`) served by uvicorn on a free
    local port, in a thread; yields its base URL."""
    from verydeep.serve import listening, server

    sock = listening("127.0.0.1", 0)
    running = server(looker, sock)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        running.should_exit = True
        thread.join(timeout=10)
