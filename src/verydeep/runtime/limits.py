"""Bounds on the sizes and counts a user gives, each declared once, each refused in one line that says
the limit and why, before any work starts: a test scale or image side so large that the memory cannot
hold the image's activations, more loader processes than the CPU cores they would contend for.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from verydeep.errors import UserError

#: The most pixels a square image rescaled for a test may have: the paper tests at Q = 256 to 512
#: (0.07 to 0.26 M pixels); at 4.2 M pixels a full-width net's first conv layer alone takes 1 GB per
#: image in float32, and larger sides end in memory allocation errors.
MAX_TEST_PIXELS = 2048 * 2048
#: The largest test scale Q or image side, in pixels: that of a square image of MAX_TEST_PIXELS.
MAX_SIDE = math.isqrt(MAX_TEST_PIXELS)


def is_whole(value: Any) -> bool:
    """Whether ``value``, as read from JSON or TOML, is a whole number (an int; True and False are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """Whether ``value``, as read from JSON or TOML, is a finite number (True and False are not numbers)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range (JSON holds any number of digits)
        return False


def whole_number(value: Any) -> int:
    """An int, or a string of ASCII digits (signed: the callers check the range), as an int; anything else
    (2.5, inf, "1_0", True) a ValueError: a number of pixels or epochs is never rounded or truncated into one."""
    if is_whole(value):
        return int(value)
    digits = value.strip().removeprefix("-") if isinstance(value, str) else ""
    if digits.isascii() and digits.isdigit():
        return int(value)
    raise ValueError(f"not a whole number: {value!r}")


def check_side(side: int, what: str = "a test scale Q") -> int:
    """``side`` when it is a whole number of pixels from 1 to :data:`MAX_SIDE`, else a :class:`UserError`
    naming ``what`` (an option, or the quantity) and the bound."""
    if not 1 <= side <= MAX_SIDE:
        raise UserError(f"{what} must be from 1 to {MAX_SIDE} pixels (a square image of that side is "
                        f"{MAX_TEST_PIXELS / 1e6:.1f} M pixels, whose first conv layer alone takes 1 GB in float32; "
                        f"the paper tests at 256 to 512); got {side}")
    return side


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def max_workers() -> int:
    """The most data-loading processes worth starting: one per usable core."""
    return usable_cores()


def check_workers(workers: int, what: str = "data-loading processes") -> int:
    """``workers`` when it is from 0 to :func:`max_workers`, else a :class:`UserError` naming ``what``."""
    if not 0 <= workers <= max_workers():
        raise UserError(f"{what} must be from 0 to {max_workers()}, the CPU cores this process may use (more "
                        f"only contend for them); got {workers}")
    return workers


#: The largest width multiplier: at 4 a VGG-16 has 16 times the paper's 138 M weights (2.2 G, 8.8 GB in
#: float32 before gradients and momentum), and larger ones end in memory allocation errors.
MAX_WIDTH = 4.0


def check_width(width: float, what: str = "--width") -> float:
    """``width`` when it is a finite multiplier above 0 and at most :data:`MAX_WIDTH`, else a :class:`UserError`."""
    if not 0 < width <= MAX_WIDTH:
        raise UserError(f"{what} must be above 0 and at most {MAX_WIDTH:g} (at {MAX_WIDTH:g} VGG-16 has 2.2 G "
                        f"weights, 8.8 GB in float32); got {width}")
    return width
