"""What one ``verydeep bench`` run measures: its settings, the defaults that fit each kind of device and
the test scales Q of its crop (Sec. 3.2)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verydeep.options import positive_int, width_multiplier

#: torchvision's builder of each configuration it has.
TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
#: Settings that fit each kind of device: a few minutes on 2 CPU cores, the paper's size on a GPU.
DEFAULTS = {"cpu": {"width": 0.5, "size": 128, "batch": 16, "steps": 5, "gemm": 2048},
            "cuda": {"width": 1.0, "size": 224, "batch": 64, "steps": 5, "gemm": 8192}}
#: Training steps before any timing (allocator, kernels, loader workers).
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Settings:
    """What one bench run measures (``steps`` timed per contender and round; ``gemm``: the matrix side)."""

    config: str
    size: int
    width: float
    batch: int
    rounds: int
    steps: int
    device: str
    gemm: int
    data: Path | None = None
    workers: int | None = None
    compile: bool = False
    compiled_peer: bool = True


def add_net_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = DEFAULTS["cpu"]) -> None:
    """``--config``, ``--width``, ``--size`` and ``--batch`` of ``verydeep bench`` and the benchmark scripts;
    ``defaults`` the bench's on a CPU, or None (the bench's own: they depend on the device)."""
    def shown(key: str) -> str:
        return f" (default {defaults[key]})" if defaults else ""

    parser.add_argument("--config", default="D", help="configuration of Table 1 (torchvision's: A, B, D, E)")
    parser.add_argument("--width", type=width_multiplier, default=defaults and defaults["width"],
                        help="width multiplier" + shown("width"))
    parser.add_argument("--size", type=positive_int, default=defaults and defaults["size"],
                        help="input side, a multiple of 32" + shown("size"))
    parser.add_argument("--batch", type=positive_int, default=defaults and defaults["batch"],
                        help="images per step" + shown("batch"))
