"""The coordinate convention: a queried pixel is exported at its centre and read back by flooring.

Pixel (y, x) of an S x S project image covers [x, x+1) x [y, y+1) in image coordinates whose
origin is the top-left corner of the image. Its centre is (x + 0.5, y + 0.5):

    Label Studio (percent of the image size):  x% = 100 * (x + 0.5) / S
    CVAT (pixels of the image as uploaded, W x H):  cx = (x + 0.5) * W / S

Reading back floors the scaled value. A centre sits half a pixel from either edge, so float
rounding (about 1e-13 of a pixel) can never move it to a neighbour: the round trip is exact.
"""

from __future__ import annotations

import math


def to_percent(index: int, size: int) -> float:
    """Centre of pixel `index` (a row or a column) in percent of the side `size`."""
    return 100.0 * (index + 0.5) / size


def from_percent(percent: float, size: int) -> int:
    """The pixel a percent coordinate falls in (may be outside 0..size-1: the caller checks)."""
    return math.floor(percent * size / 100.0)


def to_pixels(index: int, size: int, extent: int) -> float:
    """Centre of pixel `index` of a `size` side, in pixels of an image side of `extent` pixels."""
    return (index + 0.5) * extent / size


def from_pixels(value: float, size: int, extent: int) -> int:
    """The project pixel an image coordinate on a side of `extent` pixels falls in."""
    return math.floor(value * size / extent)
