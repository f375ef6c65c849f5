"""One pass over a pair of float arrays that yields every metric of ``nestalign.metrics``.

The reference ``a`` and candidate ``b`` (same length, both float32 or both float64) are read in
blocks that stay in the CPU cache, spread over numba's threads: an integer look at a block's
exponent bits says whether all its elements are finite; a finite block then fills every
accumulator in a few vectorised loops over the cached block (reassociated float sums), a block
holding NaN or Inf goes element by element, counting those and masking them out. Compiled by
numba on first use and cached beside this module.
"""

from __future__ import annotations

import math

import numba
import numpy as np

BLOCK = 1 << 15  # elements per block: both sides and the scratch stay in the L2 cache
# Reassociation lets the sums vectorise; no-NaN/no-Inf holds inside a block checked finite.
# Neither contraction (FMA) nor approximate division: each element's test rounds as written.
_FINITE_MATH = {"reassoc", "nnan", "ninf", "nsz"}

# Layout of the accumulator array the kernel fills (float64; counts are exact below 2**53).
FIELDS = (
    "neq", "within", "fin", "nan_ref", "nan_cand", "inf_ref", "inf_cand",
    "max_abs", "sum_abs", "sum_sq", "aa", "bb", "ab", "max_rel", "sum_ulp", "max_ulp",
)  # fmt: skip
NEQ, WITHIN, FIN, NAN_A, NAN_B, INF_A, INF_B = range(7)
MAX_ABS, SUM_ABS, SUM_SQ, AA, BB, AB, MAX_REL, SUM_ULP, MAX_ULP = range(7, 16)
_MAXIMA = [MAX_ABS, MAX_REL, MAX_ULP]


@numba.njit(cache=True, fastmath=_FINITE_MATH)
def _finite_block(x, y, xi, d, r, u, shift, emask, bias, min_exp, atol, rtol, floor, acc):
    """Every accumulator over x, y (one block, all finite; xi: x's bits); d, r, u: scratch of the
    block's length (|y - x| in float64, the relative error in the arrays' dtype, ULPs). Several
    short loops over cached data, each one the vectoriser takes; maxima of non-negative floats
    are taken on their bit patterns (integer maxima vectorise, float ones do not)."""
    m = x.shape[0]
    inv = u.view(np.int64)
    for j in range(m):  # 2**(1 - max(E, min_exp)) as bits: a normal float64 for every dtype
        e = np.int64((xi[j] >> shift) & emask) - bias
        inv[j] = (1024 - max(e, min_exp)) << 52
    fl = x.dtype.type(floor)
    for j in range(m):  # in the arrays' own dtype, as torch rounds
        dd = abs(y[j] - x[j])
        ax = abs(x[j])
        r[j] = dd / (ax if ax > fl else fl)
        d[j] = np.float64(dd)
    neq = 0
    within = 0
    sum_abs = sum_sq = aa = bb = ab = 0.0
    for j in range(m):
        xd = np.float64(x[j])
        yd = np.float64(y[j])
        dj = d[j]
        neq += dj != 0.0
        within += dj - rtol * abs(xd) <= atol
        sum_abs += dj
        sum_sq += dj * dj
        aa += xd * xd
        bb += yd * yd
        ab += xd * yd
    sum_ulp = 0.0
    for j in range(m):
        uj = d[j] * u[j] * 0.5
        u[j] = uj
        sum_ulp += uj
    di = d.view(np.int64)
    ui = u.view(np.int64)
    ri = r.view(xi.dtype)
    d_top = u_top = 0
    for j in range(m):
        d_top = max(d_top, di[j])
        u_top = max(u_top, ui[j])
    r_top = ri.dtype.type(0)
    for j in range(m):
        r_top = max(r_top, ri[j])
    acc[NEQ] += neq
    acc[WITHIN] += within
    acc[FIN] += m
    acc[SUM_ABS] += sum_abs
    acc[SUM_SQ] += sum_sq
    acc[AA] += aa
    acc[BB] += bb
    acc[AB] += ab
    acc[SUM_ULP] += sum_ulp
    di[0], ui[0], ri[0] = d_top, u_top, r_top  # the scratch is spent: read the bits back as floats
    acc[MAX_ABS] = max(acc[MAX_ABS], d[0])
    acc[MAX_ULP] = max(acc[MAX_ULP], u[0])
    acc[MAX_REL] = max(acc[MAX_REL], np.float64(r[0]))


@numba.njit(cache=True)
def _masked_block(x, y, xi, shift, emask, bias, min_exp, atol, rtol, floor, acc):
    """The same over a block holding NaN or Inf, one element at a time: those places are
    counted, not measured. NaN at the same place on both sides, or the same infinity, counts as
    equal."""
    fl = x.dtype.type(floor)
    for j in range(x.shape[0]):
        a = x[j]
        b = y[j]
        na, nb = np.isnan(a), np.isnan(b)
        fa, fb = np.isfinite(a), np.isfinite(b)
        acc[NAN_A] += na
        acc[NAN_B] += nb
        acc[INF_A] += not (fa or na)
        acc[INF_B] += not (fb or nb)
        if not (fa and fb):
            same = (na and nb) or (a == b and not fa)
            acc[WITHIN] += same
            acc[NEQ] += not same
            continue
        dd = abs(b - a)
        d = np.float64(dd)
        ad = abs(np.float64(a))
        e = np.int64((xi[j] >> shift) & emask) - bias
        u = d / math.ldexp(1.0, max(e, min_exp))
        acc[FIN] += 1
        acc[NEQ] += d != 0.0
        acc[WITHIN] += d - rtol * ad <= atol
        acc[SUM_ABS] += d
        acc[SUM_SQ] += d * d
        acc[AA] += np.float64(a) * np.float64(a)
        acc[BB] += np.float64(b) * np.float64(b)
        acc[AB] += np.float64(a) * np.float64(b)
        acc[SUM_ULP] += u
        acc[MAX_ABS] = max(acc[MAX_ABS], d)
        acc[MAX_ULP] = max(acc[MAX_ULP], u)
        acc[MAX_REL] = max(acc[MAX_REL], np.float64(dd / max(abs(a), fl)))


@numba.njit(cache=True, parallel=True)
def _pass(a, b, ai, bi, shift, emask, bias, min_exp, atol, rtol, floor, rows):
    """All blocks of a, b (ai, bi: their bits as integers), spread over numba's threads; block k
    fills rows[k]. The ULP unit of a value is 2**max(E, min_exp), E its binary exponent (shift,
    emask, bias: the exponent field of the arrays' dtype)."""
    n = a.shape[0]
    for k in numba.prange(rows.shape[0]):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        x, y, xi, yi = a[lo:hi], b[lo:hi], ai[lo:hi], bi[lo:hi]
        acc = rows[k]
        bad = 0
        for j in range(hi - lo):  # integer look: an all-ones exponent is NaN or Inf
            bad += ((xi[j] >> shift) & emask) == emask
            bad += ((yi[j] >> shift) & emask) == emask
        if bad:
            _masked_block(x, y, xi, shift, emask, bias, min_exp, atol, rtol, floor, acc)
        else:
            d = np.empty(hi - lo, np.float64)
            r = np.empty(hi - lo, a.dtype)
            u = np.empty(hi - lo, np.float64)
            _finite_block(x, y, xi, d, r, u, shift, emask, bias, min_exp, atol, rtol, floor, acc)


# Exponent field of the stored dtype: (integer view, shift, mask, bias).
_FIELD = {
    np.dtype(np.float32): (np.int32, 23, 0xFF, 127),
    np.dtype(np.float64): (np.int64, 52, 0x7FF, 1023),
}


def float_pass(
    a: np.ndarray,
    b: np.ndarray,
    atol: float,
    rtol: float,
    floor: float,
    ulp: tuple[int, int],
    threads: int = 1,
) -> dict[str, float]:
    """Accumulators (FIELDS) of two contiguous 1-D float32 or float64 arrays of one dtype.

    ``ulp``: (min_exp, mantissa bits) of the dtype whose ULPs are counted (the reference's own
    dtype when it was widened to float32 for the pass); ``sum_ulp`` and ``max_ulp`` are in
    those ULPs. ``threads``: how many of numba's threads share the blocks (the figures are the
    same for any number).
    """
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    ints, shift, emask, bias = _FIELD[a.dtype]
    min_exp, mantissa = ulp
    rows = np.zeros((-(-a.shape[0] // BLOCK), len(FIELDS)))
    _pass(a, b, a.view(ints), b.view(ints), shift, emask, bias, min_exp, atol, rtol, floor, rows)
    # Blocks combine in their order: the result does not depend on the number of threads.
    top = rows[:, _MAXIMA].max(axis=0, initial=0.0)
    out = {name: float(v) for name, v in zip(FIELDS, rows.sum(axis=0), strict=True)}
    out |= {FIELDS[i]: float(v) for i, v in zip(_MAXIMA, top, strict=True)}
    scale = 2.0**mantissa
    out["sum_ulp"] *= scale
    out["max_ulp"] *= scale
    return out
