"""Classify images with a trained or published net: dense evaluation over the whole image (Sec. 3.2),
and the image-specific class saliency maps of Simonyan, Vedaldi & Zisserman (2014).

Each image is rescaled to every test scale Q of the net (see :func:`verydeep.eval.nets.net_scales`),
the fully-convolutional net's class score map averaged spatially, the mirrored image averaged in,
and the posteriors averaged over Q; the top-k classes are reported with their human-readable names.
``--protocol multicrop`` takes the 5x5 grid of crops and their flips instead, ``dense+multicrop``
the average of both (Table 5). The posteriors are ``eval``'s: the same passes of
:mod:`verydeep.eval.sweep`, one per Q, over the given images.
The net's input convention (channel order, value scale, statistics) comes with its weights.

The saliency map ("Deep Inside Convolutional Networks", ICLR 2014 workshop, Sec. 3.1) is the
gradient of the top class's unnormalised score (before the softmax) with respect to the input
image, its absolute value's maximum over the colour channels. It is computed on the dense net over
the whole image rescaled to the smallest test scale, where the class score is the spatial mean of
the class score map, the score that dense prediction averages (Sec. 3.2): one backward pass
explains the whole photo rather than a centre crop.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verydeep.data import RescaleTransform, gpu, to_input
from verydeep.data.datasets import DECODE_ERRORS, IndexedImages
from verydeep.errors import MissingFileError, UserError
from verydeep.eval.evaluate import BATCH_SIZE, given_weights
from verydeep.eval.nets import Net, load_nets, net_scales
from verydeep.eval.sweep import Pass, SweepSettings, average, compute_posteriors
from verydeep.io.atomic import atomic_write
from verydeep.io.jsonable import to_json_dict
from verydeep.io.outputs import DRAWN_BY, refuse_writing_in_datasets_of
from verydeep.options import (
    add_device,
    add_precision,
    add_weights,
    input_path,
    listed,
    output_file,
    parse_scales,
    positive_int,
    whole,
    whole_scales,
)
from verydeep.runtime.device import pick_device, refuse_inference_mode
from verydeep.runtime.precision import autocast_dtype


@dataclass(frozen=True)
class RankedClass:
    """One of an image's top classes: its rank, index, class folder (``class_``, ``class`` in JSON),
    human-readable name and posterior probability."""

    rank: int
    index: int
    class_: str
    name: str
    probability: float


@dataclass(frozen=True)
class ImagePrediction:
    """An image's top classes, and the PNG of its saliency map when one was drawn."""

    image: str
    top: list[RankedClass]
    saliency: str | None = None


@dataclass(frozen=True)
class Prediction:
    """The top classes of each image, by the net of ``weights`` at test scales ``scales``, its input
    convention and statistics ``preprocess`` applied."""

    weights: str
    scales: list[int]
    flip: bool
    preprocess: dict[str, Any]
    predictions: list[ImagePrediction]
    protocol: str = "dense"

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)


def check_images(images: Sequence[str | Path]) -> None:
    """Every image is a file, and there is one at least; otherwise an error naming the first that is not."""
    if not images:
        raise UserError("no image given")
    for path in map(Path, images):
        if path.is_dir():
            raise UserError(f"{path}: a folder, not an image")
        if not path.is_file():
            raise MissingFileError(f"{path}: no such image")


def load_image(path: str | Path, q: int) -> Tensor:
    """The image as uint8 (3, H, W), rescaled so that its smallest side is ``q``."""

    try:
        return RescaleTransform(q)(path)
    except DECODE_ERRORS as error:
        raise UserError(f"{path}: unreadable image ({type(error).__name__})") from error


#: What ``predict --protocol`` may ask for (Sec. 3.2; their combination is Table 5's).
PROTOCOLS = ("dense", "multicrop", "dense+multicrop")


def image_posteriors(net: Net, images: Sequence[str | Path], flip: bool, device: torch.device,
                     dtype: torch.dtype | None, protocol: str = "dense", scales: Sequence[int] | None = None) -> Tensor:
    """Sec. 3.2: the posteriors (N, classes) of ``images`` by ``protocol`` (dense, multi-crop, or both averaged as
    in Table 5), each averaged over the test scales (the net's own unless ``scales`` is given): ``eval``'s passes
    (:func:`verydeep.eval.sweep.compute_posteriors`), one per Q, images of one size there batched together and
    decoded where ``eval`` decodes them. An unreadable image is a :class:`UserError` naming it."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol}: one of {', '.join(PROTOCOLS)}")
    kinds, chosen = protocol.split("+"), list(scales or net.scales)
    dataset = IndexedImages(images, strict=True)  # an image that does not decode is one line naming it
    settings = SweepSettings(device, dtype, flip, BATCH_SIZE, 0, False, gpu.resolve_decode("auto", device))
    passes = {Pass(q): [(0, kinds)] for q in chosen}
    found, skipped, _ = compute_posteriors([net], dataset, passes, settings)
    if skipped:
        raise UserError(f"{next(str(p) for p, _ in dataset.samples if str(p) in skipped)}: unreadable image")
    posteriors = average(average(found[0, kind, q] for q in chosen) for kind in kinds)
    for path, posterior in zip(images, posteriors, strict=True):
        if not posterior.isfinite().all():
            raise UserError(f"{net.checkpoint}: the net's outputs are not finite (NaN or inf) on {path}")
    return posteriors


def ranked_classes(net: Net, posterior: Tensor, topk: int) -> list[RankedClass]:
    """The ``topk`` classes of a posterior (classes,), best first, with their folders and readable names."""
    classes = net.recipe.get("classes") or [str(i) for i in range(net.model.num_classes)]
    names = net.recipe.get("class_names") or classes
    probabilities, indices = posterior.topk(min(topk, posterior.numel()))
    return [RankedClass(rank + 1, int(i), classes[i], names[i], float(p))
            for rank, (p, i) in enumerate(zip(probabilities.tolist(), indices.tolist(), strict=True))]


def saliency_map(net: Net, image: Tensor, index: int, device: torch.device) -> Tensor:
    """Simonyan et al. (2014), Sec. 3.1: ``M_ij = max_c |dS/dI_ijc|`` (H, W) of a uint8 image (3, H, W), where
    S is class ``index``'s unnormalised score on the whole image (the spatial mean of the dense net's score
    map) and I the image's RGB pixel values, through the net's input convention."""
    refuse_inference_mode("a saliency map")
    pre = net.preprocess
    x = to_input(image.unsqueeze(0).to(device), pre).detach().requires_grad_()
    with torch.enable_grad():
        score = net.dense(x)[0, index].mean()
        (gradient,) = torch.autograd.grad(score, x)
    per_pixel = pre.value_scale / (255 * torch.tensor(pre.std, device=device))  # dx/dI for each RGB channel
    if pre.channels == "BGR":
        per_pixel = per_pixel.flip(0)
    return (gradient[0] * per_pixel.view(3, 1, 1)).abs().amax(dim=0).cpu()


def draw_saliency(image: Tensor, saliency: Tensor, title: str, out: Path) -> Path:
    """The image (uint8 (3, H, W)) and its saliency map (H, W) side by side, as in Fig. 2 of Simonyan
    et al. (2014), written to ``out`` as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = saliency.shape
    aspect = min(max(width / height, 0.75), 2.0)
    fig = Figure(figsize=(8 * aspect + 0.2, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    image_ax, map_ax = fig.subplots(1, 2)
    image_ax.imshow(image.permute(1, 2, 0).numpy())
    image_ax.set_title(title)
    map_ax.imshow(saliency.numpy(), cmap="gray")
    map_ax.set_title("class saliency: max over colour of |dS/dI|")
    for ax in (image_ax, map_ax):
        ax.set_axis_off()
    drawn = {"Software": f"{DRAWN_BY} predict"}  # a later call may draw it again: no image of a dataset
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100, metadata=drawn))


def saliency_paths(out: Path, count: int) -> list[Path]:
    """``OUT.png`` for one image; ``OUT-1.png`` ... ``OUT-N.png``, in the images' order, for several."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--saliency {out}: give a .png file name")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]


def refuse_overwriting(outputs: Sequence[Path], images: Sequence[str | Path]) -> None:
    """A saliency map that would replace one of the input images, or join the images of a dataset one lies in, is
    a :class:`UserError`, before any is drawn."""
    for out in outputs:
        hit = next((image for image in images if out.exists() and Path(image).exists() and out.samefile(image)), None)
        if hit is not None:
            raise UserError(f"--saliency {out}: would overwrite the input image {hit}; give another file name")
    refuse_writing_in_datasets_of(images, outputs, "--saliency")


def write_saliency(net: Net, path: str | Path, best: RankedClass, out: Path, device: torch.device,
                   scales: Sequence[int] | None = None) -> Path:
    """Draw the saliency map of the image's top class, on the image at the smallest test scale."""
    image = load_image(path, min(scales or net.scales))
    saliency = saliency_map(net, image, best.index, device)
    return draw_saliency(image, saliency, f"{best.name} ({best.probability:.1%})", out)


def predict(
    source: str | Path,
    images: Sequence[str | Path],
    topk: int = 5,
    scales: Sequence[int] | None = None,
    flip: bool = True,
    device: str = "auto",
    precision: str = "auto",
    weights_dir: str | Path | None = None,
    saliency: str | Path | None = None,
    protocol: str = "dense",
) -> Prediction:
    """Top-``topk`` classes of each image by the net of ``source`` (weights as
    :func:`verydeep.load` reads them); with ``saliency`` (a .png path), each image's
    top-class saliency map beside it (files named by :func:`saliency_paths`). A missing or unreadable
    image is an error naming the file."""
    images, scales = listed(images, "images"), whole_scales(scales)
    if whole(topk, "--topk") < 1:
        raise UserError(f"--topk must be at least 1; got {topk}")
    check_images(images)
    outs = saliency_paths(Path(saliency), len(images)) if saliency is not None else None
    refuse_overwriting(outs or [], images)
    torch_device = pick_device(device)
    dtype = autocast_dtype(torch_device, precision)
    # weights cast for the autocast dtype, unless a saliency map takes its gradient in fp32
    net = load_nets([source], scales, None, torch_device, weights_dir, None if saliency else dtype)[0]
    return predict_with(net, images, topk, flip, torch_device, dtype, outs, protocol)


def chosen_scales(net: Net, scales: Sequence[int] | None, option: str = "--scales") -> list[int]:
    """``scales`` (sorted, each checked against the net's crop, an error naming ``option``) when given, else
    the net's own test scales."""
    return net_scales(net.recipe, net.crop, scales, net.checkpoint, option) if scales else net.scales


def predict_with(net: Net, images: Sequence[str | Path], topk: int, flip: bool, device: torch.device,
                 dtype: torch.dtype | None, saliency: Sequence[Path] | None = None, protocol: str = "dense",
                 scales: Sequence[int] | None = None) -> Prediction:
    """:func:`predict` by a net already loaded (:func:`verydeep.eval.nets.load_nets`), at its test scales or
    ``scales``, the saliency maps drawn into ``saliency`` (one PNG per image) when given."""
    chosen = chosen_scales(net, scales)
    predictions = []
    posteriors = image_posteriors(net, images, flip, device, dtype, protocol, chosen)
    for i, (path, posterior) in enumerate(zip(images, posteriors, strict=True)):
        top = ranked_classes(net, posterior, topk)
        out = write_saliency(net, path, top[0], saliency[i], device, chosen) if saliency else None
        predictions.append(ImagePrediction(str(path), top, str(out) if out is not None else None))
    return Prediction(net.checkpoint, chosen, flip, net.preprocess.to_dict(), predictions, protocol)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="top-k classes of images, dense over the whole image (Sec. 3.2), "
                                              "and class saliency maps")
    add_weights(p)
    p.add_argument("images", nargs="+", type=input_path, metavar="IMAGE")
    p.add_argument("--topk", type=positive_int, default=5,
                   help="classes to list per image (default 5; all of them where the net has fewer)")
    p.add_argument("--scales", type=parse_scales, default=None,
                   help="test scales Q (default: from the recipe, else 256,384,512 scaled by crop/224)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not average in the mirrored image")
    p.add_argument("--protocol", choices=PROTOCOLS, default="dense",
                   help="dense over the whole image (default), multicrop (a 5x5 grid of crops and their flips), or "
                        "both averaged (Sec. 3.2, Table 5)")
    p.add_argument("--saliency", type=output_file, default=None, metavar="OUT.png",
                   help="draw the image beside the top class's saliency map (Simonyan et al. 2014) in this PNG; "
                        "with several images, OUT-1.png, OUT-2.png ... in their order")
    add_device(p)
    add_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    result = predict(given_weights(args), args.images, args.topk, args.scales, args.flip, args.device,
                     args.precision, args.weights_dir, args.saliency, args.protocol)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    for prediction in result.predictions:
        print(prediction.image)
        for entry in prediction.top:
            label = entry.name if entry.name == entry.class_ else f"{entry.name} ({entry.class_})"
            print(f"  {entry.rank}. {entry.probability:.3f}  {label}")
        if prediction.saliency:
            print(f"  saliency map: {prediction.saliency}")
