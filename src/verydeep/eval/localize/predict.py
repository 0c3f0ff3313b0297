"""``localize predict`` (Appendix A, protocol 2): each image's top (class, box) guesses, drawn on it
and printed as JSON lines."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from verydeep.data.datasets import DECODE_ERRORS, unreadable
from verydeep.data.decode import ImageFile, decode, open_image
from verydeep.errors import MissingFileError, UserError
from verydeep.eval.localize.dense_nets import DenseNets, Guess
from verydeep.eval.localize.task import smallest_training_scale
from verydeep.io.atomic import atomic_write
from verydeep.io.outputs import DRAWN_BY, refuse_writing_in_datasets_of
from verydeep.runtime.processes import loader_workers


def readable_image(path: str | Path) -> None:
    """An image file that decodes whole; otherwise a :class:`UserError` naming it."""
    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no such image")
    try:
        ImageFile(path).pillow().load()
    except DECODE_ERRORS as error:
        raise UserError(unreadable(path, error)) from None


def draw(path: str | Path, guesses: Sequence[Guess], names: Sequence[str], out: Path) -> Path:
    """``path`` with each guess's box and class name drawn on it, as ``out/<stem>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open_image(path) as opened:
        image = decode(opened)  # upright, as the boxes were found: an EXIF orientation applied
        image.load()  # before the file closes (an upright RGB file is the opened image itself)
    fig, ax = plt.subplots(figsize=(6, 6 * image.height / image.width))
    ax.imshow(image, extent=(0, image.width, image.height, 0))  # pixel i covers [i, i + 1), as in the boxes
    for rank, guess in enumerate(guesses):
        x0, y0, x1, y1 = guess.box.tolist()
        colour = plt.cm.tab10(rank)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, linewidth=3 - rank * 0.4))
        ax.text(x0, y0, f"{rank + 1}. {names[guess.label]} {guess.score:.2f}", color="white", fontsize=8,
                backgroundcolor=colour, va="bottom")
    ax.axis("off")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{Path(path).stem}.png"
    atomic_write(target, lambda tmp: fig.savefig(tmp, bbox_inches="tight", dpi=100, format="png",
                                                    metadata={"Software": f"{DRAWN_BY} localize predict"}))
    plt.close(fig)
    return target


def refuse_drawing_among_inputs(images: Sequence[str], out: Path) -> None:
    """``--out`` is the folder of no input image, and in no split of a dataset holding one: the drawings
    would lie among the images, or be read as a dataset's images. Else a :class:`UserError`."""
    for image in map(Path, images):
        if out.resolve() in (image.parent.resolve(), image.resolve().parent):  # the link's folder, or its file's
            raise UserError(f"{out}: --out is the folder of the input image {image}, where the drawings would lie "
                            "among the images; give another --out")
    refuse_writing_in_datasets_of(images, [out], "--out")


def drawing_targets(args: argparse.Namespace) -> dict[Path, str]:
    """Each image's drawing, ``OUT/<stem>.png``. ``--out`` among the images (:func:`refuse_drawing_among_inputs`),
    two images drawn as one file, or a drawing over an input image are a :class:`UserError`. (``--out`` a run
    directory read, or its ``checkpoints/``, the command line refuses as any output folder's.)"""
    refuse_drawing_among_inputs(args.images, Path(args.out))
    drawn_at: dict[Path, str] = {}
    for image in args.images:
        target = Path(args.out) / f"{Path(image).stem}.png"
        if target in drawn_at:
            raise UserError(f"{image} and {drawn_at[target]} would both be drawn as {target}: give images of "
                            "different names, or predict them into different --out folders")
        if target.exists() and any(target.samefile(given) for given in args.images if Path(given).exists()):
            raise UserError(f"{target}: the drawing would overwrite the input image; give another --out")
        drawn_at[target] = image
    return drawn_at


def run_predict(args: argparse.Namespace) -> None:
    """``localize predict``: protocol 2's top (class, box) predictions of each image (the union of the nets'
    boxes), drawn, and one JSON line each."""
    for image in drawing_targets(args).values():
        readable_image(image)
    nets = DenseNets.load(args.checkpoint, args.classifier, args.device)
    recipe = nets.recipes[0]
    names = nets.class_names
    scales = args.scales or [smallest_training_scale(recipe)]
    nets.check_scales(scales)
    workers = loader_workers(args.workers)
    for image in args.images:
        guesses = nets.guesses(image, scales, args.top, workers)
        drawn = draw(image, guesses, names, args.out)
        print(json.dumps({"image": str(image), "drawn": str(drawn), "predictions": [
            {"class": names[g.label], "box": [round(v, 1) for v in g.box.tolist()], "score": g.score}
            for g in guesses]}))
