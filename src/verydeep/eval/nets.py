"""The nets under evaluation (Sec. 3.2, 4.1-4.2): each net loaded with its own crop, input convention
and test scales Q, derived from its training scale S as the paper does ({S-32, S, S+32} for a fixed S,
{Smin, mid, Smax} for a jittered one) or given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from verydeep.errors import UserError
from verydeep.io.sources import load, model_name
from verydeep.nn import configs
from verydeep.nn.model import VGG, DenseVGG
from verydeep.paper.figures import scale_text

# ---- scales -------------------------------------------------------------------------------


def train_scale(recipe: dict[str, Any]) -> tuple[int, int]:
    """(Smin, Smax) of a recipe; equal for a fixed training scale."""
    scale = recipe.get("scale")
    if scale is None:
        raise UserError("the checkpoint's recipe has no training scale ('scale'); give --scales")
    smin, smax = (scale, scale) if isinstance(scale, int) else (int(scale[0]), int(scale[-1]))
    return smin, smax


def derive_scales(recipe: dict[str, Any]) -> list[int]:
    """Test scales Q as in Sec. 3.2/4.2: {S-32, S, S+32} for fixed S, {Smin, mid, Smax} for jittered S.

    The 32-pixel offset is scaled by crop/224 (5 pixels for a 32-pixel crop), the jittered
    midpoint rounds down, and scales below the crop are raised to it (duplicates dropped).
    """
    crop = int(recipe["crop"])
    smin, smax = train_scale(recipe)
    if smin == smax:
        offset = round(32 * crop / 224)
        candidates = [smin - offset, smin, smin + offset]
    else:
        candidates = [smin, (smin + smax) // 2, smax]
    return sorted({max(crop, q) for q in candidates})


#: The paper's multi-scale test scales for a 224 crop when the training scale is not known (Sec. 4.2).
PAPER_SCALES = (256, 384, 512)


def paper_scales(crop: int) -> list[int]:
    """:data:`PAPER_SCALES` for a ``crop`` crop: scaled by crop/224 (146, 219, 293 for 128)."""
    return sorted({round(q * crop / 224) for q in PAPER_SCALES})


def center_resize(crop: int) -> int:
    """The centre-crop protocol's resize: 256 for a 224 crop, the same ratio otherwise (37 for 32)."""
    return round(crop * 256 / 224)


# ---- nets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetInfo:
    """An evaluated net as the result records it: checkpoint, model, crop and scales."""

    name: str
    checkpoint: str
    model: str  # the configuration, with -BN for batch norm: "D", "A-BN"
    config: str
    batch_norm: bool
    width: float | None
    crop: int
    train_scale: list[int] | None  # [Smin, Smax]; None when the recipe has none
    scales: list[int]  # test scales Q


@dataclass
class Net:
    """A net ready to evaluate: model, recipe, test scales and input convention (``checkpoint`` names its source)."""

    name: str
    checkpoint: str
    model: VGG
    recipe: dict[str, Any]
    scales: list[int]
    preprocess: Any
    dense: DenseVGG = field(init=False)
    #: what computes the crops' and the dense scores: the model and its dense form, or their compiled forms
    run_model: Callable[[torch.Tensor], torch.Tensor] = field(init=False)
    run_dense: Callable[[torch.Tensor], torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.dense = self.model.dense()
        self.run_model, self.run_dense = self.model, self.dense

    def compile(self) -> None:
        """Run both forms through ``torch.compile`` (``eval --compile``): each compiles on its first batch,
        and once more, for any size, when a second size of input comes (the dense form's whole images)."""
        self.run_model, self.run_dense = torch.compile(self.model), torch.compile(self.dense)

    @property
    def crop(self) -> int:
        return self.model.input_size

    @property
    def config(self) -> str:
        return configs.canonical(self.recipe["config"])

    @property
    def scale(self) -> tuple[int, int] | None:
        return train_scale(self.recipe) if self.recipe.get("scale") is not None else None

    @property
    def imagenet_sized(self) -> bool:
        """1000 classes and 224-pixel crops, like the paper's ILSVRC nets."""
        return self.model.num_classes == 1000 and self.crop == 224

    @property
    def papers_kind(self) -> bool:
        """ImageNet-sized, at full width and without batch norm: a net of the paper's kind, whose errors its
        tables report."""
        return self.imagenet_sized and self.model.width == 1 and not self.model.batch_norm

    def describe(self) -> NetInfo:
        return NetInfo(
            name=self.name, checkpoint=self.checkpoint, model=model_name(self.recipe), config=self.config,
            batch_norm=bool(self.recipe.get("batch_norm", False)), width=self.recipe.get("width"), crop=self.crop,
            train_scale=list(self.scale) if self.scale else None, scales=self.scales,
        )


def net_scales(recipe: dict[str, Any], crop: int, scales: Sequence[int] | None, source: str | Path,
               option: str = "--scales") -> list[int]:
    """Test scales Q of a net: ``scales`` when given, else derived from its training scale
    (:func:`derive_scales`), else the paper's Q = {256, 384, 512} (Sec. 4.2) scaled by crop/224.
    A scale below the crop is an error naming the net and ``option`` (where the scales came from)."""
    if scales:
        chosen = sorted(set(scales))
    elif recipe.get("scale") is not None:
        chosen = derive_scales(recipe)
    else:
        chosen = paper_scales(crop)
    small = [q for q in chosen if q < crop]
    if small:
        raise UserError(f"{option} {small} smaller than the crop {crop} of {source}")
    return chosen


def compared_weights(model: torch.nn.Module, order: Sequence[int] | None = None,
                     ignored: str | None = None) -> dict[str, torch.Tensor]:
    """``model``'s tensors by name as another net's are compared with them: without those of the module
    ``ignored``; with ``order``, its last layer's rows taken in that order (another net's classes in another
    order)."""
    state = {k: v for k, v in model.state_dict().items() if ignored is None or not k.startswith(f"{ignored}.")}
    if order is None:
        return state
    last = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)][-1]
    return {k: v[list(order)] if k.startswith(f"{last}.") and v.shape[0] == len(order) else v for k, v in state.items()}


def same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    """Whether two sets of named tensors hold the same names, shapes and values."""
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k].to(ours[k])) for k in ours)


def refuse_repeated_weights(nets: Sequence[Net]) -> None:
    """A net given twice (one file twice, or a run and its weights file: the same weights, classes and input
    convention, its classes maybe in another order) is refused: fused with itself it is that net alone, which a
    fusion row would present as two."""
    refuse_repeats([(net.checkpoint, net.model, net.preprocess, net.recipe) for net in nets], "--weights")


def refuse_repeats(nets: Sequence[tuple[str | Path, torch.nn.Module, Any, dict[str, Any]]], option: str,
                   ignored: str | None = None) -> None:
    """:func:`refuse_repeated_weights` of nets given as (source, model, input convention, recipe) by ``option``;
    with ``ignored``, a module whose weights (and so the classes) do not count, as FC8 for FC7's features."""
    for i, (source, model, preprocess, recipe) in enumerate(nets):
        for earlier, earlier_model, earlier_preprocess, earlier_recipe in nets[:i]:
            order = None if ignored else class_order(earlier_recipe.get("classes"), recipe.get("classes"))
            if preprocess == earlier_preprocess and order != () and same_tensors(
                    compared_weights(earlier_model, order, ignored), compared_weights(model, ignored=ignored)):
                raise UserError(f"{option} {source}: the weights of {option} {earlier} again; give each net once")


def class_order(first: Sequence[str] | None, second: Sequence[str] | None) -> tuple[int, ...] | None:
    """Where each of ``second``'s classes is among ``first``'s: None when the lists are equal, ``()`` when they
    are not one list in two orders."""
    if first == second:
        return None
    if first is None or second is None or len(set(first)) != len(first) or sorted(first) != sorted(second):
        return ()
    return tuple(list(first).index(name) for name in second)


def load_nets(sources: Sequence[str | Path], scales: Sequence[int] | None, data_dir: Path | None,
              device: torch.device, weights_dir: str | Path | None = None, dtype: torch.dtype | None = None,
              compile: bool = False) -> list[Net]:
    """Load each net (:func:`verydeep.load`, refused without a classifier) with its own crop, test scales
    (given ``scales`` override the recipe's) and input convention; its weights in ``dtype``, the autocast
    dtype it will run under (:func:`verydeep.runtime.device.prepare`), when given; run compiled with ``compile``
    (:meth:`Net.compile`)."""
    if not sources:
        raise UserError("give at least one --weights")
    nets: list[Net] = []
    for source in sources:
        loaded = load(source, weights_dir, data=data_dir, device=device, dtype=dtype, purpose="classify")
        model, recipe, name = loaded.model, loaded.recipe, loaded.name
        if recipe.get("scale") is not None:
            name += f" S={scale_text(*train_scale(recipe))}"
        nets.append(Net(name, str(source), model, recipe, net_scales(recipe, model.input_size, scales, source),
                        loaded.preprocess))
    refuse_repeated_weights(nets)
    names = [n.name for n in nets]
    for i, net in enumerate(nets):  # make duplicate names unique
        if names.count(net.name) > 1:
            net.name = f"{net.name} #{names[: i + 1].count(net.name)}"
    for net in nets if compile else ():
        net.compile()
    return nets
