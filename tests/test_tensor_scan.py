"""The compiled fingerprint scan (nestalign.tensor_scan) against torch's way of taking the same
numbers: scale, NaN and Inf counts and statistics, on the values a capture meets."""

from __future__ import annotations

import math

import pytest
import torch

from nestalign import artifacts as art
from nestalign.fingerprints import SLACK
from nestalign.tensor_scan import BLOCK, scan


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    long = torch.randn(3 * BLOCK + 17, generator=g)  # blocks and a ragged tail
    holes = long.clone()
    holes[[5, BLOCK + 1, 2 * BLOCK]] = torch.tensor([math.nan, math.inf, -math.inf])
    return {
        "one": torch.tensor([-2.5]),
        "ragged": long,
        "negative": -long.abs() - 1,
        "positive": long.abs() + 1e-30,
        "signed zeros": torch.tensor([-0.0, 0.0, -0.0]),
        "subnormal": torch.tensor([1e-45, -3e-45, 0.0]),
        "large": long * 1e30,
        "float64": long.double() * 1e100,
        "float64 squares overflow": long.double() * 1e200,
        "nan and inf": holes,
        "only nan": torch.full((9,), math.nan),
        "inf only": torch.tensor([math.inf, -math.inf]),
        "matrix view": long[: 64 * 64].reshape(64, 64).t(),  # not contiguous
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_the_scan_takes_the_numbers_torch_takes(name, monkeypatch):
    t = _cases()[name]
    assert art._scanner() is scan  # numba is installed: the fingerprint takes the scan's numbers
    got = art.tensor_fingerprint(t, stats=True)
    monkeypatch.setattr(art, "_scanner", lambda: None)  # as a capture without numba takes them
    want = art.tensor_fingerprint(t, stats=True)
    assert art.same_bytes(got, want)
    assert (got["nan"], got["inf"]) == (want["nan"], want["inf"])
    assert got["scale"] == want["scale"]  # exact: a maximum is not rounded
    a, b = got["stats"], want["stats"]
    assert (a is None) == (b is None)
    if a is not None:
        assert (a["min"], a["max"]) == (b["min"], b["max"])
        for key in ("sum", "abs_sum", "norm"):  # the summation orders differ: the judge's slack
            assert abs(a[key] - b[key]) <= SLACK * (a["abs_sum"] + b["abs_sum"] + 2 * a["norm"])


def test_the_scan_counts_what_is_not_finite_and_keeps_the_largest_finite_magnitude():
    x = torch.tensor([1.0, math.nan, -7.0, math.inf, math.nan, -math.inf, 3.0]).numpy()
    assert scan(x) == (7.0, 2, 2, None)


def test_a_float64_sum_that_overflows_leaves_no_statistics():
    """Every element finite, but the squares exceed float64: no statistic to bound with."""
    x = torch.tensor([1e300, -1e300], dtype=torch.float64).numpy()
    assert scan(x) == (1e300, 0, 0, None)


def test_the_scan_sums_a_long_tensor_as_closely_as_float64_allows():
    t = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)) + 0.25
    exact = math.fsum(t.double().tolist())
    total = scan(t.numpy())[3]["sum"]
    assert abs(total - exact) <= SLACK * float(t.abs().sum())
