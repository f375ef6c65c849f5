"""Module calls: one row per call for outputs and output gradients, then the divergence walk.

Calls are matched by (reference name, call index), candidate names going through the name map.
When two candidate calls map onto one reference call and one encloses the other (a port that
wraps a module in a container), the inner call takes the reference's place and the wrapper is a
note. Inputs and outputs are paired leaf by leaf with ``nestalign.align.pair_leaves`` (by name,
then by value; ``None`` and plain values passed by one side only are dropped), and each reference
tensor is rearranged into the candidate's layout before comparing: values that agree after a
permutation or a broadcast give the status ``layout`` (a note, counted as matched).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nestalign.align import call_inputs, leaves, pair_leaves, to_layout
from nestalign.compare import divergence
from nestalign.compare.rows import _missing, _summarise
from nestalign.compare.tolerances import _tol, grads_scaled, scaled_atol
from nestalign.metrics import compare_tensors
from nestalign.namemap import NameMap

MAX_LEAVES_LISTED = 8
NOISE_ULPS = 64.0  # a difference below NOISE_ULPS * eps * scale is floating-point noise


def fp_noise(m: dict[str, Any]) -> bool:
    """Whether a failing pair differs only by rounding: max abs within NOISE_ULPS eps of scale."""
    dtype = getattr(torch, str(m.get("dtype_ref") or ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return False
    if m.get("shape_ref") is None or m.get("dtype_ref") != m.get("dtype_cand"):
        return False
    top, scale = m.get("max_abs"), m.get("scale")
    if not isinstance(top, float) or not isinstance(scale, float) or math.isnan(top):
        return False
    return top <= NOISE_ULPS * torch.finfo(dtype).eps * scale


def _pair_metrics(
    ref: dict[str, Any], cand: dict[str, Any], atol, rtol, grads: bool = False
) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """Metrics per paired leaf (keyed by the reference path), transforms used, one-sided notes."""
    pairs, ref_only, cand_only = pair_leaves(ref, cand)
    results: dict[str, dict[str, Any]] = {}
    layouts = []
    for rp, cp in pairs:
        rv, cv = ref[rp], cand[cp]
        if isinstance(rv, torch.Tensor) and isinstance(cv, torch.Tensor):
            moved, how = to_layout(rv, cv) or (rv, "")
            if grads and how.startswith("expand"):
                # the candidate expanded a broadcast tensor: its gradient is the per-copy
                # share, the reference's is their sum
                moved, cv, how = rv, _sum_to(cv, rv.shape), "gradient summed over " + how
            a = atol
            if grads and moved.numel() and moved.is_floating_point():
                a = scaled_atol(atol, float(moved.detach().abs().max()))
            m = compare_tensors(moved, cv, a, rtol)
            if how:
                m["layout"] = how
                layouts.append(f"{rp}: {how}" + (f" (candidate {cp})" if cp != rp else ""))
            elif cp != rp:
                layouts.append(f"{rp} passed as {cp}")
        else:
            m = compare_tensors(rv, cv, atol, rtol)
        results[rp] = m
    notes = [f"{p} only in the reference" for p in ref_only]
    notes += [f"{p} only in the candidate" for p in cand_only]
    return results, layouts, notes


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed over the axes where ``shape`` is 1 (or absent), to ``shape``."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [
        lead + d for d, n in enumerate(shape) if n == 1 and t.shape[lead + d] != 1
    ]
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t


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
    bad = [(p, m) for p, m in results.items() if not m["ok"]]
    w["reason"] = f"{bad[0][0]}: {bad[0][1].get('reason', '')}" if bad else ""
    lay = [m.get("layout") for _, m in bad if m.get("layout")]
    w["layout"] = lay[0] if lay else None
    return w


def _grads_by_path(call: dict[str, Any], key: str = "grad_outputs") -> dict[str, Any]:
    """Output (or input) gradients keyed by the leaf they belong to; {} when none flowed."""
    grads = call.get(key)
    if not grads or all(g is None for g in grads):
        return {}
    values = call.get("outputs") if key == "grad_outputs" else call_inputs(call)
    prefix = "out" if key == "grad_outputs" else "in"
    paths = [p for p, v in leaves(values, prefix) if isinstance(v, torch.Tensor)]
    return {
        (paths[i] if i < len(paths) else f"grad[{i}]"): g
        for i, g in enumerate(grads)
        if g is not None
    }


def _inside(by_start: dict[int, dict], outer: dict, inner: dict) -> bool:
    """Whether ``inner`` ran inside ``outer`` (both candidate calls, found by start index)."""
    p, seen = inner.get("parent_start"), set()
    while p is not None and p not in seen:
        if p == outer.get("start"):
            return True
        seen.add(p)
        parent = by_start.get(p)
        p = parent.get("parent_start") if parent else None
    return False


def match_candidate(
    cand_calls: list[dict], name_map: NameMap, ignored: list[str]
) -> tuple[dict[tuple[str, int], dict], list[dict]]:
    """Candidate calls under reference keys (name through the map, recorded call index), and
    the wrappers that gave their key away to the call they wrap."""
    by_start = {c.get("start"): c for c in cand_calls}
    by_key: dict[tuple[str, int], dict] = {}
    wrappers: list[dict] = []
    for c in cand_calls:
        name = name_map.map(c["name"]) if c["name"] != "<root>" else c["name"]
        if name_map.ignored(name):
            ignored.append(c["name"])
            continue
        k = c["call"]
        prev = by_key.get((name, k))
        if prev is not None and _inside(by_start, prev, c):
            wrappers.append(prev)  # the inner call of a wrapper takes the reference's place
        elif prev is not None:
            while (name, k) in by_key:  # two candidate names mapped onto one reference name
                k += 1
        by_key[(name, k)] = c
    return by_key, wrappers


def _base(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"{call['name']}#{call['call']}",
        "module": call["name"],
        "call": call["call"],
        "type": call.get("type"),
        "parent": call.get("parent"),
        "start": call.get("start"),
        "end": call.get("end"),
    }


def _rng_same(r: dict, c: dict) -> bool | None:
    a, b = r.get("rng_state"), c.get("rng_state")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    return bool(a.shape == b.shape and torch.equal(a, b))


def _layers(
    ref_calls: list[dict], cand_calls: list[dict], tols: dict, name_map: NameMap
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Rows per module call for outputs (layers) and grad_outputs (layer_grads), and the
    divergence walk (which needs the reference tensors while they are loaded)."""
    ignored: list[str] = []
    cand_by_key, wrappers = match_candidate(cand_calls, name_map, ignored)
    forced = any(c.get("forced") for c in cand_calls)
    atol, rtol = _tol(tols, "layers")
    gatol, grtol = _tol(tols, "layer_grads")
    scale_grads = grads_scaled(tols)
    out_rows, grad_rows, kept = [], [], []
    seen = set()
    for call in ref_calls:
        key = (call["name"], call["call"])
        if name_map.ignored(call["name"]):
            ignored.append(call["name"])
            continue
        kept.append(call)
        base = _base(call)
        c = cand_by_key.get(key)
        if c is None:
            out_rows.append(
                {**base, **_missing(base["name"], "only_ref"), "rng_ref": call.get("rng")}
            )
            continue
        seen.add(key)
        r_in = dict(leaves(call_inputs(call), "in"))
        c_in = dict(leaves(call_inputs(c), "in"))
        in_res, in_layout, in_notes = _pair_metrics(r_in, c_in, atol, rtol)
        r_out = dict(leaves(call.get("outputs"), "out"))
        c_out = dict(leaves(c.get("outputs"), "out"))
        out_res, out_layout, out_notes = _pair_metrics(r_out, c_out, atol, rtol)
        out_fail = [p for p, m in out_res.items() if not m["ok"]]
        in_fail = [p for p, m in in_res.items() if not m["ok"]]
        missing_out = [n for n in out_notes if n.endswith("only in the reference")]
        layout = in_layout + out_layout
        status = "fail" if out_fail or missing_out else "layout" if layout else "pass"
        row = {
            **base,
            "cand_name": f"{c['name']}#{c['call']}",
            "status": status,
            "ok": status != "fail",
            "in_ok": not in_fail,
            "in_fail": in_fail[:MAX_LEAVES_LISTED],
            "out_fail": (out_fail + missing_out)[:MAX_LEAVES_LISTED],
            "out_leaf_ok": {p: m["ok"] for p, m in out_res.items()},
            "in_leaf_ok": {p: m["ok"] for p, m in in_res.items()},
            "in_noise": bool(in_fail) and all(fp_noise(in_res[p]) for p in in_fail),
            "out_noise": bool(out_fail) and all(fp_noise(out_res[p]) for p in out_fail),
            "in_worst": _worst({p: in_res[p] for p in in_fail}) if in_fail else None,
            "rng_ref": call.get("rng"),
            "rng_cand": c.get("rng"),
            "rng_same": _rng_same(call, c),
            "forced": bool(c.get("forced")),
            "notes": layout + in_notes + out_notes,
            **_worst(out_res),
        }
        if status == "layout":
            row["reason"] = "equal after " + "; ".join(layout)
        elif status == "fail" and not row["reason"] and missing_out:
            row["reason"] = "; ".join(missing_out)
        out_rows.append(row)
        rg, cg = _grads_by_path(call), _grads_by_path(c)
        rgi, cgi = _grads_by_path(call, "grad_inputs"), _grads_by_path(c, "grad_inputs")
        if not (rg or cg or rgi or cgi):
            continue  # no gradient flowed on either side (e.g. a featurizer under no_grad)
        g_res, g_layout, g_notes = _pair_metrics(rg, cg, gatol, grtol, grads=scale_grads)
        gi_res, _, _ = _pair_metrics(rgi, cgi, gatol, grtol, grads=scale_grads)
        g_fail = [p for p, m in g_res.items() if not m["ok"]]
        gi_fail = [p for p, m in gi_res.items() if not m["ok"]]
        g_missing = [n for n in g_notes if n.endswith("only in the reference")]
        bad = g_fail + g_missing + (gi_fail if forced else [])
        g_status = "fail" if bad else "layout" if g_layout else "pass"
        grad_rows.append(
            {
                **base,
                "status": g_status,
                "ok": g_status != "fail",
                "grad_fail": bad[:MAX_LEAVES_LISTED],
                "grad_leaf_ok": {p: m["ok"] for p, m in g_res.items()},
                "grad_noise": bool(g_fail) and all(fp_noise(g_res[p]) for p in g_fail),
                "grad_in_leaf_ok": {p: m["ok"] for p, m in gi_res.items()},
                "grad_in_noise": bool(gi_fail) and all(fp_noise(gi_res[p]) for p in gi_fail),
                **_worst({**g_res, **(gi_res if forced else {})}),
                **({"reason": "; ".join(g_missing)} if g_missing and not g_fail else {}),
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
            out_rows.append(
                {
                    **extra,
                    "name": f"{key[0]}#{key[1]}",
                    "status": "note",
                    "ok": True,
                    "reason": f"call only in the candidate ({c.get('type')})",
                }
            )
    for w in wrappers:
        out_rows.append(
            {
                "name": f"{w['name']}#{w['call']}",
                "module": w["name"],
                "call": w["call"],
                "type": w.get("type"),
                "parent": w.get("parent"),
                "status": "note",
                "ok": True,
                "reason": f"candidate wrapper ({w.get('type')}) around the matched call",
            }
        )
    div = divergence.analyse(kept, out_rows, grad_rows, forced=forced)
    culprits = {e["name"] for e in div.get("divergences", []) if e["class"] == "missing"}
    for r in out_rows:
        if r["status"] == "only_ref" and r["name"] not in culprits:
            r.update(
                status="note",
                ok=True,
                reason="call only in the reference"
                + (" (drew random numbers)" if r.get("rng_ref") else ""),
            )
    return _summarise(out_rows, ignored), _summarise(grad_rows, ignored), div
