"""The feature nets and the descriptor they give (Appendix B): FC7 of the dense net, pooled, flipped, normalised.

The last FC layer is dropped and the penultimate layer's activations (FC7 after its ReLU, the tap
``relu7``: 4096-d at full width) describe the image. The net is applied densely (Sec. 3.2) to the whole
image rescaled so its smallest side is Q; the FC7 map is global-average pooled, and averaged with the
mirrored image's descriptor. Over several Q the descriptors are stacked (concatenated) or averaged,
then L2-normalised; several nets stack their normalised descriptors (Table 11's "D and E"), the
whole normalised again so that each net weighs the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verydeep.data import Preprocess
from verydeep.errors import UserError
from verydeep.eval.nets import refuse_repeats
from verydeep.io.sources import load
from verydeep.nn.model import DenseVGG
from verydeep.runtime.device import prepare

#: The layer whose activations are the descriptor: FC7 after its ReLU.
TAP = "relu7"
AGGREGATES = ("stack", "average")
#: The paper's Caltech scales Q (its VOC descriptors averaged 256 to 768 in steps of 128).
DEFAULT_SCALES = (256, 384, 512)


# ---- descriptors ----------------------------------------------------------------------------


def pooled_descriptor(dense: DenseVGG, x: Tensor, flip: bool = True) -> Tensor:
    """Appendix B: the ``relu7`` map of the dense net on normalised images (N, 3, H, W), global-average
    pooled, averaged with the mirrored images' when ``flip``: (N, FC7 width), float32."""
    n = x.shape[0]
    inputs = torch.cat([x, x.flip(-1)]) if flip else x
    pooled = dense.extract(inputs, [TAP])[TAP].float().mean(dim=(2, 3))
    return pooled.view(2, n, -1).mean(dim=0) if flip else pooled


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def aggregate(per_scale: Sequence[np.ndarray], how: str) -> np.ndarray:
    """One net's descriptors (N, D) at each Q, stacked to (N, D x scales) or averaged to (N, D), then L2-normalised."""
    if how not in AGGREGATES:
        raise UserError(f"--aggregate must be one of {', '.join(AGGREGATES)}; got {how!r}")
    joined = np.concatenate(per_scale, axis=1) if how == "stack" else np.mean(per_scale, axis=0)
    return l2_normalise(joined)


def combine(per_net: Sequence[np.ndarray]) -> np.ndarray:
    """Several nets' normalised descriptors stacked and L2-normalised again (each net weighs the same)."""
    return l2_normalise(np.concatenate(per_net, axis=1))


# ---- nets -----------------------------------------------------------------------------------


@dataclass
class FeatureNet:
    """A net whose FC7 describes images: its source, name, dense form, input convention and crop."""

    source: str
    name: str
    dense: DenseVGG
    preprocess: Preprocess
    crop: int
    dims: int  # FC7's width
    digest: str  # of its weights: a partial extraction continues only with the same weights

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.name, "crop": self.crop, "digest": self.digest}


def weights_digest(model: torch.nn.Module) -> str:
    """A BLAKE2 digest of every tensor of ``model``'s state dict."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_feature_nets(sources: Sequence[str | Path], data: str | Path, device: torch.device,
                      weights_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> list[FeatureNet]:
    """Each source through :func:`verydeep.load`, refused when it holds no FC layers (Keras' ``notop``
    files: FC7 would be random); the input convention is the weights' own; the weights in ``dtype``, the
    autocast dtype the net runs under, when given."""
    if not sources:
        raise UserError("give --weights SOURCE (or --raw-pixels SIDE)")
    nets, seen = [], []
    for source in sources:
        loaded = load(source, weights_dir, data=data, purpose="give FC7 features")
        seen.append((source, loaded.model, loaded.preprocess, loaded.recipe))
        # stacked with itself, a net's descriptor is only longer; FC7's does not read FC8 or the classes
        refuse_repeats(seen, "--weights", ignored=loaded.model.tap_names["fc8"])
        digest = weights_digest(loaded.model)  # of the weights as stored, whatever dtype they run in
        model = prepare(loaded.model, device, dtype=dtype).eval()
        nets.append(FeatureNet(str(source), loaded.name, model.dense(), loaded.preprocess, model.input_size,
                               model.fc_layers()["fc7"].out_features, digest))
    return nets


def check_scales_cover_crops(nets: Sequence[FeatureNet], scales: Sequence[int]) -> None:
    """Every test scale Q at least each net's crop (the dense net's smallest input); else a one-line error."""
    small = [(net.source, net.crop) for net in nets if min(scales) < net.crop]
    if small:
        raise UserError(f"--scales {min(scales)} is smaller than the crop {small[0][1]} of {small[0][0]}")
