"""Input normalisation: mean RGB subtraction and the AlexNet PCA colour shift (Sec. 2, 3.1).

Images stay uint8 through decoding, augmentation and collation; :func:`to_input` is the last
step, run per batch on the training device. Statistics are RGB on the 0..1 scale. A net may take
its input in another convention, which travels with its weights: the authors' Caffe nets take
BGR on 0..255 minus the mean (``channels="BGR"``, ``value_scale=255``, ``std=(1, 1, 1)``).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verydeep.errors import MissingFileError, UserError
from verydeep.io.atomic import atomic_write

Triple = tuple[float, float, float]

#: Name of the stored statistics file, beside the dataset (written by ``verydeep data stats``).
PREPROCESS_FILE = "preprocess.json"


#: The smallest per-channel std a preprocessing may divide by.
MIN_STD = 1e-3
#: The largest value an input convention may put pixels on (Caffe's is 255, torchvision's 1).
MAX_VALUE_SCALE = 65535


@dataclass(frozen=True)
class Preprocess:
    """Per-channel RGB statistics on the 0..1 scale, and the net's input convention.

    ``eigvec`` is the 3x3 matrix whose *columns* are the eigenvectors of the RGB covariance, with
    eigenvalues ``eigval`` (Krizhevsky et al. 2012, used by the paper in Sec. 3.1). The net takes
    ``value_scale * (x - mean) / std`` for x on the 0..1 scale, its channels in ``channels`` order.
    """

    mean: Triple
    std: Triple
    eigval: Triple
    eigvec: tuple[Triple, Triple, Triple]
    channels: str = "RGB"
    value_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mean", "std", "eigval"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"Preprocess.{name} needs 3 values (R, G, B); got {value!r}")
        if len(self.eigvec) != 3 or any(len(row) != 3 for row in self.eigvec):
            raise ValueError(f"Preprocess.eigvec must be 3x3; got {self.eigvec!r}")
        _check_numbers("mean", self.mean, lambda v: 0 <= v <= 1, "from 0 to 1 (statistics are on the 0..1 scale)")
        _check_numbers("std", self.std, lambda v: MIN_STD <= v <= 1,
                       f"from {MIN_STD:g} (a quarter of one of 255 levels: a smaller one blows the input up) to 1 "
                       "(statistics are on the 0..1 scale)")
        _check_numbers("eigval", self.eigval, lambda v: 0 <= v <= 1,
                       "from 0 (a covariance's eigenvalue) to 1 (statistics are on the 0..1 scale)")
        for i, row in enumerate(self.eigvec):
            _check_numbers(f"eigvec[{i}]", row, lambda v: True, "")
        columns = torch.tensor(self.eigvec, dtype=torch.float64)
        if not torch.allclose(columns.T @ columns, torch.eye(3, dtype=torch.float64), atol=ORTHONORMAL_TOLERANCE):
            raise ValueError(f"Preprocess.eigvec's columns must be orthonormal eigenvectors; got {self.eigvec!r}")
        if self.channels not in ("RGB", "BGR"):
            raise ValueError(f"Preprocess: channels must be RGB or BGR; got {self.channels!r}")
        if not 1 <= self.value_scale <= MAX_VALUE_SCALE:
            raise ValueError(f"value_scale is {self.value_scale!r}; expected a number from 1 (inputs on 0..1) to "
                             f"{MAX_VALUE_SCALE} (the largest value of a 16-bit image)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: lists of floats."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "eigval": list(self.eigval),
            "eigvec": [list(row) for row in self.eigvec],
            "channels": self.channels,
            "value_scale": self.value_scale,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`; a missing key, or a value of the wrong kind or out of range, is a
        ``ValueError`` naming it (which :func:`load_preprocess` reports as a :class:`UserError` naming the file)."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess statistics must be a JSON object; got {type(d).__name__}")
        missing = [k for k in ("mean", "std", "eigval", "eigvec") if k not in d]
        if missing:
            raise ValueError(f"preprocess statistics lack {', '.join(missing)}")
        unknown = sorted(str(k) for k in d if k not in KEYS)  # a misspelt value_scale would leave the default
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (the keys are {', '.join(KEYS)}; a note of one's own goes "
                             "under notes)")
        if not isinstance(d["eigvec"], list | tuple):
            raise ValueError(f"eigvec must be 3 rows of 3 numbers; got {d['eigvec']!r}")
        return cls(
            mean=_numbers(d["mean"], "mean"),
            std=_numbers(d["std"], "std"),
            eigval=_numbers(d["eigval"], "eigval"),
            eigvec=tuple(_numbers(row, f"eigvec[{i}]") for i, row in enumerate(d["eigvec"])),  # type: ignore[arg-type]
            channels=str(d.get("channels", "RGB")),
            value_scale=_number(d.get("value_scale", 1.0), "value_scale"),
        )


#: The keys of preprocess statistics: :meth:`Preprocess.to_dict`'s, the sample ``data stats`` computed them on, and
#: ``notes`` of the user's own (any JSON), which ``data stats`` keeps when it computes the statistics anew.
KEYS = ("mean", "std", "eigval", "eigvec", "channels", "value_scale", "computed_on", "notes")
#: How far ``eigvec``'s columns may be from orthonormal (files hold rounded values).
ORTHONORMAL_TOLERANCE = 0.01


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # non-finite values: _check_numbers
        raise ValueError(f"{name} must be a number; got {value!r}")
    try:
        return float(value)
    except OverflowError:  # a JSON integer of hundreds of digits
        raise ValueError(f"{name} is {str(value)[:20]}...: far beyond any number of its kind") from None


def _numbers(values: Any, name: str) -> Triple:
    """``values`` (a list of numbers) as floats; anything else is a ``ValueError`` naming ``name``."""
    if not isinstance(values, list | tuple):
        raise ValueError(f"{name} must be a list of 3 numbers; got {values!r}")
    return tuple(_number(v, f"{name}[{i}]") for i, v in enumerate(values))  # type: ignore[return-value]


def _check_numbers(name: str, values: Sequence[float], in_range: Callable[[float], bool], expected: str) -> None:
    """A ``ValueError`` naming ``name[i]`` for the first value that is not finite or not ``in_range``."""
    for i, value in enumerate(values):
        if not (math.isfinite(value) and in_range(value)):
            raise ValueError(f"{name}[{i}] is {value!r}; expected a finite number {expected}".rstrip())


#: ImageNet's well-known statistics (torchvision's mean/std; AlexNet/fb.resnet PCA on 0..1). The PCA is the
#: field's usual constants, not the eigen-decomposition of the covariance the std describe (its eigenvalues sum to
#: 0.24, their variances to 0.15): ``verydeep data stats`` gives a training set's own, as Sec. 3.1 has it.
IMAGENET = Preprocess(
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=(
        (-0.5675, 0.7192, 0.4009),
        (-0.5808, -0.0045, -0.8140),
        (-0.5836, -0.6948, 0.4203),
    ),
)


def pca_shift(n: int, pre: Preprocess, alpha_std: float, generator: torch.Generator | None = None) -> Tensor:
    """Per-image RGB shifts (n, 3) on the 0..1 scale: ``eigvec @ (alpha * eigval)``, alpha ~ N(0, alpha_std).

    One alpha per image and eigenvector, drawn on the generator's device (CPU by default), so
    the shift's covariance is ``eigvec diag((alpha_std * eigval)^2) eigvec^T``.
    """
    if not (math.isfinite(alpha_std) and alpha_std >= 0):
        raise UserError(f"alpha_std is the standard deviation of the PCA shift's weights, finite and at least 0; "
                        f"got {alpha_std}")
    device = generator.device if generator is not None else torch.device("cpu")
    alpha = torch.randn(n, 3, generator=generator, device=device) * alpha_std
    eigval = torch.tensor(pre.eigval, device=device)
    eigvec = torch.tensor(pre.eigvec, device=device)
    return (alpha * eigval) @ eigvec.T


def to_input(images: Tensor, pre: Preprocess, shifts: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """uint8 images (N, 3, H, W) to the network's float32 input: ``value_scale * (x/255 + shift - mean) / std``,
    in the channel order the net takes (``pre.channels``).

    ``shifts`` (N, 3) are the images' PCA colour shifts (Sec. 3.1, :func:`pca_shift`), on the
    0..1 scale; none by default. Runs on the images' device and keeps their memory format
    (channels_last stays channels_last). ``out``: float32 memory to write into, at least
    N*3*H*W elements on the same device; reusing one across batches spares the CPU the page
    faults of fresh memory, which cost more than the arithmetic.
    """
    if not isinstance(images, Tensor):  # a numpy array or PIL image: its dtype and shape would look right
        raise TypeError(f"to_input wants a torch tensor of uint8 (N, 3, H, W) images; got a {type(images).__name__} "
                        "(torch.from_numpy, or torchvision.transforms.functional.pil_to_tensor, makes one)")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"to_input wants uint8 (N, 3, H, W) images; got {images.dtype} {tuple(images.shape)}")
    n, _, h, w = images.shape
    device = images.device
    std = torch.tensor(pre.std, device=device) / pre.value_scale
    scale = 1.0 / (255.0 * std)
    bias = -torch.tensor(pre.mean, device=device).expand(n, 3)
    if shifts is not None:
        bias = bias + shifts.to(device)
    bias = bias / std
    if pre.channels == "BGR":  # the same arithmetic on the images' channels reversed
        images, scale, bias = images.flip(1), scale.flip(0), bias.flip(1)
    if out is None:
        out = torch.empty(n * 3 * h * w, device=device)
    elif out.dtype != torch.float32 or out.device != device or out.numel() < n * 3 * h * w:
        raise ValueError(f"to_input: out must be float32 on {device} with at least {n * 3 * h * w} elements")
    out = out.view(-1)[: n * 3 * h * w]
    # convert first (mixed-dtype ops are not vectorised), then one fused pass in place: bias + x * scale
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        # channels_last: the channel is the fastest dimension; broadcast along rows of w*3
        # values, not over a size-3 inner loop
        rows = out.view(n, h, w * 3).copy_(images.permute(0, 2, 3, 1).reshape(n, h, w * 3))
        torch.addcmul(bias.repeat(1, w).view(n, 1, w * 3), rows, scale.repeat(w).view(1, 1, w * 3), out=rows)
        return rows.view(n, h, w, 3).permute(0, 3, 1, 2)
    planes = out.view(n, 3, h * w).copy_(images.reshape(n, 3, h * w))
    torch.addcmul(bias.view(n, 3, 1), planes, scale.view(1, 3, 1), out=planes)
    return planes.view(n, 3, h, w)


def save_preprocess(pre: Preprocess, path: str | Path) -> Path:
    """Write ``pre`` as JSON to ``path`` (a file, or a folder to hold ``preprocess.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / PREPROCESS_FILE
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(pre.to_dict(), indent=2) + "\n"))


def read_preprocess(path: Path) -> Preprocess:
    """The statistics in the JSON file ``path``; a damaged file is one line naming it."""
    try:
        return Preprocess.from_dict(json.loads(path.read_text(encoding="utf-8-sig")))
    except (ValueError, TypeError, AttributeError, RecursionError) as error:  # JSON's and Unicode's are ValueErrors
        raise UserError(f"{path}: bad preprocess statistics ({type(error).__name__}: {str(error)[:200]})") from None


def load_preprocess(data_dir: str | Path) -> Preprocess:
    """The statistics stored by ``verydeep data stats`` for ``data_dir``, else :data:`IMAGENET`.

    Looks for ``preprocess.json`` in ``data_dir``, in its ``train/`` (where ``data stats DIR/train`` writes
    it) and, for a split folder (``train``, ``val``, ``test``), in its dataset's folder; never in the folder
    that holds a dataset, whose file would be another dataset's. ``data_dir`` may also name the JSON file.
    """
    data_dir = Path(data_dir)
    named = data_dir.is_file() or data_dir.suffix.lower() == ".json"  # a file given is read as one: never ImageNet's
    candidates = [data_dir] if named else [
        data_dir / PREPROCESS_FILE,
        data_dir / "train" / PREPROCESS_FILE,
        *([data_dir.parent / PREPROCESS_FILE] if data_dir.name in ("train", "val", "test") else []),
    ]
    for path in candidates:
        if path.is_file():
            return read_preprocess(path)
    if named:
        raise MissingFileError(f"{data_dir}: no such preprocess file")
    return IMAGENET
