"""Evaluation (Sec. 3.2, 4): dense, multi-crop, multi-scale, combined and fused, as Tables 3 to 6.

Each net's softmax posteriors are computed once per (protocol, test scale Q) and every reported
row is derived from those arrays by averaging, as the paper does:

- dense (Sec. 3.2): the fully-convolutional net on the whole image rescaled to Q; the class score
  map is averaged spatially, softmax taken, and the horizontally flipped image's posterior
  averaged in;
- multi-crop: a regular 5x5 grid of crops (corners included) and their mirror images, 50 per
  scale, the plain net on each, posteriors averaged;
- multi-scale: posteriors averaged over Q (Table 4); combination: the dense and multi-crop
  posteriors averaged (Table 5); fusion: the posteriors of several nets averaged (Table 6);
- centre crop: the usual single crop (resize 256, crop 224, scaled by crop/224 for small nets),
  not flipped, to compare with published torchvision figures.

Errors are fractions, top-k as :mod:`verydeep.eval.metrics` counts them (a tie shared: the chance that a random
order of the tied classes puts the true one in the top k).
The result is an :class:`~verydeep.eval.rows.EvalResult`; :mod:`verydeep.paper.report` renders it as the
paper's tables. This module runs the whole evaluation and the ``eval`` command: the nets come from
:mod:`verydeep.eval.nets`, their posteriors from :mod:`verydeep.eval.sweep`, the rows and the result
from :mod:`verydeep.eval.rows`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verydeep.data import balanced_subset, find_split, gpu, open_split
from verydeep.errors import UserError
from verydeep.eval.classmap import ClassMap, class_map
from verydeep.eval.metrics import per_class_accuracy
from verydeep.eval.nets import Net, load_nets
from verydeep.eval.posteriors_file import posteriors_writer
from verydeep.eval.rows import PROTOCOL_LABELS, EvalResult, Posteriors, Timing, main_row, score_rows
from verydeep.eval.sweep import PosteriorArrays, SweepSettings, compute_posteriors, plan_passes
from verydeep.io.atomic import atomic_write_all
from verydeep.options import (
    add_device,
    add_precision,
    add_progress,
    add_weights,
    add_workers,
    input_path,
    listed,
    output_dir,
    parse_scales,
    positive_int,
    refuse_repeated,
    whole,
    whole_scales,
)
from verydeep.paper import report
from verydeep.runtime import sharding
from verydeep.runtime.device import pick_device
from verydeep.runtime.memory import keep_freed_memory
from verydeep.runtime.precision import autocast_dtype, precision_name
from verydeep.runtime.processes import loader_workers

#: Protocols a user can ask for; ``dense+multicrop`` is the combination of Table 5.
PROTOCOLS = ("dense", "multicrop", "dense+multicrop", "center")
DEFAULT_PROTOCOLS = ("dense", "multicrop", "dense+multicrop")

#: Images of one size at Q that go through the net together (``--batch-size``'s default, predict's too).
BATCH_SIZE = 32


# ---- the whole evaluation -----------------------------------------------------------------


def check_options(protocols: Sequence[str], scales: Sequence[int] | None, flip: bool, batch_size: int,
                  workers: int | None, limit: int | None = None) -> list[str]:
    """The protocols asked for, each once; a bad option, or one no protocol asked for uses, is a
    :class:`UserError` naming it."""
    protocols = list(dict.fromkeys(protocols))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise UserError(f"--protocol {','.join(unknown) or '(none)'}: choose from {', '.join(PROTOCOLS)}")
    unused = [flag for flag, given in (("--scales", scales is not None), ("--no-flip", not flip)) if given]
    if protocols == ["center"] and unused:
        raise UserError(f"--protocol center is one unflipped centre crop of the image resized to crop x 256/224 "
                        f"(torchvision's figure), so {' and '.join(unused)} would be ignored")
    if limit is not None:
        whole(limit, "--limit")
    if whole(batch_size, "--batch-size") < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}")
    if scales is not None and any(q <= 0 for q in scales):
        raise UserError(f"--scales must be positive; got {list(scales)}")
    if workers is not None and whole(workers, "--workers") < 0:
        raise UserError(f"--workers must be 0 or more; got {workers}")
    return protocols


def readable_images(nets: Sequence[Net], posteriors: PosteriorArrays, paths: Sequence[str], skipped: set[str],
                    split: Path) -> Tensor:
    """The mask of the images that were read. None read, or a net whose outputs on them are not finite
    (NaN or inf), is a :class:`UserError`; the latter names the net's checkpoint."""
    valid = torch.tensor([path not in skipped for path in paths], dtype=torch.bool)
    if not valid.any():
        raise UserError(f"{split}: no image could be read")
    for (i, kind, q), post in posteriors.items():
        bad = int((~post[valid].isfinite().all(dim=1)).sum())
        if bad:
            raise UserError(f"{nets[i].checkpoint}: the net's outputs are not finite (NaN or inf) on {bad} of "
                            f"{int(valid.sum())} images ({PROTOCOL_LABELS[kind]}, Q={q})")
    return valid


def open_labelled(split: Path, nets: Sequence[Net], limit: int | None, over_data_classes: bool) -> tuple[Any, ClassMap]:
    """The split's labelled images (a class-balanced subset of ``limit``) and where its classes sit among
    the nets' outputs."""

    dataset = open_split(split, lambda path: None)
    mapping = class_map(nets, dataset.classes, dataset.class_names, over_data_classes)
    dataset.samples = [dataset.samples[i] for i in balanced_subset(dataset.targets, limit)]
    return dataset, mapping


def evaluate(
    sources: Sequence[str | Path],
    data: str | Path,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    scales: Sequence[int] | None = None,
    flip: bool = True,
    batch_size: int = BATCH_SIZE,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    keep_posteriors: bool = False,
    decode: str = "auto",
    weights_dir: str | Path | None = None,
    over_data_classes: bool = False,
    compile: bool = False,
) -> EvalResult:
    """Evaluate nets (``sources``, as :func:`verydeep.load` reads them) on a labelled split of ``data``
    with the protocols of Sec. 3.2, each net at its own crop, convention and test scales (``scales``,
    else :func:`~verydeep.eval.nets.net_scales`), several nets also fused; ``limit``: a class-balanced
    subset; ``decode``: where JPEGs are decoded; nets of more classes than the data's scored over their
    softmax, or the data's classes with ``over_data_classes`` (:mod:`verydeep.eval.classmap`); ``compile``: the
    nets run through ``torch.compile``."""

    sources, scales = listed(sources, "sources"), whole_scales(scales)
    protocols = check_options(listed(protocols, "protocols"), scales, flip, batch_size, workers, limit)
    started = time.perf_counter()
    split = find_split(data, "val")
    torch_device = pick_device(device)
    if torch_device.type == "cpu":
        keep_freed_memory()  # no fresh pages for every batch's activations
    dtype = sharding.agreed(autocast_dtype(torch_device, precision))  # measured: the first process's
    nets = load_nets(sources, scales, split, torch_device, weights_dir, dtype, compile)
    dataset, mapping = open_labelled(split, nets, limit, over_data_classes)
    settings = SweepSettings(torch_device, dtype, flip, batch_size, loader_workers(workers),
                             progress, gpu.resolve_decode(decode, torch_device))
    posteriors, skipped, timings = compute_posteriors(nets, dataset, plan_passes(nets, protocols), settings)
    posteriors = {key: mapping.posteriors(post, key[0]) for key, post in posteriors.items()}
    paths = [str(path) for path, _ in dataset.samples]
    valid = readable_images(nets, posteriors, paths, skipped, split)
    targets = mapping.targets(torch.tensor(dataset.targets, dtype=torch.long))
    rows, row_posteriors = score_rows(nets, posteriors, protocols, targets, valid,
                                      as_paper=flip and not mapping.over_data_classes)
    main, classes = main_row(rows, protocols), list(dataset.classes)
    scored = per_class_accuracy(row_posteriors[main.name], targets[valid], mapping.scored_classes)
    accuracy = [scored[i] for i in mapping.targets(torch.arange(len(classes))).tolist()]
    seconds = time.perf_counter() - started
    return EvalResult(
        data=str(split), images=int(valid.sum()), skipped=sorted(skipped), classes=classes,
        class_names=list(dataset.class_names), nets=[net.describe() for net in nets], protocols=protocols,
        flip=flip, device=str(torch_device), precision=precision_name(dtype),
        imagenet_sized=all(net.imagenet_sized for net in nets), scored=mapping.describe(), rows=rows, main=main.name,
        per_class_accuracy=dict(zip(classes, accuracy, strict=True)),
        timing=Timing(round(seconds, 3), round(seconds / int(valid.sum()), 6), timings),
        posteriors=Posteriors({f"net{i}_{kind}_Q{q}": post.numpy() for (i, kind, q), post in posteriors.items()},
                              targets.numpy(), paths, valid.numpy(),
                              {name: p.numpy() for name, p in row_posteriors.items()})
        if keep_posteriors else None,
    )


def write_outputs(result: EvalResult, out_dir: str | Path, rows: bool = False) -> Path:
    """``results.json``, ``results.md`` (the four tables and every row) and ``posteriors.npz`` in ``out_dir``.

    The npz (:mod:`verydeep.eval.posteriors_file`) holds float32 posteriors per net, kind and Q
    (``net0_dense_Q256`` ...), ``targets``, ``paths`` and the ``readable`` mask, from which every row can
    be recomputed; with ``rows``, each row's own posteriors too, in float32.
    """
    out = Path(out_dir)
    # one set: a write that fails leaves the previous run's three files, not a mix of two runs'
    writes = {out / "results.json": lambda tmp: Path(tmp).write_text(json.dumps(result.to_dict(), indent=2) + "\n"),
              out / "results.md": lambda tmp: Path(tmp).write_text(report.eval_document(result),
                                                                   errors="surrogateescape")}  # paths as they are
    if result.posteriors is not None:
        writes[out / "posteriors.npz"] = posteriors_writer(result.posteriors, rows=rows)
    atomic_write_all(writes)
    return out


# ---- command line -------------------------------------------------------------------------


def parse_protocols(text: str) -> list[str]:
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise argparse.ArgumentTypeError(f"unknown protocol {','.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(PROTOCOLS)} (comma-separated)")
    refuse_repeated(protocols, text, "a protocol", "each is one row of the table")
    return protocols


def given_weights(args: argparse.Namespace) -> Any:
    """``args.weights``; a :class:`UserError` when neither --weights nor --checkpoint was given."""
    if not args.weights:
        raise UserError("give --weights SOURCE (or --checkpoint)")
    return args.weights


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate nets: dense, multi-crop, multi-scale, fusion (Sec. 3.2)")
    add_weights(p, repeat="fuse several nets (Table 6)")
    p.add_argument("--data", required=True, type=input_path,
                   help="dataset root (holding val/ or test/) or a split folder")
    p.add_argument("--protocol", type=parse_protocols, default=list(DEFAULT_PROTOCOLS),
                   help=f"comma-separated, from {', '.join(PROTOCOLS)} (default: dense,multicrop,dense+multicrop)")
    p.add_argument("--scales", type=parse_scales, default=None,
                   help="test scales Q, e.g. 256,384,512 (default: from each net's training scale, else "
                        "256,384,512 scaled by crop/224)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not average in mirrored images")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                   help=f"images per batch (default {BATCH_SIZE})")
    add_workers(p)
    add_device(p)
    add_precision(p)
    p.add_argument("--decode", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where JPEGs are decoded: auto (the GPU when evaluating on CUDA), cpu, gpu")
    p.add_argument("--compile", action="store_true",
                   help="run the nets through torch.compile: faster on a GPU once compiled (each net's first batch of "
                        "crops and its first two sizes of whole image compile); scores equal up to rounding")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate at most N images (a class-balanced, deterministic subset)")
    p.add_argument("--out", type=output_dir, default=None,
                   help="write results.json, results.md and posteriors.npz in this folder")
    p.add_argument("--over-data-classes", action="store_true",
                   help="a net of more classes than the data's (ImageNet's 1000 on Imagenette): count errors over the "
                        "data's classes only, not the net's full softmax")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object, last")
    add_progress(p)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    """``eval``; under ``torchrun`` the processes share the images and the first writes and prints."""
    with sharding.process_group(args.device) as procs:
        result = evaluate(
            given_weights(args), args.data, protocols=args.protocol, scales=args.scales, flip=args.flip,
            batch_size=args.batch_size, device=args.device, precision=args.precision, workers=args.workers,
            limit=args.limit, progress=args.progress, keep_posteriors=args.out is not None, decode=args.decode,
            weights_dir=args.weights_dir, over_data_classes=args.over_data_classes, compile=args.compile,
        )
    if not procs.main:
        return
    if args.out:
        write_outputs(result, args.out)
    print(report.eval_markdown(result))
    print(f"\n{result.images} images, {len(result.skipped)} skipped, {result.timing.seconds:.1f} s "
          f"on {result.device} ({result.precision}); errors {result.scored}")
    if args.json:
        print(json.dumps(result.to_dict()))
