"""Checkpoints and exported weights: written atomically, read without executing pickled code.

A checkpoint is a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``;
it always holds ``model`` (a state dict) and ``recipe``, the JSON-able description of how the net
was built and trained (configuration, width, crop, scales, preprocessing, class names), so that
evaluation, prediction and feature extraction need nothing but the checkpoint. Weights are also
exported as safetensors with the recipe in the file's metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from verydeep.errors import MissingFileError, UserError
from verydeep.model import VGG

#: Recipe keys that determine the architecture.
MODEL_KEYS = ("config", "num_classes", "batch_norm", "width", "dropout", "crop")


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically save a checkpoint dict (tensors, numbers, strings, lists, dicts only)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best (else last) checkpoint."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise MissingFileError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt in this run directory")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such checkpoint")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling code; a damaged file is a one-line error naming it."""
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path}: not a readable verydeep checkpoint ({type(error).__name__})") from error
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise UserError(f"{path}: not a verydeep checkpoint (no 'model' and 'recipe' entries)")
    return state


def model_from_recipe(recipe: dict[str, Any], init: str = "kaiming") -> VGG:
    """The VGG that a recipe describes, randomly initialised; its last layer has the task's
    ``outputs`` (as many as the classes when the recipe does not say)."""
    missing = [k for k in MODEL_KEYS if k not in recipe]
    if missing:
        raise UserError(f"recipe lacks {', '.join(missing)}")
    return VGG(
        recipe["config"],
        num_classes=recipe.get("outputs") or recipe["num_classes"],
        batch_norm=recipe["batch_norm"],
        width=recipe["width"],
        dropout=recipe["dropout"],
        input_size=recipe["crop"],
        init=init,
    )


def export_safetensors(model: VGG, recipe: dict[str, Any], path: str | Path) -> Path:
    """Write the weights as safetensors, the recipe as JSON in the file's metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"recipe": json.dumps(recipe)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[VGG, dict[str, Any]]:
    """The trained model (eval mode) and its recipe, from a checkpoint, run dir or .safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MissingFileError(f"{path}: no such weights file")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if "recipe" not in metadata:
            raise UserError(f"{path}: safetensors file has no verydeep recipe in its metadata")
        recipe = json.loads(metadata["recipe"])
        weights = load_file(path)
    else:
        state = load_checkpoint(path)
        recipe, weights = state["recipe"], state["model"]
    model = model_from_recipe(recipe)
    model.load_state_dict(weights)
    return model.to(device).eval(), recipe
