"""The centre prior (Appendix A's baseline): the training boxes relative to their image, their mean,
and that mean box placed in each image's frame."""

from __future__ import annotations

import torch
from torch import Tensor

from verydeep.data.datasets import LabelledImages
from verydeep.errors import UserError


def relative_boxes(images: LabelledImages) -> Tensor:
    """The first box of each :func:`~verydeep.data.boxes.with_boxes` image (N, 4), in units of its
    width and height (from the headers alone)."""
    boxes = images.transform.boxes
    sizes = images.image_sizes()
    relative = [torch.tensor(boxes[str(path)][0].corners) / torch.tensor([*size, *size])
                for (path, _), size in zip(images.samples, sizes, strict=True) if size is not None]
    if not relative:
        raise UserError("no readable training image with a box")
    return torch.stack(relative).float()


def mean_relative_box(images: LabelledImages) -> Tensor:
    """The mean first box of the images (the centre prior), in units of each image's width and height."""
    return relative_boxes(images).mean(dim=0)


def in_frames(relative: Tensor, frames: Tensor) -> Tensor:
    """A box relative to the image (units of its width and height) in each of ``frames`` (N, 4)."""
    origin, extent = frames[:, :2].repeat(1, 2), (frames[:, 2:] - frames[:, :2]).repeat(1, 2)
    return origin + relative[None] * extent
