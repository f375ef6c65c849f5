"""Metrics of one reference/candidate tensor pair, computed in one pass (nestalign.fused).

``compare_tensors(ref, cand, atol, rtol)`` returns a plain dict:

    ok, reason, shape_ref, shape_cand, dtype_ref, dtype_cand, numel,
    equal_share, max_abs, max_rel, mean_abs, rmse, cosine, allclose_share,
    max_ulp, mean_ulp, nan_ref, nan_cand, inf_ref, inf_cand, scale, layout

The candidate passes when shapes and dtypes agree and every element satisfies
``|cand - ref| <= atol + rtol * |ref|`` (the rule of ``torch.testing.assert_close``). NaN at the
same place on both sides and infinities of the same sign at the same place count as equal.
Integer and bool tensors must be equal exactly. The relative error divides by
``max(|ref|, rel_floor * scale)`` where ``scale`` is the largest finite magnitude on either side,
so values at rounding-noise level relative to the tensor do not make it explode.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from nestalign import flat
from nestalign.artifacts import FINGERPRINT, magnitude, same_bytes

# (rtol, atol) per dtype, as torch.testing.assert_close picks them when none are given.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}
REL_FLOOR = 2.0**-10  # elements below this share of the tensor's scale are measured against it


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of assert_close for ``dtype``; zero for exact dtypes."""
    rtol, atol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
    return atol, rtol


def _empty(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, Any]:
    return {
        "ok": False,
        "reason": "",
        "shape_ref": list(ref.shape),
        "shape_cand": list(cand.shape),
        "dtype_ref": str(ref.dtype).removeprefix("torch."),
        "dtype_cand": str(cand.dtype).removeprefix("torch."),
        "numel": ref.numel(),
        "equal_share": 0.0,
        "max_abs": math.nan,
        "max_rel": math.nan,
        "mean_abs": math.nan,
        "rmse": math.nan,
        "cosine": math.nan,
        "allclose_share": 0.0,
        "max_ulp": None,
        "mean_ulp": None,
        "nan_ref": 0,
        "nan_cand": 0,
        "inf_ref": 0,
        "inf_cand": 0,
        "scale": 0.0,
        "layout": None,
    }


def scale_of(t: torch.Tensor) -> float:
    """Largest finite magnitude of ``t`` (0 when it has none): from the capture's fingerprint
    when it has one (the tensor is not read), else one pass over it."""
    fp = getattr(t, FINGERPRINT, None)
    if fp is not None and fp.get("scale") is not None and t.is_floating_point():
        return float(fp["scale"])
    return magnitude(t.reshape(-1))[0]


# (min_exp, mantissa bits) per float dtype: the ULP at v is 2**(max(E(v), min_exp) - bits).
_ULP = {
    torch.float16: (-14, 10),
    torch.bfloat16: (-126, 7),
    torch.float32: (-126, 23),
    torch.float64: (-1022, 52),
}


def _float_pass(ref: torch.Tensor, cand: torch.Tensor, atol: float, rtol: float) -> dict:
    """Sums and extremes of two same-shape floating tensors in one fused pass (nestalign.fused,
    on torch's thread count; the scale of each side from its fingerprint when it has one)."""
    from nestalign import fused  # numba: imported once a pair has to be read

    work = torch.float64 if torch.float64 in (ref.dtype, cand.dtype) else torch.float32
    a_all = ref.detach().reshape(-1).to(work).contiguous()
    b_all = cand.detach().reshape(-1).to(work).contiguous()
    ulp_ok = ref.dtype == cand.dtype and ref.dtype in _ULP
    scale = max(scale_of(ref), scale_of(cand))
    floor = max(REL_FLOOR * scale, torch.finfo(work).tiny)
    ulp = _ULP[ref.dtype] if ulp_ok else _ULP[work]
    acc: dict[str, Any] = fused.float_pass(
        a_all.numpy(), b_all.numpy(), atol, rtol, floor, ulp, torch.get_num_threads()
    )
    if not all(math.isfinite(acc[k]) for k in ("aa", "bb", "ab", "sum_sq")) and acc["fin"]:
        # float64 sums overflowed (float64 values beyond ~1e154): redo the norms on scaled values
        keep = torch.isfinite(a_all) & torch.isfinite(b_all)
        a64 = a_all[keep].double() / scale
        b64 = b_all[keep].double() / scale
        acc["aa"], acc["bb"] = float(a64 @ a64), float(b64 @ b64)
        acc["ab"] = float(a64 @ b64)
        acc["sum_sq"] = float(((a64 - b64) ** 2).sum()) * scale * scale
    for key in ("neq", "within", "fin", "nan_ref", "nan_cand", "inf_ref", "inf_cand"):
        acc[key] = int(acc[key])
    acc.update(n=a_all.numel(), ulp_ok=ulp_ok, scale=scale)
    return acc


def _unravel(flat: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Coordinates of flat indices (torch.unravel_index imports sympy: slow the first time)."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return tuple(reversed(coords))


def _layout(ref: torch.Tensor, cand: torch.Tensor, atol: float, rtol: float) -> str | None:
    """'permute(...)' when cand equals ref with its dims permuted; 'same values' when only the
    multiset of values agrees; None otherwise."""
    if ref.numel() != cand.numel() or ref.numel() < 2 or ref.dim() < 2:
        return None
    if sorted(ref.shape) != sorted(cand.shape) or ref.dim() > 5:
        return None
    probe = None
    for perm in itertools.permutations(range(ref.dim())):
        if perm == tuple(range(ref.dim())):
            continue
        moved = ref.permute(perm)
        if moved.shape != cand.shape:
            continue
        if probe is None:
            probe = _unravel(torch.linspace(0, cand.numel() - 1, 64).long(), cand.shape)
        sample = moved[probe].to(cand.dtype)  # a cheap look before the full check
        if not torch.allclose(sample, cand[probe], atol=atol, rtol=rtol, equal_nan=True):
            continue
        if torch.allclose(moved.to(cand.dtype), cand, atol=atol, rtol=rtol, equal_nan=True):
            return "permute(" + ", ".join(map(str, perm)) + ")"
    if ref.shape == cand.shape:
        return None  # same shape, no permutation explains it: a numeric difference
    a = ref.reshape(-1).to(torch.float64).sort().values
    b = cand.reshape(-1).to(torch.float64).sort().values
    if torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
        return "same values, other arrangement"
    return None


def _same_fingerprint(ref: torch.Tensor, cand: torch.Tensor) -> dict[str, Any] | None:
    """The reference's fingerprint when both sides carry equal ones (same bytes), else None."""
    a, b = getattr(ref, FINGERPRINT, None), getattr(cand, FINGERPRINT, None)
    if not same_bytes(a, b) or ref.is_complex():
        return None
    if ref.dtype != cand.dtype or ref.shape != cand.shape:
        return None
    return a


def _identical(ref: torch.Tensor, fp: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """What the chunked pass gives two bitwise-equal tensors, from the capture's fingerprint."""
    exact = not ref.is_floating_point()
    out.update(
        ok=True,
        equal_share=1.0,
        allclose_share=1.0,
        max_abs=0.0,
        max_rel=0.0,
        mean_abs=0.0,
        rmse=0.0,
        cosine=1.0,
        scale=float(fp["scale"]),
        nan_ref=0 if exact else int(fp["nan"]),
        nan_cand=0 if exact else int(fp["nan"]),
        inf_ref=0 if exact else int(fp["inf"]),
        inf_cand=0 if exact else int(fp["inf"]),
    )
    if not exact and ref.dtype in _ULP:
        out["max_ulp"] = 0.0
        out["mean_ulp"] = 0.0
    return out


def compare_tensors(
    ref: Any, cand: Any, atol: float | None = None, rtol: float | None = None
) -> dict[str, Any]:
    """Metrics of one pair (see the module docstring); non-tensors are compared for equality.
    Two tensors whose capture fingerprints agree (artifacts.attach_index) are not read; the pages
    of mapped tensors (nestalign.flat) are released afterwards."""
    if not isinstance(ref, torch.Tensor) or not isinstance(cand, torch.Tensor):
        return _compare_plain(ref, cand)
    try:
        return _compare_pair(ref, cand, atol, rtol)
    finally:
        flat.release(ref, cand)


def _compare_pair(
    ref: torch.Tensor, cand: torch.Tensor, atol: float | None, rtol: float | None
) -> dict[str, Any]:
    if atol is None or rtol is None:
        datol, drtol = default_tolerance(ref.dtype)
        atol = datol if atol is None else atol
        rtol = drtol if rtol is None else rtol
    out = _empty(ref, cand)
    out["atol"], out["rtol"] = atol, rtol
    same = _same_fingerprint(ref, cand)
    if same is not None:
        return _identical(ref, same, out)
    if ref.is_complex() or cand.is_complex():
        ref, cand = torch.view_as_real(ref.resolve_conj()), torch.view_as_real(cand.resolve_conj())
    if ref.shape != cand.shape:
        out["layout"] = _layout(ref, cand, atol, rtol)
        out["reason"] = f"shape {list(ref.shape)} vs {list(cand.shape)}"
        if out["layout"]:
            out["reason"] += f" (layout: {out['layout']})"
        return out
    exact = not (ref.is_floating_point() or cand.is_floating_point())
    if exact:
        return _compare_exact(ref, cand, out)
    acc = _float_pass(ref, cand, atol, rtol)
    n, fin = acc["n"], acc["fin"]
    out["scale"] = acc["scale"]
    out["equal_share"] = 1.0 - acc["neq"] / n if n else 1.0
    out["max_abs"] = acc["max_abs"]
    out["max_rel"] = acc["max_rel"]
    out["mean_abs"] = acc["sum_abs"] / fin if fin else 0.0
    out["rmse"] = math.sqrt(acc["sum_sq"] / fin) if fin else 0.0
    norm = math.sqrt(acc["aa"] * acc["bb"])
    out["cosine"] = (
        max(-1.0, min(1.0, acc["ab"] / norm))
        if norm > 0
        else (1.0 if acc["aa"] == acc["bb"] else 0.0)
    )
    out["allclose_share"] = acc["within"] / n if n else 1.0
    if acc["ulp_ok"]:
        out["max_ulp"] = acc["max_ulp"]
        out["mean_ulp"] = acc["sum_ulp"] / fin if fin else 0.0
    for key in ("nan_ref", "nan_cand", "inf_ref", "inf_cand"):
        out[key] = acc[key]
    within = acc["within"] == n
    dtype_ok = ref.dtype == cand.dtype
    out["ok"] = within and dtype_ok
    if not dtype_ok:
        out["reason"] = f"dtype {out['dtype_ref']} vs {out['dtype_cand']}"
    elif not within:
        out["reason"] = f"{n - acc['within']} of {n} elements outside atol={atol:g} rtol={rtol:g}"
        if ref.dim() >= 2:
            out["layout"] = _layout(ref, cand, atol, rtol)
            if out["layout"]:
                out["reason"] += f" (layout: {out['layout']})"
    if out["nan_ref"] != out["nan_cand"] or out["inf_ref"] != out["inf_cand"]:
        out["reason"] += (
            f"; NaN {out['nan_ref']}/{out['nan_cand']}, Inf {out['inf_ref']}/{out['inf_cand']}"
        )
    return out


def _compare_exact(ref: torch.Tensor, cand: torch.Tensor, out: dict[str, Any]) -> dict[str, Any]:
    """Integer and bool tensors: equal exactly, differences reported as integers."""
    n = ref.numel()
    same = ref == cand
    neq = n - int(same.sum())
    diff = (ref.to(torch.int64) - cand.to(torch.int64)).abs() if n else torch.zeros(0)
    out.update(
        equal_share=1.0 - neq / n if n else 1.0,
        allclose_share=1.0 - neq / n if n else 1.0,
        max_abs=float(diff.max()) if n else 0.0,
        mean_abs=float(diff.sum(dtype=torch.float64)) / n if n else 0.0,
        rmse=math.sqrt(float((diff.to(torch.float64) ** 2).sum()) / n) if n else 0.0,
        max_rel=0.0 if neq == 0 else math.inf,
        cosine=1.0 if neq == 0 else math.nan,
        max_ulp=None,
        mean_ulp=None,
        scale=float(ref.abs().max()) if n and ref.dtype != torch.bool else float(n > 0),
    )
    dtype_ok = ref.dtype == cand.dtype
    out["ok"] = neq == 0 and dtype_ok
    if neq:
        out["reason"] = f"{neq} of {n} elements differ (exact dtype)"
        out["layout"] = _layout(ref, cand, 0.0, 0.0) if ref.dim() >= 2 else None
    elif not dtype_ok:
        out["reason"] = f"dtype {out['dtype_ref']} vs {out['dtype_cand']}"
    return out


def _compare_plain(ref: Any, cand: Any) -> dict[str, Any]:
    """A pair where at least one side is not a tensor (None, number, string)."""
    rt = "tensor" if isinstance(ref, torch.Tensor) else type(ref).__name__
    ct = "tensor" if isinstance(cand, torch.Tensor) else type(cand).__name__
    if rt != ct or rt == "tensor":
        return {"ok": False, "reason": f"type {rt} vs {ct}", "kind": "plain"}
    same = ref == cand or (isinstance(ref, float) and math.isnan(ref) and math.isnan(cand))
    return {"ok": bool(same), "reason": "" if same else f"{ref!r} vs {cand!r}", "kind": "plain"}
