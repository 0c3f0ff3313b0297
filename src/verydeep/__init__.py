"""verydeep: Simonyan & Zisserman's VGG paper (ICLR 2015), the whole system, on PyTorch."""

from typing import Any

from verydeep.nn.configs import ALIASES, TABLE_1
from verydeep.nn.init import initialise, warm_start
from verydeep.nn.model import VGG, DenseVGG, vgg

__all__ = ["ALIASES", "TABLE_1", "VGG", "DenseVGG", "LoadedNet", "initialise", "load", "vgg", "warm_start"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``load`` and ``LoadedNet`` (:mod:`verydeep.io.sources`), imported when first used: the loader's
    file readers import the command line's helpers, which ``python -m verydeep.cli`` must run first."""
    if name in ("load", "LoadedNet"):
        from verydeep.io import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'verydeep' has no attribute {name!r}")
