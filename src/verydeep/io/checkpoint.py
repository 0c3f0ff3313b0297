"""Checkpoints and exported weights: written atomically, read without executing pickled code.

A checkpoint is a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``;
it always holds ``model`` (a state dict) and ``recipe``, the JSON-able description of how the net
was built and trained (configuration, width, crop, scales, preprocessing, class names), so that
evaluation, prediction and feature extraction need nothing but the checkpoint. Weights are also
exported as safetensors with the recipe in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from verydeep.errors import MissingFileError, UserError
from verydeep.io.atomic import atomic_write
from verydeep.io.rundir import RunDir
from verydeep.nn.model import VGG

#: Recipe keys that determine the architecture.
MODEL_KEYS = ("config", "num_classes", "batch_norm", "width", "dropout", "crop")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically save a checkpoint dict (tensors, numbers, strings, lists, dicts only)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best (else last) checkpoint."""
    path = Path(path)
    if path.is_dir():
        for file in (RunDir(path).best, RunDir(path).last):
            if file.is_file():
                return file
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


def export_safetensors(model: VGG, recipe: dict[str, Any], path: str | Path, epoch: int | None = None) -> Path:
    """Write the weights as safetensors, the recipe as JSON (and the epoch) in the file's metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"recipe": json.dumps(recipe)} | ({"epoch": str(epoch)} if epoch is not None else {})
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; a damaged file is a one-line error naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from error


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and recipe of a checkpoint, a run directory or our ``.safetensors``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        state = load_checkpoint(path)
        return state["model"], state["recipe"]
    if not path.is_file():
        raise MissingFileError(f"{path}: no such weights file")
    metadata = safetensors_metadata(path)
    if "recipe" not in metadata:
        raise UserError(f"{path}: safetensors file has no verydeep recipe in its metadata")
    try:
        return load_file(path), json.loads(metadata["recipe"])
    except Exception as error:  # a damaged tensor block or recipe
        raise UserError(f"{path}: not a readable safetensors file ({type(error).__name__})") from error


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``weights`` into ``model``; missing, unexpected or mis-shaped tensors, or non-finite
    values, are a one-line error naming the file."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise UserError(f"{path}: weights do not fit the model ({detail[:300]})") from error
    bad = [name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise UserError(f"{path}: weights are not finite (NaN or inf) in {', '.join(bad[:3])}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[VGG, dict[str, Any]]:
    """The trained model (eval mode) and its recipe, from a checkpoint, run dir or .safetensors."""
    weights, recipe = load_weights(path)
    model = model_from_recipe(recipe)
    load_into(model, weights, path)
    return model.to(device).eval(), recipe
