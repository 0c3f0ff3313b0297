"""The VGG ConvNet (Sec. 2), its fully-convolutional "dense" form (Sec. 3.2) and named taps.

The module layout and state dict keys are torchvision's (``features.N.*``, ``classifier.N.*``),
so ``VGG("D").load_state_dict(torchvision.models.vgg16().state_dict())`` works unchanged. For the
two configurations torchvision lacks, the same rule lays out the keys: every Table 1 entry adds
its modules to ``features`` in order (conv, [BatchNorm], ReLU; LRN; MaxPool), so in A-LRN the LRN
is ``features.2`` and every later index is one higher than in A, and in C each 1x1 conv takes the
next index after the 3x3 convs of its block (``features.14`` is C's ``conv3_3``, 256 to 256, 1x1).
``model.tap_names`` gives the Caffe-style name of every module (``conv3_3``, ``relu3_3``, ``pool3``,
``fc6`` ...), which ``extract`` uses to return activations at named layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verydeep.errors import UserError
from verydeep.nn import configs
from verydeep.nn.configs import FC_WIDTH, LRN_PARAMS
from verydeep.nn.fused import run_trunk, trunk_outputs
from verydeep.nn.init import initialise
from verydeep.runtime.limits import is_finite, is_whole


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` multiplied by the width multiplier, at least 1."""
    return max(1, round(channels * width))


def make_trunk(config: str, batch_norm: bool = False, width: float = 1.0) -> tuple[nn.Sequential, list[str]]:
    """The convolutional part of Table 1 (``features``) and the tap name of each of its modules."""
    modules: list[nn.Module] = []
    names: list[str] = []
    in_channels = 3
    for layer in configs.layers(config):
        suffix = layer.name.removeprefix("conv")
        if layer.kind == "pool":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            names.append(layer.name)
        elif layer.kind == "lrn":
            modules.append(nn.LocalResponseNorm(**LRN_PARAMS))
            names.append(layer.name)
        else:
            out_channels = scaled(layer.channels, width)
            padding = layer.kernel // 2
            modules.append(nn.Conv2d(in_channels, out_channels, layer.kernel, padding=padding))
            names.append(layer.name)
            if batch_norm:
                modules.append(nn.BatchNorm2d(out_channels))
                names.append(f"bn{suffix}")
            modules.append(nn.ReLU(inplace=True))
            names.append(f"relu{suffix}")
            in_channels = out_channels
    return nn.Sequential(*modules), names


def make_head(in_features: int, num_classes: int, width: float = 1.0, dropout: float = 0.5) -> nn.Sequential:
    """FC-4096, FC-4096, FC-``num_classes`` with ReLU and dropout on the first two (Sec. 2.1, 3.1).

    The same block serves box regression (Appendix A) with ``num_classes`` = 4 or 4 x classes.
    """
    hidden = scaled(FC_WIDTH, width)
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        SeededDropout(p=dropout, layer=6),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        SeededDropout(p=dropout, layer=7),
        nn.Linear(hidden, num_classes),
    )


def _int64(value: int) -> int:
    """The int64 whose two's complement bits are those of ``value`` modulo 2^64."""
    bits = value % (1 << 64)
    return bits - (1 << 64) if bits >= 1 << 63 else bits


#: splitmix64's increment and finaliser multipliers (Steele, Lea & Flood 2014), as int64.
GOLDEN = _int64(0x9E3779B97F4A7C15)
MIX = (_int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB))


def _xor_shifted(z: Tensor, bits: int, scratch: Tensor) -> Tensor:
    """``z ^= z >> bits`` in place, the shift unsigned (torch's ``>>`` copies the sign bit; the copies are
    masked off in ``scratch``)."""
    torch.bitwise_right_shift(z, bits, out=scratch).bitwise_and_((1 << (64 - bits)) - 1)
    return z.bitwise_xor_(scratch)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser of every int64 of ``z``, in place (int64 products wrap as unsigned ones do)."""
    scratch = torch.empty_like(z)
    _xor_shifted(z, 30, scratch).mul_(MIX[0])
    _xor_shifted(z, 27, scratch).mul_(MIX[1])
    return _xor_shifted(z, 31, scratch)


def dropout_keep(seeds: Tensor, layer: int, units: int, p: float) -> Tensor:
    """Which of ``units`` units each image keeps (bool, ``(len(seeds), units)``) under dropout at rate ``p``
    (Sec. 3.1), from each image's int64 seed alone: so the same whatever batch, micro-batch or process
    the image is in, and on any device.

    Counter-based splitmix64: the layer's key is output ``layer + 1`` of splitmix64 seeded by the image's
    seed; output ``i + 1`` of splitmix64 seeded by that key gives units ``2i`` (its low 32 bits) and
    ``2i + 1`` (its high 32 bits) their draws, each read as a signed int32 plus 2^31, and a unit is kept
    when its draw, as a fraction of 2^32, is at least ``p`` (rounded to 2^-32).
    """
    return torch.ops.verydeep.dropout_keep(seeds.to(torch.int64), layer, units, float(p))


# One operator to torch.compile: its graph keeps the masks' few int64 operations over (batch, 4096) as one
# opaque call rather than breaking around them (on CUDA, inductor would fold the counters' products into
# int32 index arithmetic, where splitmix64's 64-bit constants do not fit and Triton refuses the kernel),
# and fuses what uses the masks with the layers around them.
@torch.library.custom_op("verydeep::dropout_keep", mutates_args=())
def _dropout_keep(seeds: Tensor, layer: int, units: int, p: float) -> Tensor:
    if p >= 1:
        return torch.zeros(len(seeds), units, dtype=torch.bool, device=seeds.device)
    keys = _mix64(seeds + _int64((layer + 1) * GOLDEN))
    counters = torch.arange(1, (units + 1) // 2 + 1, dtype=torch.int64, device=seeds.device).mul_(GOLDEN)
    draws = _mix64(keys[:, None] + counters)
    # the 32-bit halves, low first (every platform torch runs on is little-endian), as signed int32
    return draws.view(torch.int32)[:, :units] >= min(round(p * 2**32), 2**32 - 1) - (1 << 31)


@_dropout_keep.register_fake
def _(seeds: Tensor, layer: int, units: int, p: float) -> Tensor:
    return seeds.new_empty((len(seeds), units), dtype=torch.bool)


class SeededDropout(nn.Dropout):
    """Dropout (Sec. 3.1) whose masks in training, given each image's seed, are :func:`dropout_keep`'s: an
    image's masks are then the same in any batch, micro-batch or process, and on resuming. Without
    seeds it is ``nn.Dropout`` (the global RNG's masks); in eval mode the identity.

    ``layer`` (6 for FC6's dropout, 7 for FC7's) keeps the layers' masks independent. No parameters: the
    state dict keys stay torchvision's.
    """

    def __init__(self, p: float = 0.5, layer: int = 0) -> None:
        super().__init__(p)
        self.layer = layer

    def forward(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        """``x`` (N, ...) with each image's units dropped by its own seed (``seeds``, (N,) int64)."""
        if seeds is None or not self.training or self.p == 0:
            return super().forward(x)
        if seeds.shape != x.shape[:1]:
            raise ValueError(f"dropout seeds {tuple(seeds.shape)} for a batch of {x.shape[0]}: one seed an image")
        keep = dropout_keep(seeds.to(x.device), self.layer, math.prod(x.shape[1:]), self.p)
        scale = x.new_full((), 1 / (1 - self.p) if self.p < 1 else 0.0)
        return x * torch.where(keep.view(x.shape), scale, x.new_zeros(()))


def run_head(classifier: nn.Sequential, x: Tensor, seeds: Tensor | None = None) -> Tensor:
    """``classifier(x)``, with each image's dropout seeds (``seeds``, (N,) int64) given to its
    :class:`SeededDropout` layers."""
    if seeds is None:
        return classifier(x)
    for module in classifier:
        x = module(x, seeds) if isinstance(module, SeededDropout) else module(x)
    return x


HEAD_NAMES = ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]


def check_arguments(num_classes: int, width: float, dropout: float, input_size: int,
                    switches: dict[str, bool]) -> None:
    """A :class:`UserError` naming the first argument of :class:`VGG` that could build no net, or a net that
    fails only later: a count that is not a whole number, a width or dropout that is not a number in range, a
    switch (``switches``: ``batch_norm``, ``adaptive_pool``) that is not True or False (the string ``"no"`` is
    true)."""
    for name, value in switches.items():
        if not isinstance(value, bool | np.bool_):
            raise UserError(f"{name} must be True or False; got {value!r}")
    if not is_whole(num_classes) or num_classes < 1:
        raise UserError(f"num_classes must be an int, at least 1; got {num_classes!r}")
    if not is_whole(input_size) or input_size < 32 or input_size % 32:
        raise UserError(f"input_size must be an int, a multiple of 32 (five 2x2 poolings); got {input_size!r}")
    if not is_finite(width) or width <= 0:
        raise UserError(f"width must be positive and finite; got {width!r}")
    if not is_finite(dropout) or not 0 <= dropout < 1:
        raise UserError(f"dropout must be a probability from 0 to below 1; got {dropout!r}")


class VGG(nn.Module):
    """A configuration of Table 1: trunk ``features``, then ``classifier`` (FC6 to FC8).

    The classifier flattens the (input_size/32)^2 map of the last pooling layer as the paper does,
    so a plain model only accepts ``input_size`` crops; ``dense()`` gives the fully-convolutional
    form for larger inputs, and ``adaptive_pool=True`` torchvision's adaptive average pooling.
    """

    def __init__(
        self,
        config: str = "D",
        num_classes: int = 1000,
        batch_norm: bool = False,
        width: float = 1.0,
        dropout: float = 0.5,
        input_size: int = 224,
        adaptive_pool: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        check_arguments(num_classes, width, dropout, input_size,
                        {"batch_norm": batch_norm, "adaptive_pool": adaptive_pool})
        self.config = configs.canonical(config)
        self.num_classes = num_classes
        self.batch_norm = batch_norm
        self.width = width
        self.dropout = dropout
        self.input_size = input_size
        self.grid = input_size // 32
        self.adaptive_pool = adaptive_pool
        self.features, trunk_names = make_trunk(self.config, batch_norm, width)
        self.out_channels = scaled(512, width)
        self.avgpool = nn.AdaptiveAvgPool2d(self.grid) if adaptive_pool else nn.Identity()
        self.classifier = make_head(self.out_channels * self.grid**2, num_classes, width, dropout)
        self.frozen_norms: list[str] = []
        self.tap_names = {name: f"features.{i}" for i, name in enumerate(trunk_names)}
        self.tap_names.update({name: f"classifier.{i}" for i, name in enumerate(HEAD_NAMES)})
        initialise(self, init)

    def train(self, mode: bool = True) -> VGG:
        """Training or eval mode, but batch norms of frozen layers (``frozen_norms``, set by
        :func:`verydeep.train.start.freeze`) always in eval mode: frozen means their statistics too."""
        super().train(mode)
        for name in self.frozen_norms:
            self.get_submodule(name).eval()
        return self

    @property
    def name(self) -> str:
        bn = "-BN" if self.batch_norm else ""
        return f"VGG-{self.config}{bn}"

    def extra_repr(self) -> str:
        return f"config={self.config}, width={self.width}, input_size={self.input_size}"

    def _check_size(self, side: tuple[int, ...]) -> None:
        """An input of another ``side`` (h, w) than the crop is refused: one 31 pixels larger still makes FC6's
        map, of the top-left crop alone; with adaptive pooling, one under 32 pixels, which leaves no map."""
        if self.adaptive_pool and min(side) < 32:  # no map left for the adaptive pooling after five poolings
            raise ValueError(f"{self.name} with adaptive pooling takes inputs of at least 32 pixels a side (five 2x2 "
                             f"poolings); got {tuple(side)}")
        if not self.adaptive_pool and tuple(side) != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} takes {self.input_size}x{self.input_size} crops (FC6 sees a "
                f"{self.grid}x{self.grid} map) but the input here is {tuple(side)}; use "
                "model.dense() for inputs of any size, or adaptive_pool=True for torchvision's pooling"
            )

    def forward(self, x: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores of crops ``x``; in training, ``seeds`` ((N,) int64, one an image) make each image's
        dropout masks its own (:class:`SeededDropout`), else they come from the global RNG."""
        check_images(x)
        self._check_size(x.shape[-2:])
        x = run_trunk(self.features, x)
        return run_head(self.classifier, torch.flatten(self.avgpool(x), 1), seeds)

    def dense(self) -> DenseVGG:
        """The fully-convolutional form of Sec. 3.2, sharing this model's parameters."""
        return DenseVGG(self)

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """The convolutions by tap name (``conv1_1`` ...), in order."""
        return {n: self.get_submodule(p) for n, p in self.tap_names.items() if n.startswith("conv")}

    def fc_layers(self) -> dict[str, nn.Linear]:
        """The fully-connected layers ``fc6``, ``fc7``, ``fc8``."""
        return {n: self.get_submodule(self.tap_names[n]) for n in ("fc6", "fc7", "fc8")}

    def extract(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Activations at the named layers (e.g. ``relu4_3``, ``pool5``, ``fc7``) of a crop."""
        return _extract(self, x, names, dense=False)


class DenseVGG(nn.Module):
    """FC layers as convolutions (Sec. 3.2): FC6 a (input_size/32)^2 conv, FC7 and FC8 1x1 convs.

    The weights are the plain model's own (shared, not copied), so training either trains both.
    An input of ``H x W`` (each at least ``input_size``) gives a class score map of
    ``(H/32 - grid + 1) x (W/32 - grid + 1)``; on an ``input_size`` input the map is 1x1 and equals
    the plain model's output.

    The convolutions are computed as the FC layers themselves applied to every ``grid x grid``
    window of the trunk map, each window flattened as the plain model flattens pool5 (channel, row,
    column). This is the same sum; it uses the weights as they are stored, where a convolution
    would convert FC6's whole weight to its own layout on every call (on a CPU most of the time of
    dense evaluation at small scales).
    """

    def __init__(self, model: VGG) -> None:
        super().__init__()
        self.features = model.features
        self.classifier = model.classifier
        self.grid = model.grid
        self.input_size = model.input_size
        self.tap_names = model.tap_names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        self.check_side(x.shape[-2:])
        return self.head(run_trunk(self.features, x))

    def check_side(self, side: tuple[int, ...]) -> None:
        """An input with a side (h, w) under the crop, which makes no FC6 window (or no trunk map at all), is
        refused before the trunk runs."""
        if min(side) < self.input_size:
            raise ValueError(f"dense evaluation needs inputs of at least {self.input_size} pixels a side (a "
                             f"{self.grid}x{self.grid} trunk map); got {tuple(side)}")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the classifier as convolutions to a trunk map ``x`` (N, C, h, w) -> (N, outputs, h', w')."""
        windows, grid = self.windows(x)
        return as_map(self.classifier(windows), grid)

    def windows(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Every ``grid x grid`` window of a trunk map ``x`` (N, C, h, w), flattened: (N, h' * w', C * grid^2),
        and the windows' grid (h', w')."""
        if min(x.shape[-2:]) < self.grid:
            raise ValueError(
                f"dense evaluation needs inputs of at least {self.input_size} pixels a side "
                f"(a {self.grid}x{self.grid} trunk map); got a {tuple(x.shape[-2:])} map"
            )
        h, w = x.shape[-2:]
        # a copy in this order (not a transposed view), so the FC layers take it as one matrix whatever its size
        windows = F.unfold(x, self.grid).transpose(1, 2).clone(memory_format=torch.contiguous_format)
        return windows, (h - self.grid + 1, w - self.grid + 1)

    def extract(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Activation maps at the named layers; ``fc6``/``fc7`` are maps of the conv form."""
        return _extract(self, x, names, dense=True)


def _check_trunk_side(features: nn.Sequential, last: int, name: str, side: tuple[int, ...]) -> None:
    """An input too small for the 2x2 poolings up to ``features[last]``, the tap ``name`` (each halves the side),
    is refused naming the size it needs, before the trunk runs."""
    pools = sum(isinstance(module, nn.MaxPool2d) for module in features[: last + 1])
    if min(side) < 2**pools:
        raise ValueError(f"{name} lies after {pools} 2x2 poolings: it needs inputs of at least {2**pools} pixels a "
                         f"side; got {tuple(side)}")


def check_images(x: torch.Tensor) -> None:
    """A net's input is a batch of float images (N, C, H, W): another is refused naming what it is."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor of images; got a {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images (N, 3, H, W); got a tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected float images (verydeep.data.to_input makes them of uint8 ones); got {x.dtype}")


def as_map(windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-window vectors (N, h' * w', F) as a map (N, F, h', w'), a view in channels_last order."""
    return windows.unflatten(1, grid).permute(0, 3, 1, 2)


def _extract(
    model: VGG | DenseVGG, x: torch.Tensor, names: Iterable[str], dense: bool
) -> dict[str, torch.Tensor]:
    if isinstance(names, str):  # not its characters
        raise TypeError(f"names: expected a list of layer names, got the single name {names!r}; give [{names!r}]")
    wanted = list(names)
    unknown = [n for n in wanted if n not in model.tap_names]
    if unknown:
        raise KeyError(f"unknown layer names {unknown}; known: {', '.join(model.tap_names)}")
    paths, side = {model.tap_names[n] for n in wanted}, x.shape[-2:]  # a name given twice is one tap
    taken: dict[str, torch.Tensor] = {}  # by module path
    kept = {int(path.split(".")[1]) for path in paths if path.startswith("features.")}
    if len(kept) < len(paths) and dense:  # a tap in the head: the input checked as the net's forward checks it
        model.check_side(side)
    elif len(kept) < len(paths):
        model._check_size(side)
    elif kept:
        deepest = next(name for name in wanted if model.tap_names[name] == f"features.{max(kept)}")
        _check_trunk_side(model.features, max(kept), deepest, side)
    for i, output in trunk_outputs(model.features, x, kept) if paths else ():
        x = output
        if i in kept:
            taken[f"features.{i}"] = x.clone()
        if len(taken) == len(paths):  # the last tap is in the trunk: no windows, and no size check
            break
    if len(taken) < len(paths):
        if dense:
            x, grid = model.windows(x)
        else:
            model._check_size(side)
            x = torch.flatten(model.avgpool(x), 1)
        for i, module in enumerate(model.classifier):
            if len(taken) == len(paths):
                break
            x = module(x)
            if f"classifier.{i}" in paths:
                taken[f"classifier.{i}"] = as_map(x.clone(), grid) if dense else x.clone()
    return {name: taken[model.tap_names[name]] for name in wanted}


#: ``vgg("D", num_classes=10, width=1/4, input_size=32)``: build a configuration of Table 1.
vgg = VGG
