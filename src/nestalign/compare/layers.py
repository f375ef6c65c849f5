"""Module calls: one row per call for outputs and output gradients, then the divergence walk."""

from __future__ import annotations

import math
from typing import Any

from nestalign.compare import divergence
from nestalign.compare.divergence import call_inputs, leaves
from nestalign.compare.rows import _missing, _summarise, tensor_paths
from nestalign.compare.tolerances import _tol
from nestalign.metrics import compare_tensors
from nestalign.namemap import NameMap

MAX_LEAVES_LISTED = 8


def _leaf_pairs(ref: Any, cand: Any, prefix: str) -> list[tuple[str, Any, Any, bool]]:
    """(path, ref value, cand value, present on both sides) for the union of leaf paths."""
    r = dict(leaves(ref, prefix))
    c = dict(leaves(cand, prefix))
    out = [(p, v, c.get(p), p in c) for p, v in r.items()]
    out += [(p, None, v, False) for p, v in c.items() if p not in r]
    return out


def _compare_leaves(pairs, atol, rtol) -> tuple[dict[str, dict[str, Any]], list[str]]:
    results = {}
    failing = []
    for path, rv, cv, both in pairs:
        if not both:
            m = {"ok": False, "reason": "leaf absent on one side"}
        else:
            m = compare_tensors(rv, cv, atol, rtol)
        results[path] = m
        if not m["ok"]:
            failing.append(path)
    return results, failing


def _worst(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def vals(key):
        out = [m.get(key) for m in results.values() if isinstance(m.get(key), (int, float))]
        return [v for v in out if not math.isnan(v)]

    w = {}
    for key in ("max_abs", "max_rel", "max_ulp"):
        v = vals(key)
        w[key] = max(v) if v else None
    v = vals("cosine")
    w["cosine"] = min(v) if v else None
    v = vals("allclose_share")
    w["allclose_share"] = min(v) if v else None
    bad = [m for m in results.values() if not m["ok"]]
    w["reason"] = bad[0].get("reason", "") if bad else ""
    lay = [m.get("layout") for m in bad if m.get("layout")]
    w["layout"] = lay[0] if lay else None
    return w


def _layers(
    ref_calls: list[dict], cand_calls: list[dict], tols: dict, name_map: NameMap
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Rows per module call for outputs (layers) and grad_outputs (layer_grads), and the
    divergence walk (which needs the reference tensors while they are loaded)."""
    ignored: list[str] = []
    counts: dict[str, int] = {}
    cand_by_key: dict[tuple[str, int], dict] = {}
    for c in cand_calls:
        name = name_map.map(c["name"])
        if name_map.ignored(name):
            ignored.append(c["name"])
            continue
        k = c["call"]
        while (name, k) in cand_by_key:  # two candidate names mapped onto one reference name
            k = counts[name] = max(counts.get(name, k), k) + 1
        cand_by_key[(name, k)] = c
    atol, rtol = _tol(tols, "layers")
    gatol, grtol = _tol(tols, "layer_grads")
    out_rows, grad_rows, kept = [], [], []
    seen = set()
    for call in ref_calls:
        key = (call["name"], call["call"])
        if name_map.ignored(call["name"]):
            ignored.append(call["name"])
            continue
        kept.append(call)
        base = {
            "name": f"{call['name']}#{call['call']}",
            "module": call["name"],
            "call": call["call"],
            "type": call.get("type"),
            "parent": call.get("parent"),
            "start": call.get("start"),
            "end": call.get("end"),
        }
        c = cand_by_key.get(key)
        if c is None:
            out_rows.append({**base, **_missing(base["name"], "only_ref")})
            if call.get("grad_outputs") is not None:
                grad_rows.append({**base, **_missing(base["name"], "only_ref")})
            continue
        seen.add(key)
        r_in, c_in = call_inputs(call), call_inputs(c)
        if not set(r_in) & set(c_in) and len(r_in) == len(c_in):  # renamed arguments
            c_in = dict(zip(r_in, c_in.values(), strict=True))
        in_res, in_fail = _compare_leaves(_leaf_pairs(r_in, c_in, "in"), atol, rtol)
        out_res, out_fail = _compare_leaves(
            _leaf_pairs(call.get("outputs"), c.get("outputs"), "out"), atol, rtol
        )
        row = {
            **base,
            "status": "fail" if out_fail else "pass",
            "ok": not out_fail,
            "in_ok": not in_fail,
            "in_fail": in_fail[:MAX_LEAVES_LISTED],
            "out_fail": out_fail[:MAX_LEAVES_LISTED],
            "out_leaf_ok": {p: m["ok"] for p, m in out_res.items()},
            "in_leaf_ok": {p: m["ok"] for p, m in in_res.items()},
            **_worst(out_res),
        }
        out_rows.append(row)
        rg, cg = call.get("grad_outputs"), c.get("grad_outputs")
        if rg is None and cg is None:
            continue
        paths = tensor_paths(call.get("outputs"), "out")
        r_g = {paths[i] if i < len(paths) else f"grad[{i}]": g for i, g in enumerate(rg or [])}
        c_g = {paths[i] if i < len(paths) else f"grad[{i}]": g for i, g in enumerate(cg or [])}
        g_res, g_fail = _compare_leaves(_leaf_pairs(r_g, c_g, ""), gatol, grtol)
        grad_rows.append(
            {
                **base,
                "status": "fail" if g_fail else "pass",
                "ok": not g_fail,
                "grad_fail": g_fail[:MAX_LEAVES_LISTED],
                "grad_leaf_ok": {p: m["ok"] for p, m in g_res.items()},
                **_worst(g_res),
            }
        )
    for key, c in cand_by_key.items():
        if key not in seen:
            extra = {
                "module": key[0],
                "call": key[1],
                "type": c.get("type"),
                "parent": c.get("parent"),
            }
            out_rows.append({**extra, **_missing(f"{key[0]}#{key[1]}", "only_cand")})
            if c.get("grad_outputs") is not None:
                grad_rows.append({**extra, **_missing(f"{key[0]}#{key[1]}", "only_cand")})
    div = divergence.analyse(kept, out_rows, grad_rows)
    return _summarise(out_rows, ignored), _summarise(grad_rows, ignored), div
