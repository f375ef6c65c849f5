"""One compiled pass over a float32 or float64 array for the numbers of its fingerprint.

``scan(x)`` gives what ``artifacts.tensor_fingerprint`` records of a real tensor besides its hash:
the largest finite magnitude, the NaN and Inf counts and, when every element is finite, the
float64 sum, sum of magnitudes, sum of squares, minimum and maximum. The array is read in blocks
that stay in the L1 cache: one loop per block accumulates the three sums (reassociated, so they
vectorise) and the extremes on the values' bits mapped to integers that sort as the floats do
(integer minima vectorise, float ones do not). A non-finite element makes the sums NaN or
infinite; only then is a second, element-wise loop run to count NaN and Inf. The GIL is released,
so a writer thread scanning does not hold up training. Compiled by numba on first use and cached
beside this module; without numba, ``artifacts`` takes these numbers with torch, as before.
"""

from __future__ import annotations

import math

import numba
import numpy as np

BLOCK = 1 << 12  # elements per block
# Per float dtype: the integers of its width, the shift to the sign bit, the mask of the rest.
_BITS = {
    np.dtype(f): (i, i(np.iinfo(i).bits - 1), i(np.iinfo(i).max))
    for f, i in ((np.float32, np.int32), (np.float64, np.int64))
}


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _block(x, xi, shift, low, lo, hi):
    """(sum, sum of magnitudes, sum of squares) of one block in float64, and the running
    extremes lo, hi of its mapped bits (``_scan``). Indexing a slice from 0 lets it vectorise."""
    s = a = q = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        s += v
        a += abs(v)
        q += v * v
        k = xi[j] ^ ((xi[j] >> shift) & low)
        lo = min(lo, k)
        hi = max(hi, k)
    return s, a, q, lo, hi


@numba.njit(cache=True, nogil=True)
def _scan(x, xi, shift, low):
    """(sum, sum of magnitudes, sum of squares, minimum, maximum) of x; xi: x's bits, each
    mapped by ``k ^ ((k >> shift) & low)`` to an integer that orders as the float it holds
    (NaN beyond the infinities). Summed block by block: the rounding error grows with the block
    and with the number of blocks, not with the length."""
    n = x.shape[0]
    s = a = q = 0.0
    lo = hi = xi[0] ^ ((xi[0] >> shift) & low)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        bs, ba, bq, lo, hi = _block(x[start:stop], xi[start:stop], shift, low, lo, hi)
        s += bs
        a += ba
        q += bq
    ends = np.array([lo, hi], xi.dtype)
    ends ^= (ends >> shift) & low
    bounds = ends.view(x.dtype)
    return s, a, q, np.float64(bounds[0]), np.float64(bounds[1])


@numba.njit(cache=True, nogil=True)
def _counts(x):
    """(NaN count, Inf count, largest finite magnitude) of x, element by element."""
    nan = inf = 0
    top = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        if np.isnan(v):
            nan += 1
        elif np.isinf(v):
            inf += 1
        else:
            top = max(top, abs(v))
    return nan, inf, top


def scan(x: np.ndarray) -> tuple[float, int, int, dict[str, float] | None]:
    """(scale, NaN count, Inf count, stats) of a non-empty contiguous 1-D float32 or float64
    array; stats as ``artifacts.tensor_stats`` (sum, abs_sum, norm, min, max), None unless every
    element is finite and every sum is (a float64 array near its range can overflow them)."""
    ints, shift, low = _BITS[x.dtype]
    total, magnitudes, squares, lo, hi = _scan(x, x.view(ints), shift, low)
    if math.isfinite(magnitudes) and math.isfinite(squares):  # so every element is finite
        stats = {
            "sum": total,
            "abs_sum": magnitudes,
            "norm": math.sqrt(squares),
            "min": lo,
            "max": hi,
        }
        return max(-lo, hi), 0, 0, stats
    nan, inf, top = _counts(x)
    return top, nan, inf, None
