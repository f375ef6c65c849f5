"""The state_dict-like categories: structure, batch/forward/loss, gradients and weights."""

from __future__ import annotations

from typing import Any

import torch

from nestalign.compare.divergence import leaves
from nestalign.compare.reader import StepSource
from nestalign.compare.rows import _drop_ignored, _mapped, _missing, _pairs, _summarise
from nestalign.compare.tolerances import _tol
from nestalign.namemap import NameMap


def _structure(ref: StepSource, cand: StepSource, name_map: NameMap) -> dict[str, Any]:
    r_entries = {e["name"]: e for e in ref.structure().get("entries", [])}
    c_entries, origin = _mapped(
        {e["name"]: e for e in cand.structure().get("entries", [])}, name_map
    )
    ignored: list[str] = []
    r_entries = _drop_ignored(r_entries, name_map, ignored)
    c_entries = _drop_ignored(c_entries, name_map, ignored)
    rows = []
    for name, e in r_entries.items():
        if name not in c_entries:
            rows.append(_missing(name, "only_ref"))
            continue
        c = c_entries[name]
        diffs = [
            f"{k} {e.get(k)} vs {c.get(k)}"
            for k in ("kind", "shape", "dtype", "requires_grad")
            if e.get(k) != c.get(k)
        ]
        rows.append(
            {
                "name": name,
                "cand_name": origin[name],
                "status": "fail" if diffs else "pass",
                "ok": not diffs,
                "reason": "; ".join(diffs),
                "shape_ref": e.get("shape"),
                "shape_cand": c.get("shape"),
                "dtype_ref": e.get("dtype"),
                "dtype_cand": c.get("dtype"),
            }
        )
    rows += [_missing(n, "only_cand") for n in c_entries if n not in r_entries]
    out = _summarise(rows, ignored)
    common_ref = [n for n in r_entries if n in c_entries]
    common_cand = [n for n in c_entries if n in r_entries]
    pairs = zip(common_ref, common_cand, strict=True)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    out["order_same"] = first is None
    out["first_order_difference"] = (
        None
        if first is None
        else {"index": first, "ref": common_ref[first], "cand": common_cand[first]}
    )
    return out


def _dict_category(
    ref: Any, cand: Any, tols: dict, category: str, name_map: NameMap | None
) -> dict[str, Any]:
    ref_items = dict(leaves(ref)) if not isinstance(ref, torch.Tensor) else {category: ref}
    cand_items = dict(leaves(cand)) if not isinstance(cand, torch.Tensor) else {category: cand}
    ignored: list[str] = []
    origin: dict[str, str] = {}
    if name_map is not None:
        cand_items, origin = _mapped(cand_items, name_map)
        ref_items = _drop_ignored(ref_items, name_map, ignored)
        cand_items = _drop_ignored(cand_items, name_map, ignored)
    atol, rtol = _tol(tols, category)
    rows = _pairs(ref_items, cand_items, atol, rtol)
    for row in rows:
        if origin.get(row["name"], row["name"]) != row["name"]:
            row["cand_name"] = origin[row["name"]]
    return _summarise(rows, ignored)


def _mark_noise(grads: dict[str, Any], weights: dict[str, Any] | None, factor: float) -> None:
    """Failing gradients far below their module's scale are rounding noise, and so are the
    weight updates Adam made from them."""
    rows = grads["rows"]
    by_module: dict[str, list[float]] = {}
    for r in rows:
        if r.get("scale") is not None:
            by_module.setdefault(r["name"].rpartition(".")[0], []).append(r["scale"])
    top = max((max(v) for v in by_module.values()), default=0.0)
    noisy = set()
    for r in rows:
        if r["status"] not in ("pass", "fail") or r.get("scale") is None:
            continue
        if r["status"] == "pass" and r.get("equal_share") == 1.0:
            continue
        if r.get("shape_ref") != r.get("shape_cand") or r.get("dtype_ref") != r.get("dtype_cand"):
            continue
        dtype = getattr(torch, r.get("dtype_ref") or "", None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            continue
        scales = sorted(by_module[r["name"].rpartition(".")[0]], reverse=True)
        siblings = scales[1] if scales[0] == r["scale"] and len(scales) > 1 else scales[0]
        ref_scale = siblings if siblings > r["scale"] else top
        if r["scale"] <= factor * torch.finfo(dtype).eps * ref_scale:
            r["status"] = "noise"
            r["reason"] = f"gradient at noise level ({r['scale']:.3g} vs scale {ref_scale:.3g})"
            noisy.add(r["name"])
    if weights is not None:
        for r in weights["rows"]:
            if r["status"] == "fail" and r["name"] in noisy:
                r["status"] = "noise"
                r["reason"] = "updated from a gradient at noise level; " + r.get("reason", "")
    for cat in (grads, weights):
        if cat is not None:
            cat.update(
                {k: v for k, v in _summarise(cat["rows"], cat["ignored"]).items() if k != "rows"}
            )
