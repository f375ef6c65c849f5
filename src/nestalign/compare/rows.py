"""Rows of one category: a pair of items per name, missing items, and the category summary."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from nestalign.compare.divergence import leaves
from nestalign.metrics import compare_tensors
from nestalign.namemap import NameMap

ROW_KEYS = (
    "ok",
    "reason",
    "shape_ref",
    "shape_cand",
    "dtype_ref",
    "dtype_cand",
    "numel",
    "equal_share",
    "max_abs",
    "max_rel",
    "mean_abs",
    "rmse",
    "cosine",
    "allclose_share",
    "max_ulp",
    "mean_ulp",
    "nan_ref",
    "nan_cand",
    "inf_ref",
    "inf_cand",
    "scale",
    "layout",
    "atol",
    "rtol",
)


def tensor_paths(obj: Any, prefix: str = "") -> list[str]:
    return [p for p, v in leaves(obj, prefix) if isinstance(v, torch.Tensor)]


def _row(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"name": name, "status": "pass" if metrics["ok"] else "fail"}
    row.update({k: metrics.get(k) for k in ROW_KEYS if k in metrics})
    return row


def _missing(name: str, side: str) -> dict[str, Any]:
    where = "candidate" if side == "only_ref" else "reference"
    return {"name": name, "status": side, "ok": False, "reason": f"absent in the {where}"}


def _pairs(
    ref: dict[str, Any],
    cand: dict[str, Any],
    atol: float | None,
    rtol: float | None,
    atol_of: Callable[[float | None, Any], float | None] | None = None,
) -> list[dict[str, Any]]:
    """Rows for every name on either side, reference order first. ``atol_of(atol, ref_value)``
    gives a tensor's own atol (gradients: scaled with the reference's size)."""
    rows = []
    for name, value in ref.items():
        if name in cand:
            a = atol_of(atol, value) if atol_of is not None else atol
            rows.append(_row(name, compare_tensors(value, cand[name], a, rtol)))
        else:
            rows.append(_missing(name, "only_ref"))
    rows += [_missing(n, "only_cand") for n in cand if n not in ref]
    return rows


MATCHED = ("pass", "noise", "layout")  # layout: equal after a permutation or broadcast
FAILED = ("fail", "only_ref", "only_cand")
NOTED = ("layout", "note")  # listed as notes; "note" rows neither match nor fail


def _summarise(rows: list[dict[str, Any]], ignored: list[str] | None = None) -> dict[str, Any]:
    matched = [r for r in rows if r["status"] in MATCHED]
    compared = [r for r in rows if r["status"] in ("pass", "fail")]
    worst: dict[str, Any] = {}
    for key, pick in (("max_abs", max), ("max_rel", max), ("max_ulp", max)):
        vals = [r[key] for r in compared if isinstance(r.get(key), (int, float))]
        vals = [v for v in vals if not math.isnan(v)]
        worst[key] = pick(vals) if vals else None
    for key in ("cosine", "allclose_share"):
        vals = [r[key] for r in compared if isinstance(r.get(key), (int, float))]
        vals = [v for v in vals if not math.isnan(v)]
        worst["min_" + key] = min(vals) if vals else None
    rel = [r for r in compared if isinstance(r.get("max_rel"), (int, float))]
    top = max(rel, key=lambda r: r["max_rel"]) if rel else None
    worst["item"] = top["name"] if top and top["max_rel"] > 0 else None
    return {
        "matched": len(matched),
        "total": len(rows),
        "failed": sum(r["status"] in FAILED for r in rows),
        "noise": [r["name"] for r in rows if r["status"] == "noise"],
        "only_ref": [r["name"] for r in rows if r["status"] == "only_ref"],
        "only_cand": [r["name"] for r in rows if r["status"] == "only_cand"],
        "ignored": list(ignored or []),
        "notes": [
            {"name": r["name"], "reason": r.get("reason") or r["status"]}
            for r in rows
            if r["status"] in NOTED
        ],
        "worst": worst,
        "rows": rows,
        "error": None,
    }


def _mapped(items: dict[str, Any], name_map: NameMap) -> tuple[dict[str, Any], dict[str, str]]:
    """Candidate items under reference names, and reference name -> original candidate name."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, value in items.items():
        ref_name = name_map.map(name)
        out[ref_name] = value
        origin[ref_name] = name
    return out, origin


def _drop_ignored(items: dict[str, Any], name_map: NameMap, ignored: list[str]) -> dict:
    kept = {}
    for name, value in items.items():
        if name_map.ignored(name):
            ignored.append(name)
        else:
            kept[name] = value
    return kept
