"""Metrics of one tensor pair against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from nestalign.fused import BLOCK
from nestalign.metrics import compare_tensors


def test_hand_computed_float64():
    ref = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    cand = torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64)
    m = compare_tensors(ref, cand, atol=0.6, rtol=0.0)
    assert not m["ok"]
    assert m["max_abs"] == 1.0
    assert m["mean_abs"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(1.25 / 3))
    assert m["max_rel"] == pytest.approx(0.25)
    assert m["equal_share"] == pytest.approx(1 / 3)
    assert m["allclose_share"] == pytest.approx(2 / 3)
    assert m["cosine"] == pytest.approx(18 / math.sqrt(21 * 16.25))
    # ULP of the reference value: 0.5 at 2.0 and 1.0 at 4.0 are both 2**50 float64 ULPs
    assert m["max_ulp"] == 2.0**50
    assert m["mean_ulp"] == pytest.approx(2 / 3 * 2.0**50)
    assert compare_tensors(ref, cand, atol=1.0, rtol=0.0)["ok"]
    assert compare_tensors(ref, cand, atol=0.0, rtol=0.25)["ok"]  # |d| <= rtol * |ref|


def test_ulp_float32_and_bfloat16():
    one = torch.tensor([1.0, 3.0])
    up = torch.nextafter(one, torch.tensor(9.0))
    m = compare_tensors(one, up, atol=0.0, rtol=0.0)
    assert m["max_ulp"] == 1.0 and m["mean_ulp"] == 1.0
    b = torch.tensor([1.0], dtype=torch.bfloat16)
    m = compare_tensors(b, torch.tensor([1.0078125], dtype=torch.bfloat16), 0.0, 0.0)
    assert m["max_ulp"] == 1.0


def test_small_value_floor_keeps_relative_error_finite():
    ref = torch.tensor([1.0, 1e-9, 0.0])
    cand = torch.tensor([1.0, 2e-9, 1e-9])
    m = compare_tensors(ref, cand, atol=0.0, rtol=0.0)
    assert m["max_rel"] < 1e-5  # 1e-9 measured against 2**-10 of the scale 1.0, not against 1e-9
    assert m["scale"] == 1.0


def test_nan_and_inf_never_crash():
    same = torch.tensor([math.nan, 1.0, math.inf, -math.inf])
    m = compare_tensors(same, same.clone(), 0.0, 0.0)
    assert m["ok"] and m["equal_share"] == 1.0
    assert (m["nan_ref"], m["nan_cand"], m["inf_ref"], m["inf_cand"]) == (1, 1, 2, 2)
    m = compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([math.nan, 2.0]), 1.0, 1.0)
    assert not m["ok"] and m["nan_cand"] == 1 and m["nan_ref"] == 0
    assert m["max_abs"] == 0.0 and m["allclose_share"] == 0.5 and "NaN" in m["reason"]
    m = compare_tensors(torch.tensor([math.inf]), torch.tensor([-math.inf]), 1.0, 1.0)
    assert not m["ok"] and m["equal_share"] == 0.0


def test_blocks_and_non_finite_values_across_them():
    n = 2 * BLOCK + 5
    ref = torch.linspace(1.0, 2.0, n)
    cand = ref.clone()
    cand[-1] += 0.5
    ref[BLOCK + 3] = cand[BLOCK + 3] = math.nan
    cand[7] = math.inf
    m = compare_tensors(ref, cand, atol=1e-3, rtol=0.0)
    assert (m["nan_ref"], m["nan_cand"], m["inf_ref"], m["inf_cand"]) == (1, 1, 0, 1)
    assert m["allclose_share"] == pytest.approx((n - 2) / n)
    assert m["max_abs"] == pytest.approx(0.5)
    assert m["equal_share"] == pytest.approx((n - 2) / n)


def test_integers_and_bools_must_be_equal_exactly():
    m = compare_tensors(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), atol=10.0, rtol=10.0)
    assert not m["ok"] and m["max_abs"] == 1.0 and m["equal_share"] == pytest.approx(2 / 3)
    assert compare_tensors(torch.tensor([1, 2]), torch.tensor([1, 2]))["ok"]
    assert not compare_tensors(torch.tensor([True, False]), torch.tensor([True, True]))["ok"]


def test_shape_and_dtype_mismatch():
    m = compare_tensors(torch.zeros(2, 3), torch.zeros(3))
    assert not m["ok"] and "shape" in m["reason"] and m["layout"] is None
    m = compare_tensors(torch.ones(3), torch.ones(3, dtype=torch.float64))
    assert not m["ok"] and "dtype float32 vs float64" in m["reason"]
    assert m["max_abs"] == 0.0


def test_layout_difference_is_reported():
    x = torch.arange(12.0).reshape(3, 4)
    m = compare_tensors(x, x.t().contiguous())
    assert not m["ok"] and m["layout"] == "permute(1, 0)" and "layout" in m["reason"]
    sq = torch.randn(4, 4)
    assert compare_tensors(sq, sq.t().contiguous())["layout"] == "permute(1, 0)"
    y = torch.randn(2, 3, 4)
    assert compare_tensors(y, y.permute(2, 0, 1).contiguous())["layout"] == "permute(2, 0, 1)"
    assert compare_tensors(sq, torch.randn(4, 4))["layout"] is None
    shuffled = x.reshape(-1)[torch.tensor([3, 1, 2, 0, 4, 5, 6, 7, 8, 9, 10, 11])].reshape(4, 3)
    assert compare_tensors(x, shuffled)["layout"] == "same values, other arrangement"


def test_default_tolerances_follow_assert_close():
    one = torch.ones(4)
    assert compare_tensors(one, one + 1e-6)["ok"]  # float32: atol 1e-5, rtol 1.3e-6
    assert not compare_tensors(one, one + 3e-5)["ok"]
    b = torch.ones(4, dtype=torch.bfloat16)
    assert compare_tensors(b, b * 1.0078125)["ok"]  # bf16 rtol 1.6e-2
    m = compare_tensors(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert (m["atol"], m["rtol"]) == (1e-7, 1e-7)


def test_zero_tensors_and_plain_values():
    z = torch.zeros(5)
    m = compare_tensors(z, z.clone(), 0.0, 0.0)
    assert m["ok"] and m["cosine"] == 1.0 and m["max_rel"] == 0.0
    assert compare_tensors(None, None)["ok"]
    assert not compare_tensors(None, torch.zeros(1))["ok"]
    assert not compare_tensors(3, 4)["ok"]
    assert compare_tensors(torch.zeros(0), torch.zeros(0))["ok"]


def test_huge_values_keep_a_finite_cosine():
    ref = torch.tensor([3e20, -1e20, 2e20])
    m = compare_tensors(ref, ref * 1.5, atol=0.0, rtol=0.0)
    assert m["cosine"] == pytest.approx(1.0) and math.isfinite(m["rmse"])
    assert m["rmse"] == pytest.approx(float((ref.double() * 0.5).pow(2).mean().sqrt()), rel=1e-6)
