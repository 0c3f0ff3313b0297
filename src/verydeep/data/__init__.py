"""Data: ImageNet-style datasets and the paper's training and test transforms (Sec. 3.1, 3.2).

Images stay uint8 from decoding to the batch; :func:`to_input` turns a batch into the
network's float input on the training device (PCA colour shift, mean subtraction). Reading
files is :mod:`verydeep.data.decode`'s; decoding on the device, :mod:`verydeep.data.gpu`'s.
"""

from verydeep.data.batches import Batch, SizeGroupedBatchSampler, collate
from verydeep.data.datasets import BadImageError, ImageFolder, LabelledImages, find_split
from verydeep.data.ilsvrc_val import ILSVRCValFolder
from verydeep.data.preprocess import IMAGENET, Preprocess, load_preprocess, pca_shift, save_preprocess, to_input
from verydeep.data.splits import balanced_subset, carve_validation, open_split
from verydeep.data.stats import add_cli, compute_stats
from verydeep.data.transforms import (
    CenterCropTransform,
    CropPlan,
    RescaleTransform,
    TrainTransform,
    crop_box,
    grid_crops,
    plan_crop,
    resized_size,
    sample_scale,
)

__all__ = [
    "IMAGENET",
    "BadImageError",
    "Batch",
    "CenterCropTransform",
    "CropPlan",
    "balanced_subset",
    "carve_validation",
    "ILSVRCValFolder",
    "ImageFolder",
    "LabelledImages",
    "Preprocess",
    "RescaleTransform",
    "SizeGroupedBatchSampler",
    "TrainTransform",
    "add_cli",
    "collate",
    "compute_stats",
    "crop_box",
    "find_split",
    "grid_crops",
    "load_preprocess",
    "open_split",
    "pca_shift",
    "plan_crop",
    "resized_size",
    "sample_scale",
    "save_preprocess",
    "to_input",
]
