"""A Table-1-like listing of a configuration: layers, output shapes, parameters and MACs (Table 2).

Multiply-accumulates count the weights' products only (a k x k conv from C to C' channels on an
H x W output costs k*k*C*C'*H*W), as usually quoted: 15.47 G for D at 224x224. When the input is
larger than the training crop the fully-convolutional form of Sec. 3.2 is listed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from verydeep.errors import UserError
from verydeep.nn.model import VGG
from verydeep.options import positive_int, width_multiplier


@dataclass
class Row:
    name: str
    layer: str
    shape: tuple[int, int, int]
    params: int
    macs: int


def summarise(model: VGG, input_size: int | None = None) -> list[Row]:
    """One row per layer with parameters or a change of shape, for an RGB ``input_size`` image."""
    size = model.input_size if input_size is None else input_size
    if size < model.input_size:
        raise UserError(f"--input {size} is smaller than the training crop {model.input_size}")
    dense = size != model.input_size
    c, h, w = 3, size, size
    rows: list[Row] = []
    names = {path: name for name, path in model.tap_names.items()}
    for i, module in enumerate(model.features):
        name = names[f"features.{i}"]
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0]
            c = module.out_channels
            macs = k * k * module.in_channels * c * h * w
            rows.append(Row(name, f"conv{k}-{c}", (c, h, w), parameter_count(module), macs))
        elif isinstance(module, nn.MaxPool2d):
            h, w = h // 2, w // 2
            rows.append(Row(name, "maxpool", (c, h, w), 0, 0))
        elif isinstance(module, nn.LocalResponseNorm):
            rows.append(Row(name, "LRN", (c, h, w), 0, 0))
        elif isinstance(module, nn.BatchNorm2d):
            rows.append(Row(name, "batchnorm", (c, h, w), parameter_count(module), 0))
    kernel = model.grid
    for name, fc in model.fc_layers().items():
        if dense:
            h, w = h - kernel + 1, w - kernel + 1
            layer = f"conv{kernel}-{fc.out_features}"
        else:
            h = w = 1
            layer = f"FC-{fc.out_features}"
        macs = fc.in_features * fc.out_features * h * w
        rows.append(Row(name, layer, (fc.out_features, h, w), parameter_count(fc), macs))
        kernel = 1
    return rows


def parameter_count(module: nn.Module) -> int:
    """The number of parameters (weights and biases) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def render(model: VGG, rows: list[Row], input_size: int) -> str:
    """The rows as a text table with totals, each column as wide as its widest entry (and a space)."""
    form = "dense (FC as conv, Sec. 3.2)" if input_size != model.input_size else "plain"
    params, macs = sum(r.params for r in rows), sum(r.macs for r in rows)
    header = ("layer", "type", "output (CxHxW)", "params", "MACs")
    body = [(r.name, r.layer, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.macs:,}") for r in rows]
    table = [header, *body, ("total", "", "", f"{params:,}", f"{macs:,}")]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
    widths = [max(width, least) for width, least in zip(widths, (9, 13, 17, 13, 15), strict=True)]
    lines = [f"{model.name} width={model.width:g} classes={model.num_classes} input={input_size}x{input_size} {form}"]
    for name, layer, shape, count, cost in table:
        lines.append(f"{name:<{widths[0] + 1}}{layer:<{widths[1] + 1}}{shape:>{widths[2] + 1}}"
                     f"{count:>{widths[3] + 1}}{cost:>{widths[4] + 1}}")
    lines.append(f"= {params / 1e6:.2f} M parameters, {macs / 1e9:.2f} G multiply-accumulates")
    return "\n".join(lines)


#: The largest side summarised: nothing is allocated (the net is built on the meta device), but FC6's
#: 512 x (side/32)^2 x 4096 weights must still be counted in 64 bits.
MAX_COUNTED_SIDE = 65536


def counted_side(text: str) -> int:
    """``type=`` for ``--crop``: a side from 1 to :data:`MAX_COUNTED_SIDE` pixels."""
    side = positive_int(text)
    if side > MAX_COUNTED_SIDE:
        raise argparse.ArgumentTypeError(f"at most {MAX_COUNTED_SIDE} pixels (FC6's weights are counted in 64 "
                                         f"bits); got {side}")
    return side


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("summary", help="list a configuration's layers, shapes, params and MACs")
    p.add_argument("config", help="A, A-LRN, B, C, D, E (or vgg11, vgg11-lrn, vgg13, vgg16-c, vgg16, vgg19)")
    p.add_argument("--input", type=positive_int, default=None,
                   help="image side (default: the crop size; another makes the net dense, Sec. 3.2)")
    p.add_argument("--crop", type=counted_side, default=224, help="training crop size the net is built for")
    p.add_argument("--width", type=width_multiplier, default=1.0, help="width multiplier")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--batch-norm", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    if args.crop % 32:
        raise UserError(f"--crop {args.crop}: a multiple of 32 (five 2x2 poolings)")
    with torch.device("meta"):  # shapes and counts only: no memory for the weights, whatever their number
        model = VGG(args.config, args.num_classes, args.batch_norm, args.width, input_size=args.crop, init="kaiming")
    size = args.crop if args.input is None else args.input
    rows = summarise(model, size)
    if args.json:
        print(json.dumps({
            "config": model.config,
            "batch_norm": model.batch_norm,
            "width": model.width,
            "num_classes": model.num_classes,
            "crop": model.input_size,
            "input": size,
            "dense": size != model.input_size,
            "params": sum(r.params for r in rows),
            "macs": sum(r.macs for r in rows),
            "gmacs": round(sum(r.macs for r in rows) / 1e9, 2),
            "layers": [asdict(r) for r in rows],
        }))
    else:
        print(render(model, rows, size))
