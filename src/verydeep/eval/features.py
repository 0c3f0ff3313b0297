"""Very deep features for other datasets (Appendix B): FC7 descriptors of the dense net, for linear SVMs.

The extraction over a set of images (:mod:`verydeep.eval.image_sets`) by one or several nets
(:mod:`verydeep.eval.descriptors`: the dense net's FC7 map pooled, averaged with the mirrored image's,
stacked or averaged over Q, L2-normalised), in passes over the test scales
(:mod:`verydeep.eval.feature_passes`), resumable from ``OUT.partial``
(:mod:`verydeep.eval.feature_store`); the raw-pixel baseline; the ``features`` command and the flags it
shares with ``transfer``. Q is in pixels, whatever the net's crop (the paper's 256, 384, 512 by default,
its Caltech setting); a Q below a net's crop is an error. The result (:class:`Features`) is an ``.npz``
numpy reads: ``features``, ``labels``, ``paths``, ``splits``, ``classes``, ``class_names``, ``skipped``
and ``settings`` (JSON).

Activations at any other layer (``conv1_1`` .. ``pool5``, ``fc6``, ``fc7``) come from
``model.extract(x, names)`` or, as maps of the fully-convolutional form, ``model.dense().extract``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from verydeep.data import CenterCropTransform
from verydeep.data.datasets import IndexedImages
from verydeep.errors import UserError
from verydeep.eval.box_features import REGIONS, extract_action_features
from verydeep.eval.descriptors import (
    AGGREGATES,
    DEFAULT_SCALES,
    TAP,
    aggregate,
    check_scales_cover_crops,
    combine,
    l2_normalise,
    load_feature_nets,
)
from verydeep.eval.feature_passes import Settings, run_passes
from verydeep.eval.feature_store import Features, Partial, extraction_key
from verydeep.eval.image_sets import ImageSet, loaded_batches, open_image_set
from verydeep.io.atomic import remove_written
from verydeep.options import (
    add_device,
    add_precision,
    add_progress,
    add_weights,
    add_workers,
    image_side,
    input_path,
    output_file,
    parse_scales,
    positive_int,
)
from verydeep.runtime import sharding
from verydeep.runtime.memory import available_memory_bytes
from verydeep.runtime.precision import precision_name
from verydeep.runtime.processes import Processes
from verydeep.runtime.progress import progress_bar


def extract_features(sources: Sequence[str | Path], data: str | Path, out: str | Path | None = None,
                     settings: Settings | None = None, weights_dir: str | Path | None = None) -> Features:
    """Appendix B's descriptors of every image of ``data`` (:func:`open_image_set`) by the nets of ``sources``
    (anything :func:`verydeep.load` reads; several stack their descriptors).

    With ``out`` the result is written there, and the work is saved every ``settings.checkpoint_every``
    batches to ``OUT.partial``, which a later call with the same nets, images and scales continues.
    """
    settings = settings or Settings.create()
    images = open_image_set(data)
    nets = load_feature_nets(sources, data, settings.device, weights_dir, settings.dtype)
    check_scales_cover_crops(nets, settings.scales)
    partial_path = Path(f"{out}.partial") if out is not None else None
    key = extraction_key(nets, images, settings.scales, settings.dtype)
    state = Partial.start(key, nets, settings.scales, len(images.paths))
    if partial_path is not None:  # a save a kill cut short left a temporary file: its next save removes it
        state = Partial.resume(partial_path, state)
    run_passes(nets, images, state, settings, partial_path)
    keep = np.array([path not in state.skipped for path in images.paths])
    per_net = [aggregate([state.arrays[f"net{i}_Q{q}"][keep] for q in settings.scales], settings.aggregate)
               for i in range(len(nets))]
    for net, descriptors in zip(nets, per_net, strict=True):
        if not np.isfinite(descriptors).all():
            raise UserError(f"{net.source}: the net's features are not finite (NaN or inf)")
    description = {"kind": "vgg", "tap": TAP, "flip": True, "nets": [net.describe() for net in nets],
                   "scales": list(settings.scales), "aggregate": settings.aggregate, "data": str(data),
                   "precision": precision_name(settings.dtype)}  # bf16's descriptors differ by about 1e-3
    result = kept_images(images, keep, combine(per_net), description, state.skipped)
    if out is not None and Processes.from_env().main:
        result.save(out)
        remove_written(partial_path)  # its saves' leftovers too
    return result


def kept_images(images: ImageSet, keep: np.ndarray, features: np.ndarray, settings: dict[str, Any],
                skipped: set[str]) -> Features:
    """The :class:`Features` of the images ``keep`` marks (those read), their descriptors ``features``."""
    if not keep.any():
        raise UserError("no image could be read")
    chosen = np.flatnonzero(keep)
    return Features(features, images.labels[keep], [images.paths[i] for i in chosen],
                    [images.splits[i] for i in chosen], images.classes, images.class_names, settings, sorted(skipped))


#: The copies of the raw-pixel descriptors held at once: all, those of the images read, normalised.
RAW_PIXEL_COPIES = 3


def raw_pixel_features(data: str | Path, side: int, settings: Settings | None = None) -> Features:
    """A baseline without a ConvNet: each image's smallest side rescaled to ``side``, its central ``side`` x
    ``side`` square's pixels (RGB on 0..1) less their mean, L2-normalised."""

    settings = settings or Settings.create()
    images = open_image_set(data)
    n, size = len(images.paths), settings.batch_size
    need, available = RAW_PIXEL_COPIES * n * 3 * side * side * 4, available_memory_bytes()
    if available is not None and need > available:
        raise UserError(f"--raw-pixels {side}: the descriptors of {n} images take {need / 1e9:.3g} GB (float32, "
                        f"{RAW_PIXEL_COPIES} copies), more than the {available / 1e9:.3g} GB available; give a smaller "
                        "side")
    dataset = IndexedImages(images.paths, CenterCropTransform(side, side))
    pixels = np.zeros((n, 3 * side * side), np.float32)
    skipped: set[str] = set()
    batches = sharding.shard([list(range(start, min(start + size, n))) for start in range(0, n, size)])
    with progress_bar(sum(map(len, batches)), settings.progress and Processes.from_env().main, unit="img",
                      desc=f"pixels {side}x{side}") as bar:
        for indices, batch, lost in loaded_batches(dataset, batches, settings.workers):
            if len(indices):  # not a batch of unreadable images only
                values = batch.reshape(len(indices), -1).float().numpy() / 255
                pixels[indices] = values - values.mean(axis=1, keepdims=True)
            skipped.update(lost)
            bar.update(len(indices) + len(lost))
    sharding.gather_rows(pixels, [i for batch in batches for i in batch])
    skipped = sharding.union(skipped)
    keep = np.array([path not in skipped for path in images.paths])
    return kept_images(images, keep, l2_normalise(pixels[keep]), {"kind": "raw-pixels", "side": side,
                                                                  "data": str(data)}, skipped)


# ---- command line ---------------------------------------------------------------------------


#: The extraction flags: destination, flag and default. The parser leaves each None, so that a flag given, even
#: at its default, is told apart from one left out (and refused where it would have no effect).
EXTRACTION_FLAGS = {"scales": ("--scales", DEFAULT_SCALES), "aggregate": ("--aggregate", "stack"),
                    "batch_size": ("--batch-size", 16), "workers": ("--workers", None),
                    "device": ("--device", "auto"), "precision": ("--precision", "auto"),
                    "checkpoint_every": ("--checkpoint-every", 50), "progress": ("--no-progress", True),
                    "weights_dir": ("--weights-dir", None)}
#: The extraction flags of a net, which the raw-pixel baseline (no net, no partial saves) would ignore. --device
#: stays: under torchrun it picks how the processes exchange the pixels.
NET_FLAGS = ("scales", "aggregate", "precision", "checkpoint_every", "weights_dir")


def add_extraction_flags(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    """The flags that say which images are described and how: ``features``' and ``transfer``'s."""
    add_weights(p, repeat="stack several nets' descriptors")
    p.add_argument("--raw-pixels", type=image_side, default=None, metavar="SIDE",
                   help="instead of a net, the pixels of each image's central SIDE x SIDE square (a baseline)")
    p.add_argument("--data", required=data_required, type=input_path, metavar="DIR",
                   help="a VOC root (JPEGImages/, Annotations/, ImageSets/Main/), a root with train/ and test/ "
                        "(or val/) class folders, or a folder of class folders; with --regions a VOC action root "
                        "(ImageSets/Action/)")
    p.add_argument("--regions", choices=REGIONS, default=None,
                   help="VOC action classification (Table 12): one row per person, the whole image's descriptor "
                        "(image) or that stacked with the person box's (image+box)")
    p.add_argument("--scales", type=parse_scales, help="test scales Q in pixels, whatever the net's crop "
                                                       "(default 256,384,512)")
    p.add_argument("--aggregate", choices=AGGREGATES,
                   help="over the scales: stack (concatenate) or average the descriptors (default stack)")
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default 16)")
    add_workers(p)
    add_device(p)
    add_precision(p)
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="batches between saves of the work done to OUT.partial (default 50)")
    add_progress(p)
    p.set_defaults(**dict.fromkeys(EXTRACTION_FLAGS))


def given_extraction_flags(args: argparse.Namespace, names: Sequence[str] = tuple(EXTRACTION_FLAGS)) -> list[str]:
    """The flags among the extraction flags ``names`` (destinations) given on the command line."""
    return [EXTRACTION_FLAGS[name][0] for name in names if getattr(args, name, None) is not None]


def extraction_value(args: argparse.Namespace, name: str) -> Any:
    """An extraction flag's value: as given, else its default."""
    value = getattr(args, name, None)
    return EXTRACTION_FLAGS[name][1] if value is None else value


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The extraction :class:`Settings` of the flags given, the others at their defaults."""
    return Settings.create(**{name: extraction_value(args, name) for name in EXTRACTION_FLAGS if name != "weights_dir"})


def refuse_net_flags_for_raw_pixels(args: argparse.Namespace) -> None:
    """The raw-pixel baseline runs no net: the net's flags given beside ``--raw-pixels`` are a :class:`UserError`."""
    unused = given_extraction_flags(args, NET_FLAGS)
    if args.raw_pixels and unused:
        raise UserError(f"--raw-pixels {args.raw_pixels} describes images without a net; {', '.join(unused)} "
                        f"would have no effect: drop {'it' if len(unused) == 1 else 'them'}")


def features_from_args(args: argparse.Namespace, out: Path | None) -> Features:
    """The descriptors the extraction flags ask for (written to ``out`` when given)."""
    if bool(args.weights) == bool(args.raw_pixels):
        raise UserError("give --weights SOURCE (repeatable) or --raw-pixels SIDE, one of the two")
    if args.regions is not None and args.raw_pixels:
        raise UserError("--regions describes persons with a net's features: give --weights, not --raw-pixels")
    refuse_net_flags_for_raw_pixels(args)
    settings, weights_dir = settings_from_args(args), extraction_value(args, "weights_dir")
    if args.aggregate is not None and len(settings.scales) == 1:
        raise UserError(f"--aggregate {args.aggregate} joins the descriptors of several scales, and --scales gives "
                        f"one ({settings.scales[0]}): drop --aggregate, or give more scales")
    if args.regions is not None:
        return extract_action_features(args.weights, args.data, args.regions, out, settings, weights_dir)
    if args.weights:
        return extract_features(args.weights, args.data, out, settings, weights_dir)
    result = raw_pixel_features(args.data, args.raw_pixels, settings)
    if out is not None and Processes.from_env().main:
        result.save(out)
    return result


def origin(settings: dict[str, Any]) -> str:
    """How descriptors were made, from their settings: ``A-BN FC7, Q=256,384,512 stack`` or ``raw pixels 32x32``."""
    kind = str(settings.get("kind", "features"))
    try:
        if kind == "raw-pixels":
            return f"raw pixels {int(settings['side'])}x{int(settings['side'])}"
        if kind == "vgg":
            nets = " + ".join(str(net["model"]) for net in settings["nets"])
            return f"{nets} FC7, Q={','.join(map(str, settings['scales']))} {settings['aggregate']}"
    except (KeyError, TypeError, ValueError, OverflowError):  # settings of another writer: they only describe
        return f"{kind} (settings incomplete)"
    return kind


def describe(features: Features) -> str:
    """One line: how many images (or persons) and features, made how."""
    rows = "persons" if "regions" in features.settings else "images"
    return (f"{len(features.paths)} {rows} x {features.features.shape[1]} features ({origin(features.settings)}), "
            f"{len(features.skipped)} skipped")


def run_cli(args: argparse.Namespace) -> int:
    """``features``; under ``torchrun`` the processes share the images and the first writes and prints."""
    with sharding.process_group(extraction_value(args, "device")) as procs:
        features = features_from_args(args, args.out)
    if procs.main:
        print(f"{args.out}: {describe(features)}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("features", help="FC7 descriptors of the dense net for linear SVMs (Appendix B)",
                              description=__doc__.split("\n\n")[0])
    add_extraction_flags(p)
    p.add_argument("--out", type=output_file, required=True, metavar="FEATURES.npz",
                   help="the .npz to write (features, labels, paths, splits, classes, settings)")
    p.set_defaults(func=run_cli)
