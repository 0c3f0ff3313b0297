"""Export a net for other runtimes: ONNX, TorchScript, or a ``torch.export`` ExportedProgram.

The dense net (Sec. 3.2: FC layers as convolutions) takes images of any size at least the crop
and returns the class score map, unnormalised: its spatial mean is the image's class scores, as
dense evaluation averages them. The plain net takes crops of its training size and returns class
scores. The batch, and the dense net's height and width, are dynamic. ONNX defaults to the dense
net, TorchScript and ExportedProgram to the plain one. A localisation net (Appendix A), whose outputs
are box coordinates rather than class scores, is refused.

The net's input convention (channel order, value scale, mean and std) and its recipe (classes,
class names) go into the file: ONNX ``metadata_props``, the extra files of TorchScript and of the
ExportedProgram archive, under the keys ``verydeep.input``, ``verydeep.output``,
``verydeep.preprocess`` (JSON) and ``verydeep.recipe`` (JSON). After writing, the file is loaded
back (ONNX by onnxruntime) and its outputs compared with PyTorch's on random images; a difference
above :data:`TOLERANCE` of the outputs' scale removes the file and is an error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verydeep.data import to_input
from verydeep.errors import UserError
from verydeep.eval.evaluate import given_weights
from verydeep.io.atomic import atomic_write
from verydeep.io.sources import CLASSIFY, load
from verydeep.nn.fused import run_trunk
from verydeep.nn.model import VGG, DenseVGG
from verydeep.options import add_weights, output_file

FORMATS = ("onnx", "torchscript", "exported-program")
#: The file name suffixes of each format: a file named as another format's is refused (it would mislead).
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript"), "exported-program": (".pt2",)}

#: The largest difference allowed between the exported net's outputs and PyTorch's, relative to the
#: outputs' scale (their largest magnitude, at least 1): float32 keeps about 7 digits of a logit near 2e5.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Exported:
    """A written file: its format, whether it holds the dense net, the largest absolute difference of
    its outputs from PyTorch's and that difference relative to the outputs' scale, and the metadata it
    carries."""

    path: str
    format: str
    dense: bool
    max_abs_difference: float
    relative_difference: float
    metadata: dict[str, str]


def metadata(model: VGG, recipe: dict[str, Any], pre: Any, dense: bool) -> dict[str, str]:
    """What a consumer of the file needs: the input it takes, the output it gives, the convention and
    statistics (``Preprocess.to_dict()``) and the recipe (classes and class names among it)."""
    size = f"H, W >= {model.input_size}" if dense else f"H = W = {model.input_size}"
    convention = (f"channels {pre.channels}: {pre.value_scale:g} * (x - mean) / std for pixel values x on 0..1, "
                  f"mean {list(pre.mean)} and std {list(pre.std)} in RGB order")
    if dense:
        less = f" - {model.grid - 1}" if model.grid > 1 else ""
        output = (f"class score map (N, {model.num_classes}, H//32{less}, W//32{less}) before the softmax; its "
                  "spatial mean is the image's class scores (Sec. 3.2)")
    else:
        output = f"class scores (N, {model.num_classes}) before the softmax"
    return {
        "verydeep.input": f"float32 (N, 3, H, W), {size}, {convention}",
        "verydeep.output": output,
        "verydeep.preprocess": json.dumps(pre.to_dict()),
        "verydeep.recipe": json.dumps(recipe, default=str),
    }


def example_inputs(crop: int, dense: bool, pre: Any) -> list[Tensor]:
    """Random images in the net's convention: the first is traced, all check the file; two batch sizes,
    and for the dense net two image sizes."""

    generator = torch.Generator().manual_seed(0)
    sizes = [(2, crop + 32, crop + 64), (1, crop, crop)] if dense else [(2, crop, crop), (1, crop, crop)]
    return [to_input(torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=generator), pre)
            for n, h, w in sizes]


class ConvolutionForm(nn.Module):
    """The dense net with its FC layers run as the convolutions they are (Sec. 3.2: FC6 a ``grid x grid``
    convolution, FC7 and FC8 1x1), their weights viewed, not copied: the same sums as ``dense``'s windows, in
    operators that ``torch.export`` keeps dynamic (the unfolded windows fix the score map's side to differ
    from 1 when the crop is 64 pixels or more)."""

    def __init__(self, dense: DenseVGG) -> None:
        super().__init__()
        self.features, self.classifier, self.grid = dense.features, dense.classifier, dense.grid

    def forward(self, x: Tensor) -> Tensor:
        x, side = run_trunk(self.features, x), self.grid
        for layer in self.classifier:
            if isinstance(layer, nn.Linear):
                x = F.conv2d(x, layer.weight.view(layer.out_features, -1, side, side), layer.bias)
                side = 1
            else:
                x = layer(x)  # ReLU, dropout (off in eval): elementwise, on a map as on vectors
        return x


def dynamic_shapes(crop: int, dense: bool) -> dict[str, dict[int, Any]]:
    """The batch is dynamic; for the dense net, height and width too, from the crop up."""
    from torch.export import Dim

    dims = {0: Dim("batch")}
    if dense:
        dims |= {2: Dim("height", min=crop), 3: Dim("width", min=crop)}
    return {"x": dims}


def require_onnx() -> None:
    """ONNX export needs onnx and onnxscript (torch.onnx), and onnxruntime for the check."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}: pip install 'verydeep[export]'")


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """TorchScript is deprecated in favour of torch.export, and the tracer warns of the nets' input size
    checks, which a trace records as constants; neither concerns the user of ``--format torchscript``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def write_onnx(module: nn.Module, example: Tensor, shapes: dict[str, Any], meta: dict[str, str], out: Path) -> None:
    """ONNX by torch.onnx's dynamo exporter, the weights inside the file, ``meta`` as ``metadata_props``."""
    program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=shapes, input_names=["image"],
                                output_names=["scores"], external_data=False, verbose=False)
    program.model.metadata_props.update(meta)
    atomic_write(out, lambda tmp: program.save(tmp, external_data=False))


def write_torchscript(module: nn.Module, example: Tensor, meta: dict[str, str], out: Path) -> None:
    """TorchScript by tracing (convolutions and pooling trace for any batch and image size), ``meta`` as
    extra files."""
    with quiet_torchscript():
        traced = torch.jit.trace(module, example)
        atomic_write(out, lambda tmp: torch.jit.save(traced, tmp, _extra_files=meta))


def write_exported_program(module: nn.Module, example: Tensor, shapes: dict[str, Any], meta: dict[str, str],
                           out: Path) -> None:
    """An ExportedProgram saved by ``torch.export.save``, ``meta`` as extra files of the archive."""
    # a dynamic size may then be 1 (a 1x1 score map, a batch of one) without being fixed to 1, as torch.onnx does
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(module, (example,), dynamic_shapes=shapes)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: the archive need not be named *.pt2
            torch.export.save(program, f, extra_files=meta)

    atomic_write(out, save)


def reload(path: Path, fmt: str) -> Callable[[Tensor], Tensor]:
    """The written file, loaded back as a function of a batch of inputs."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    if fmt == "torchscript":
        with quiet_torchscript():
            return torch.jit.load(path, map_location="cpu")
    with open(path, "rb") as f:
        return torch.export.load(f).module()


@torch.no_grad()
def max_difference(module: nn.Module, exported: Callable[[Tensor], Tensor],
                   inputs: list[Tensor]) -> tuple[float, float]:
    """The largest absolute difference between the two nets' outputs over ``inputs``, and the outputs'
    scale: PyTorch's largest magnitude, at least 1."""
    differences, scales = [], [1.0]
    for x in inputs:
        reference = module(x)
        differences.append(float((exported(x) - reference).abs().max()))
        scales.append(float(reference.abs().max()))
    return max(differences), max(scales)


def export_net(source: str | Path, out: str | Path, fmt: str, dense: bool | None = None,
               weights_dir: str | Path | None = None) -> Exported:
    """Write the net of ``source`` (weights as :func:`verydeep.load` reads them) to ``out``
    in ``fmt``, the dense net by default for ONNX and the plain one otherwise, and check it against PyTorch."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    out = Path(out)
    named = next((other for other, suffixes in SUFFIXES.items() if out.suffix.lower() in suffixes), fmt)
    if named != fmt:
        raise UserError(f"{out}: {out.suffix} names {named} files, not --format {fmt}; name it "
                        f"{out.stem}{SUFFIXES[fmt][0]}")
    if fmt == "onnx":
        require_onnx()
    dense = fmt == "onnx" if dense is None else dense
    loaded = load(source, weights_dir, purpose=CLASSIFY)
    model, recipe, pre = loaded.model, loaded.recipe, loaded.preprocess
    # the weights as loaded are channels_last (fast on CPUs), whose strides a size of 1 makes ambiguous: an
    # exported program would then require a batch of two or more
    module = (model.dense() if dense else model).eval().to(memory_format=torch.contiguous_format)
    inputs = example_inputs(model.input_size, dense, pre)
    meta = metadata(model, recipe, pre, dense)
    if fmt == "onnx":
        write_onnx(module, inputs[0], dynamic_shapes(model.input_size, dense), meta, out)
    elif fmt == "torchscript":
        write_torchscript(module, inputs[0], meta, out)
    else:
        write_exported_program(ConvolutionForm(module) if dense else module, inputs[0],
                               dynamic_shapes(model.input_size, dense), meta, out)
    difference, scale = max_difference(module, reload(out, fmt), inputs)
    if not difference <= TOLERANCE * scale:
        out.unlink()
        raise UserError(f"{out}: the exported net's outputs differ from PyTorch's by {difference:.2e}, more than "
                        f"{TOLERANCE:g} of their scale {scale:.3g}; the file is removed")
    return Exported(str(out), fmt, dense, difference, difference / scale, meta)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a net as ONNX (the dense net's class score map), TorchScript "
                                             "or a torch.export ExportedProgram, checked against PyTorch")
    add_weights(p)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (run by onnxruntime to check it), torchscript (traced) or exported-program "
                        "(torch.export.save)")
    p.add_argument("out", type=output_file, metavar="OUT", help="the file to write (replaced if it exists)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--dense", dest="dense", action="store_true",
                      help="the fully-convolutional net (Sec. 3.2): images of any size in, class score map out "
                           "(the default for onnx)")
    form.add_argument("--plain", dest="dense", action="store_false",
                      help="the net as trained: crops in, class scores out (the default for torchscript and "
                           "exported-program)")
    p.set_defaults(dense=None, func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    result = export_net(given_weights(args), args.out, args.format, args.dense, args.weights_dir)
    net = "dense" if result.dense else "plain"
    print(f"{result.path}: {result.format}, the {net} net; largest difference from PyTorch "
          f"{result.max_abs_difference:.2e}, {result.relative_difference:.2e} of the outputs' scale (at most "
          f"{TOLERANCE:g})")
    print(f"  input: {result.metadata['verydeep.input']}")
    print(f"  output: {result.metadata['verydeep.output']}")
