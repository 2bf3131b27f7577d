"""Masks as Label Studio brush regions: its "rle" format (thi.ng's rle-pack over RGBA bytes).

Label Studio's editor decodes a brush region's `value.rle` into an RGBA image of the task image's
size: the mask's 0/255 value in all four channels, row by row. The bit stream (most significant
bit first, padded with zeros to whole bytes) is

    32 bits  the number of values, H x W x 4
     5 bits  word size - 1 (8-bit words)
    4 x 4    the four run-length field sizes - 1 (3, 4, 8 and 16 bits)
    then chunks: 1 bit repeat flag, 2 bits choosing a field size, that many bits n (n + 1 values),
             then one word repeated n + 1 times (flag 1) or n + 1 words (flag 0).
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 8
RUN_BITS = (3, 4, 8, 16)
MAX_RUN = 1 << RUN_BITS[-1]  # values one chunk can cover


class _Bits:
    """An MSB-first bit writer."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, value: int, bits: int) -> None:
        self.acc = (self.acc << bits) | value
        self.n += bits
        while self.n >= 8:
            self.n -= 8
            self.out.append((self.acc >> self.n) & 0xFF)
        self.acc &= (1 << self.n) - 1

    def bytes(self) -> list[int]:
        if self.n:
            self.out.append((self.acc << (8 - self.n)) & 0xFF)
            self.acc, self.n = 0, 0
        return list(self.out)


def encode_rle(values: np.ndarray) -> list[int]:
    """The rle-pack encoding of a flat uint8 array, as a list of byte values (module docstring)."""
    values = np.asarray(values, dtype=np.uint8).ravel()
    bits = _Bits()
    bits.write(len(values), 32)
    bits.write(WORD_BITS - 1, 5)
    for size in RUN_BITS:
        bits.write(size - 1, 4)
    if len(values):
        starts = np.flatnonzero(np.diff(values.astype(np.int16))) + 1
        bounds = np.concatenate([[0], starts, [len(values)]])
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            value = int(values[start])
            while start < stop:
                n = min(stop - start, MAX_RUN)
                k = next(i for i, size in enumerate(RUN_BITS) if n - 1 < (1 << size))
                bits.write(1 if n > 1 else 0, 1)  # a single value is a literal chunk of one word
                bits.write(k, 2)
                bits.write(n - 1, RUN_BITS[k])
                bits.write(value, WORD_BITS)
                start += n
    return bits.bytes()


def mask_rle(mask: np.ndarray) -> list[int]:
    """A boolean (H, W) mask as a brush region's `rle`: 255 where set, in all four RGBA channels."""
    mask = np.asarray(mask, dtype=bool)
    rgba = np.repeat((mask.astype(np.uint8) * 255)[..., None], 4, axis=2)
    return encode_rle(rgba.ravel())
