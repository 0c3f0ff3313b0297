"""verydeep: Simonyan & Zisserman's VGG paper (ICLR 2015), the whole system, on PyTorch."""

from verydeep.io.sources import LoadedNet, load
from verydeep.nn.configs import ALIASES, TABLE_1
from verydeep.nn.init import initialise, warm_start
from verydeep.nn.model import VGG, DenseVGG, vgg

__all__ = ["ALIASES", "TABLE_1", "VGG", "DenseVGG", "LoadedNet", "initialise", "load", "vgg", "warm_start"]
__version__ = "0.1.0"
