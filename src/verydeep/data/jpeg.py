"""Decode only the part of a JPEG that a crop needs (libjpeg-turbo's TurboJPEG 3 API).

The training crop of Sec. 3.1 covers (224/256)^2 = 77% of an image rescaled to S = 256, and
less under scale jittering. libjpeg-turbo can skip the rows below the crop and the inverse DCT,
upsampling and colour conversion of the columns beside it (``tj3SetCroppingRegion``), and scale
by 1/2, 1/4 or 1/8 in the DCT (``tj3SetScalingFactor``), in one call. Neither Pillow nor
simplejpeg exposes the crop, so this module binds the few TurboJPEG 3 functions it needs through
ctypes. They report errors as return codes (the library catches libjpeg's own errors), so a
broken file costs a ``None``, never the process.

The library is the copy bundled by the ``turbojpeg`` wheel (libjpeg-turbo 3; verydeep's ``turbo``
extra), else a system ``libturbojpeg`` of version 3 or later; without either,
:func:`decode_region` answers ``None`` and the caller decodes the whole image.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata

import torch
from torch import Tensor

Size = tuple[int, int]  # (width, height), Pillow's order
Box = tuple[int, int, int, int]  # (left, top, right, bottom)

_INIT_DECOMPRESS = 1  # TJINIT_DECOMPRESS
_PARAM_STOP_ON_WARNING, _PARAM_SUBSAMP, _PARAM_WIDTH, _PARAM_HEIGHT = 0, 4, 5, 6  # TJPARAM_*
_PIXEL_RGB = 0  # TJPF_RGB
#: iMCU width in pixels for each TJSAMP (444, 422, 420, GRAY, 440, 411, 441); a crop's left edge
#: must fall on one.
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _ScalingFactor(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


def decoded_size(size: Size, k: int) -> Size:
    """Size of a 1/``k`` DCT-scaled decode (partial blocks round up)."""
    return -(-size[0] // k), -(-size[1] // k)


def _library_paths() -> list[str]:
    """Where libturbojpeg may be: the ``turbojpeg`` wheel's bundled copy, then the system's."""
    try:
        files = importlib.metadata.files("turbojpeg") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    paths = [str(f.locate()) for f in files
             if f.name.startswith("libturbojpeg") or (f.name.startswith("turbojpeg-") and f.name.endswith(".dll"))]
    system = ctypes.util.find_library("turbojpeg")
    return paths + ([system] if system else [])


@functools.cache
def library() -> ctypes.CDLL | None:
    """libturbojpeg with the TurboJPEG 3 functions declared; ``None`` if none is installed."""
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if not hasattr(lib, "tj3SetCroppingRegion"):  # libjpeg-turbo 2 or older
            continue
        handle, size = ctypes.c_void_p, ctypes.c_size_t
        lib.tj3Init.argtypes, lib.tj3Init.restype = [ctypes.c_int], handle
        lib.tj3Destroy.argtypes, lib.tj3Destroy.restype = [handle], None
        lib.tj3Set.argtypes = [handle, ctypes.c_int, ctypes.c_int]
        lib.tj3Get.argtypes = [handle, ctypes.c_int]
        lib.tj3DecompressHeader.argtypes = [handle, ctypes.c_char_p, size]
        lib.tj3SetScalingFactor.argtypes = [handle, _ScalingFactor]
        lib.tj3SetCroppingRegion.argtypes = [handle, _Region]
        lib.tj3Decompress8.argtypes = [handle, ctypes.c_char_p, size, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        return lib
    return None


def decode_region(data: bytes, box: Box, k: int = 1) -> Tensor | None:
    """``box`` of the JPEG ``data`` decoded at 1/``k`` of its size (``box`` in pixels of that
    reduced image), as uint8 (3, h, w) in HWC memory.

    The same pixels as decoding the whole image and slicing (libjpeg-turbo's upsampling treats
    a crop's side edges as image edges, so one more column is decoded on either side and cut
    off). ``None`` without libturbojpeg, or when it refuses the file or warns about it (damaged
    data, an unsupported colour space); the caller then decodes it another way. A ``box`` not
    inside the image is a ValueError.
    """
    lib = library()
    if lib is None:
        return None
    left, top, right, bottom = box
    handle = lib.tj3Init(_INIT_DECOMPRESS)
    if not handle:
        return None
    try:
        if lib.tj3Set(handle, _PARAM_STOP_ON_WARNING, 1) or lib.tj3DecompressHeader(handle, data, len(data)):
            return None
        subsampling, width, height = (lib.tj3Get(handle, p) for p in (_PARAM_SUBSAMP, _PARAM_WIDTH, _PARAM_HEIGHT))
        if not 0 <= subsampling < len(_MCU_WIDTH) or lib.tj3SetScalingFactor(handle, _ScalingFactor(1, k)):
            return None
        mcu = -(-_MCU_WIDTH[subsampling] // k)  # the iMCU width of the 1/k image
        scaled_width, scaled_height = decoded_size((width, height), k)
        if not (0 <= left < right <= scaled_width and 0 <= top < bottom <= scaled_height):
            raise ValueError(f"box {box} is outside the {scaled_width}x{scaled_height} image")
        x = max(0, left - 1) // mcu * mcu
        w = min(scaled_width, right + 1) - x
        if lib.tj3SetCroppingRegion(handle, _Region(x, top, w, bottom - top)):
            return None
        out = torch.empty((bottom - top, w, 3), dtype=torch.uint8)
        if lib.tj3Decompress8(handle, data, len(data), out.data_ptr(), 0, _PIXEL_RGB):
            return None
    finally:
        lib.tj3Destroy(handle)
    return out[:, left - x : right - x].permute(2, 0, 1)
