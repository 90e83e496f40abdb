"""Top-K by magnitude, streamed: the exact k-th largest |T| from two radix-histogram passes over the
float32 bit patterns (16 high bits, then 16 low bits), and the mask that applies it in storage order."""
from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from mlan.merge.tensors import MergeError

_HI_BINS = 1 << 15  # |T| is non-negative: float32 bits >> 16 < 2**15
_LO_BINS = 1 << 16
_FLOAT32_INF_BITS = 0x7F800000


@dataclass(frozen=True)
class MagnitudeCut:
    """Keep entries whose |T| float32 bits exceed `bits`, plus the first `ties` entries equal to it."""

    bits: int
    ties: int

    @staticmethod
    def keep_all() -> MagnitudeCut:
        return MagnitudeCut(-1, 0)

    @staticmethod
    def keep_none() -> MagnitudeCut:
        return MagnitudeCut(_FLOAT32_INF_BITS + 1, 0)

    @property
    def value(self) -> float:
        """The threshold as a float (|T| at the k-th largest entry)."""
        if self.bits < 0:
            return 0.0
        return struct.unpack("<f", struct.pack("<I", min(self.bits, _FLOAT32_INF_BITS)))[0]


def keep_count(density: float, n: int) -> int:
    """⌈K·n⌉, computed on the decimal value of K (0.3 · 10 is 3, not 4)."""
    return math.ceil(Fraction(repr(float(density))) * n)


def _last_bin_reaching(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The highest bin b with (entries in bins ≥ b) ≥ k, and the count in bins > b."""
    at_or_above = np.cumsum(hist[::-1])[::-1]
    b = int(np.flatnonzero(at_or_above >= k)[-1])
    return b, int(at_or_above[b] - hist[b])


def find_cut(bit_chunks: Callable[[], Iterator[tuple[str, torch.Tensor]]], k: int, n: int) -> MagnitudeCut:
    """The exact k-th largest of n non-negative float32 values, given as (label, int32 bits) chunks.

    Two passes: a histogram of the 16 high bits finds the bin holding the k-th value, a histogram of
    the 16 low bits inside that bin finds the value. A NaN is an error naming its chunk's label.
    """
    if k >= n:
        return MagnitudeCut.keep_all()
    if k <= 0:
        return MagnitudeCut.keep_none()
    hi = np.zeros(_HI_BINS, dtype=np.int64)  # numpy's bincount is ~10x faster than torch's on CPU
    nan_bins = slice((_FLOAT32_INF_BITS >> 16) + 1, None)
    for label, bits in bit_chunks():
        hi += np.bincount(bits.numpy() >> 16, minlength=_HI_BINS)
        if hi[nan_bins].any():
            raise MergeError(f"task vector of {label!r} has NaN entries (a NaN or inf in a checkpoint)")
    b, above = _last_bin_reaching(hi, k)
    lo = np.zeros(_LO_BINS, dtype=np.int64)
    for _, bits in bit_chunks():
        chunk = bits.numpy()
        lo += np.bincount(chunk[(chunk >> 16) == b] & 0xFFFF, minlength=_LO_BINS)
    low, above_in_bin = _last_bin_reaching(lo, k - above)
    return MagnitudeCut((b << 16) | low, k - above - above_in_bin)


class CutState:
    """A cut being applied in storage order: hands out the tie slots first come, first served."""

    def __init__(self, cut: MagnitudeCut) -> None:
        self.bits, self.ties_left = cut.bits, cut.ties

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        keep = bits > self.bits
        if self.ties_left > 0:
            tied = (bits == self.bits).nonzero().flatten()[: self.ties_left]
            keep[tied] = True
            self.ties_left -= tied.numel()
        return keep

