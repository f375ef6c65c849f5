"""The fused pass against a plain elementwise reference written with torch ops, over blocks,
dtypes, NaN/Inf placements and thread counts."""

from __future__ import annotations

import math

import pytest
import torch

from nestalign.fused import BLOCK
from nestalign.metrics import compare_tensors

ULP_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def plain(ref: torch.Tensor, cand: torch.Tensor, atol: float, rtol: float) -> dict:
    """What compare_tensors must report, one torch op at a time in float64 (the difference
    rounded in the compared dtype first, as the fused pass does)."""
    work = torch.float64 if torch.float64 in (ref.dtype, cand.dtype) else torch.float32
    a, b = ref.to(work), cand.to(work)
    both = torch.isfinite(a) & torch.isfinite(b)
    same = (torch.isnan(a) & torch.isnan(b)) | ((a == b) & ~torch.isfinite(a))
    d = (b - a).abs().double()[both]
    ad = a.double()[both].abs()
    n = a.numel()
    within = int((d - rtol * ad <= atol).sum()) + int(same[~both].sum())
    scale = max(float(x[torch.isfinite(x)].abs().max()) for x in (a, b))
    floor = max(2.0**-10 * scale, torch.finfo(work).tiny)
    rel = (b - a).abs()[both] / a.abs()[both].clamp_min(floor)
    out = {
        "allclose_share": within / n,
        "equal_share": 1 - (int((d != 0).sum()) + int((~both & ~same).sum())) / n,
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "rmse": math.sqrt(float((d * d).mean())),
        "max_rel": float(rel.max()),
        "nan_ref": int(torch.isnan(ref).sum()),
        "inf_cand": int(torch.isinf(cand).sum()),
    }
    if ref.dtype == cand.dtype:
        e = torch.frexp(a.double()[both])[1] - 1  # binary exponent: 2**e <= |a| < 2**(e+1)
        info = torch.finfo(ref.dtype)
        lowest = int(math.log2(info.tiny))
        e = torch.where(a[both] == 0, lowest, e.clamp_min(lowest))
        ulp = d / torch.pow(2.0, (e - ULP_BITS[ref.dtype]).double())
        out |= {"max_ulp": float(ulp.max()), "mean_ulp": float(ulp.mean())}
    return out


def pair(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -6, 6, (n,), generator=g
    )
    cand = ref * (1 + 1e-4 * torch.randn(n, generator=g, dtype=torch.float64))
    ref[:: n // 7] = 0.0
    return ref.to(dtype), cand.to(dtype)


CASES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float64),
]


@pytest.mark.parametrize(("dtype_ref", "dtype_cand"), CASES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("non_finite", [False, True])
def test_the_fused_pass_reports_what_elementwise_ops_give(dtype_ref, dtype_cand, non_finite):
    n = 3 * BLOCK + 11
    ref, cand = pair(dtype_ref, n, 1)
    cand = cand.to(dtype_cand)
    if non_finite:  # in the second block and on its edge, both sides, and one side only
        ref[BLOCK] = cand[BLOCK] = math.nan
        ref[BLOCK + 1] = cand[BLOCK + 1] = math.inf
        cand[2 * BLOCK - 1] = -math.inf
        ref[2 * BLOCK] = math.nan
    want = plain(ref, cand, 1e-3, 1e-3)
    got = compare_tensors(ref, cand, 1e-3, 1e-3)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=0.0), key
    assert got["ok"] == (want["allclose_share"] == 1.0 and dtype_ref == dtype_cand)


def test_the_figures_do_not_depend_on_the_thread_count():
    ref, cand = pair(torch.float32, 9 * BLOCK + 3, 2)
    cand[5 * BLOCK + 2] = math.nan
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compare_tensors(ref, cand)
        torch.set_num_threads(2)
        two = compare_tensors(ref, cand)
    finally:
        torch.set_num_threads(before)
    assert one == two


def test_float16_subnormals_count_their_own_ulps():
    tiny = torch.tensor([2.0**-20, 0.0, 1.0], dtype=torch.float16)
    step = torch.tensor([2.0**-24, 2.0**-24, 2.0**-10], dtype=torch.float16)
    m = compare_tensors(tiny, tiny + step, 0.0, 0.0)
    assert m["max_ulp"] == 1.0 and m["mean_ulp"] == 1.0


@pytest.mark.parametrize("non_finite", [False, True])
def test_an_element_on_the_bound_is_within(non_finite):
    ref = torch.tensor([0.0, 4.0, 4.0, 1.0])
    cand = torch.tensor([0.5, 6.5, 6.5001, 1.0])  # |c - r| = atol + rtol |r|, then just beyond
    if non_finite:
        ref[3] = cand[3] = math.nan
    m = compare_tensors(ref, cand, atol=0.5, rtol=0.5)
    assert m["allclose_share"] == 0.75 and not m["ok"]
