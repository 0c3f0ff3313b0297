"""Checkpoints and exported weights: written atomically, read without executing pickled code.

A checkpoint is a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``;
it always holds ``model`` (a state dict) and ``recipe``, the JSON-able description of how the net
was built and trained (configuration, width, crop, scales, preprocessing, class names), so that
evaluation, prediction and feature extraction need nothing but the checkpoint. Weights are also
exported as safetensors with the recipe in the file's metadata. A recipe read from either is checked
where it is read (:func:`check_recipe`), so a damaged value is one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from verydeep.data.preprocess import Preprocess
from verydeep.errors import MissingFileError, UserError
from verydeep.io.atomic import atomic_write
from verydeep.io.rundir import RunDir
from verydeep.nn import configs
from verydeep.nn.model import VGG
from verydeep.runtime.limits import MAX_SIDE, is_finite, is_whole

#: Recipe keys that determine the architecture.
MODEL_KEYS = ("config", "num_classes", "batch_norm", "width", "dropout", "crop")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically save a checkpoint dict (tensors, numbers, strings, lists, dicts only)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best (else last) checkpoint."""
    path = Path(path)
    if path.is_dir():
        chosen = RunDir(path).chosen_checkpoint
        if chosen is not None:
            return chosen
        raise MissingFileError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt in this run directory")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such checkpoint")
    return path


def read_state(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False, hint: str = "") -> Any:
    """``torch.load`` of ``path`` without unpickling code (``weights_only``); a damaged or foreign file is a
    one-line error naming it, ``hint`` (what to do) after it."""
    try:
        with warnings.catch_warnings():  # torch warns of a TorchScript archive, in two lines, before refusing it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path}: not a readable verydeep checkpoint ({type(error).__name__}){hint}") from error


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling code; a damaged file is a one-line error naming it."""
    path = resolve(path)
    return check_checkpoint(read_state(path, map_location), path)


def check_checkpoint(state: Any, path: str | Path) -> dict[str, Any]:
    """``state`` when it is a verydeep checkpoint: a dict whose ``model`` is a state dict of tensors and
    whose ``recipe`` passes :func:`check_recipe`; else a one-line error naming ``path``."""
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise UserError(f"{path}: not a verydeep checkpoint (no 'model' and 'recipe' entries)")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise UserError(f"{path}: its 'model' entry is not a state dict of tensors (got {type(weights).__name__})")
    check_tensors(weights, path)
    check_recipe(state["recipe"], path)
    return state


#: The kinds of numbers a weight may hold: others would be cast silently (an int, a bool, a complex number
#: losing its imaginary part) or are not computed with on a CPU (float8).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """A one-line error naming the first tensor that is no weight: not of :data:`WEIGHT_DTYPES`, or with a
    zero dimension (an empty layer, say a classifier of 0 classes). Batch norm's ``num_batches_tracked``
    is an integer counter."""
    for key, value in state.items():
        if not key.endswith("num_batches_tracked") and value.dtype not in WEIGHT_DTYPES:
            raise UserError(f"{path}: tensor {key} holds {value.dtype} values, not floating point weights "
                            "(float16, bfloat16, float32 or float64)")
        if 0 in value.shape:
            raise UserError(f"{path}: tensor {key} has shape {tuple(value.shape)}, with a zero dimension")


#: The recipe keys that :func:`check_recipe` checks against training's declaration of the option.
DECLARED_KEYS = ("config", "width", "batch_norm", "dropout", "crop")


def check_recipe(recipe: Any, path: str | Path) -> dict[str, Any]:
    """``recipe`` when every value that builds or describes the net is of its kind and in range, else a
    one-line :class:`UserError` naming ``path`` and the key. The keys that are training options are checked
    as ``verydeep train`` checks them (:class:`~verydeep.train.recipe.TrainConfig`)."""
    from verydeep.train.recipe import TrainConfig, check_field  # train reads checkpoints through this module

    if not isinstance(recipe, dict):
        raise UserError(f"{path}: its recipe is not a dict of settings (got {type(recipe).__name__})")
    missing = [k for k in MODEL_KEYS if k not in recipe]
    if missing:
        raise UserError(f"{path}: recipe lacks {', '.join(missing)}")
    declared = {f.name: f for f in fields(TrainConfig)}
    for key in DECLARED_KEYS:
        check_field(declared[key], recipe[key], f"{path}: recipe {key}")
    try:
        configs.canonical(recipe["config"])
    except ValueError as error:
        raise UserError(f"{path}: recipe config: {error}") from None
    _check_provenance(recipe, path)
    _check_outputs(recipe, path)
    _check_scale(recipe, path)
    _check_classes(recipe, path)
    check_box_code(recipe, path)
    for key in ("boxes", "boxes_data"):  # the files a localisation net was trained on, looked for again
        if recipe.get(key) is not None and not (isinstance(recipe[key], str) and recipe[key]):
            raise UserError(f"{path}: recipe {key} must be a file or folder path; got {recipe[key]!r}")
    if recipe.get("preprocess") is not None:
        try:
            Preprocess.from_dict(recipe["preprocess"])
        except ValueError as error:
            raise UserError(f"{path}: recipe preprocess: {error}") from None
    return recipe


#: FC8's size for each task a recipe may name, from its number of classes: one score a class, or one box
#: (centre, size) for all classes or a box a class (Appendix A's single- and per-class regression).
TASK_OUTPUTS = {"classification": (1, 0), "localisation-scr": (0, 4), "localisation-pcr": (4, 0)}


def _check_provenance(recipe: dict[str, Any], path: str | Path) -> None:
    """What the recipe says of the net's origin, where it says it: its ``task`` a name, its ``head``
    ``published`` or ``random`` (FC layers of the file or drawn), its ``source`` a dict of strings (the format
    and file the weights were converted from)."""
    task, head, source = recipe.get("task"), recipe.get("head"), recipe.get("source")
    if task is not None and not (isinstance(task, str) and task):
        raise UserError(f"{path}: recipe task must be a task's name, such as classification; got {task!r}")
    if head not in (None, "published", "random"):
        raise UserError(f"{path}: recipe head must be published or random; got {head!r}")
    if source is not None and not (isinstance(source, dict) and all(
            isinstance(key, str) and isinstance(value, str) for key, value in source.items())):
        raise UserError(f"{path}: recipe source must name the weights' format and file; got {str(source)[:100]}")


def _check_outputs(recipe: dict[str, Any], path: str | Path) -> None:
    """``num_classes`` and ``outputs`` (FC8's size) are positive whole numbers, and ``outputs`` (else
    ``num_classes``) what the recipe's ``task``, when it is one of ours, needs: FC8 read as another task's
    would be cut wrong."""
    for key in ("num_classes", "outputs"):
        value = recipe.get(key)
        if (key == "num_classes" or value is not None) and not (is_whole(value) and value >= 1):
            raise UserError(f"{path}: recipe {key} must be a whole number of at least 1; got {value!r}")
    task = recipe.get("task", "classification")
    if task not in TASK_OUTPUTS:  # a task of the user's own (nn.tasks.Task): its outputs are its own
        return
    per_class, fixed = TASK_OUTPUTS[task]
    needed, outputs = per_class * recipe["num_classes"] + fixed, recipe.get("outputs") or recipe["num_classes"]
    if outputs != needed:
        raise UserError(f"{path}: recipe outputs ({outputs}) do not fit its task, {task} of {recipe['num_classes']} "
                        f"classes, which has {needed}")


def _check_scale(recipe: dict[str, Any], path: str | Path) -> None:
    """The training scale S (Sec. 3.1): absent, S, or [Smin, Smax] with crop <= Smin <= Smax."""
    scale = recipe.get("scale")
    if scale is None:
        return
    values = scale if isinstance(scale, list | tuple) else [scale]
    if not (1 <= len(values) <= 2 and all(is_whole(v) for v in values)
            and recipe["crop"] <= values[0] <= values[-1] <= MAX_SIDE):
        raise UserError(f"{path}: recipe scale must be S or [Smin, Smax], whole numbers with crop {recipe['crop']} "
                        f"<= Smin <= Smax <= {MAX_SIDE}; got {scale!r}")


def _check_classes(recipe: dict[str, Any], path: str | Path) -> None:
    """``classes`` and ``class_names``, where given, are lists of num_classes strings, the classes distinct."""
    for key in ("classes", "class_names"):
        value = recipe.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == recipe["num_classes"]
                                      and all(isinstance(c, str) for c in value)):
            raise UserError(f"{path}: recipe {key} must list num_classes ({recipe['num_classes']}) names; got "
                            f"{str(value)[:100]}")
    # each class is one output; names shown to people may repeat (ImageNet has two classes named "crane")
    repeated = next((c for c, n in Counter(recipe.get("classes") or []).items() if n > 1), None)
    if repeated is not None:
        raise UserError(f"{path}: recipe classes lists {repeated!r} twice; each class is one output")


def check_box_code(recipe: dict[str, Any], path: str | Path) -> None:
    """A box regressor's code standardisation (Appendix A), where given: 4 finite means, 4 positive stds."""
    for key, least in (("box_code_mean", -math.inf), ("box_code_std", 0.0)):
        value = recipe.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 4 and all(
                is_finite(v) and v > least for v in value)):
            bound = "finite numbers" if least == -math.inf else "finite numbers above 0"
            raise UserError(f"{path}: recipe {key} must be 4 {bound}; got {value!r}")


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
    return read_safetensors_weights(path)


def read_safetensors_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and recipe of our ``.safetensors`` file (under any name: its contents say what it is)."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such weights file")
    metadata = safetensors_metadata(path)
    if "recipe" not in metadata:
        raise UserError(f"{path}: safetensors file has no verydeep recipe in its metadata")
    try:
        weights, recipe = load_file(path), json.loads(metadata["recipe"])
    except Exception as error:  # a damaged tensor block or recipe
        raise UserError(f"{path}: not a readable safetensors file ({type(error).__name__})") from error
    check_tensors(weights, path)
    return weights, check_recipe(recipe, path)


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``weights`` into ``model``; missing, unexpected or mis-shaped tensors, non-finite values or a
    negative batch-norm variance are a one-line error naming the file."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise UserError(f"{path}: weights do not fit the model ({detail[:300]})") from error
    # the model's tensors, as loaded: a float64 value beyond float32's range is finite until it is cast
    loaded = model.state_dict()
    bad = [name for name in weights if loaded[name].is_floating_point() and not loaded[name].isfinite().all()]
    if bad:
        raise UserError(f"{path}: weights are not finite (NaN or inf) in {', '.join(bad[:3])}")
    negative = [name for name, value in weights.items() if name.endswith("running_var") and (value < 0).any()]
    if negative:
        raise UserError(f"{path}: batch-norm variances are negative in {', '.join(negative[:3])}")
