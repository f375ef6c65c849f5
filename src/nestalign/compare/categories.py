"""The state_dict-like categories: structure, batch/forward/loss, gradients and weights."""

from __future__ import annotations

from typing import Any

import torch

from nestalign import artifacts as art
from nestalign.compare.divergence import leaves
from nestalign.compare.reader import StepSource
from nestalign.compare.rows import MATCHED, _drop_ignored, _missing, _pairs, _summarise
from nestalign.compare.tolerances import _tol, gradient_atol, grads_scaled
from nestalign.namemap import NameMap

INIT_WEIGHTS = getattr(art, "INITIAL_WEIGHTS", "initial_weights.pt")


def _structure(ref: StepSource, cand: StepSource, name_map: NameMap) -> dict[str, Any]:
    ref_struct, cand_struct = ref.structure(), cand.structure()
    r_entries = {e["name"]: e for e in ref_struct.get("entries", [])}
    c_entries: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for e in cand_struct.get("entries", []):
        for ref_name, shape in name_map.map_shape(e["name"], e.get("shape") or []):
            c_entries[ref_name] = {**e, "shape": shape} if "shape" in e else dict(e)
            origin[ref_name] = e["name"]
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
    out["modules"] = _module_types(ref_struct, cand_struct, name_map)
    return out


def _module_types(ref_struct: dict, cand_struct: dict, name_map: NameMap) -> dict[str, Any]:
    """Module types by (mapped) module name: differences and modules present on one side only."""
    r = {m["name"]: m.get("type") for m in ref_struct.get("modules") or [] if "name" in m}
    c = {}
    for m in cand_struct.get("modules") or []:
        if "name" in m:
            c[m["name"] if m["name"] == "<root>" else name_map.map(m["name"])] = m.get("type")
    r = {n: t for n, t in r.items() if not name_map.ignored(n)}
    c = {n: t for n, t in c.items() if not name_map.ignored(n)}
    return {
        "compared": bool(r and c),
        "type_differences": [
            {"name": n, "ref": t, "cand": c[n]} for n, t in r.items() if n in c and c[n] != t
        ]
        if r and c
        else [],
        "only_ref": [n for n in r if n not in c] if r and c else [],
        "only_cand": [n for n in c if n not in r] if r and c else [],
    }


def _dict_category(
    ref: Any, cand: Any, tols: dict, category: str, name_map: NameMap | None
) -> dict[str, Any]:
    """Rows of a dict-like artifact; with a name map (state_dict-like items: grads, weights,
    init) the candidate's names and tensors go through it, transforms included."""
    ref_items = dict(leaves(ref)) if not isinstance(ref, torch.Tensor) else {category: ref}
    cand_items = dict(leaves(cand)) if not isinstance(cand, torch.Tensor) else {category: cand}
    ignored: list[str] = []
    origin: dict[str, str] = {}
    if name_map is not None:
        cand_items, origin = name_map.map_state(cand_items)
        ref_items = _drop_ignored(ref_items, name_map, ignored)
        cand_items = _drop_ignored(cand_items, name_map, ignored)
    atol, rtol = _tol(tols, category)
    # gradients and the optimizer's moments: atol scaled to each tensor's size (scaled_atol)
    scaled = category in ("grads", "optimizer") and grads_scaled(tols)
    atol_of = gradient_atol if scaled else None
    rows = _pairs(ref_items, cand_items, atol, rtol, atol_of)
    for row in rows:
        if origin.get(row["name"], row["name"]) != row["name"]:
            row["cand_name"] = origin[row["name"]]
    return _summarise(rows, ignored)


def _mark_noise(
    grads: dict[str, Any],
    weights: dict[str, Any] | None,
    factor: float,
    init: dict[str, Any] | None = None,
    step: Any = None,
    lr: Any = None,
    optimizer: dict[str, Any] | None = None,
) -> None:
    """Failing gradients far below their module's scale are rounding noise. A weight updated
    from such a gradient is noise too, but only if the update can explain its difference: its
    initial weight matched (when ``init``, the init category, was captured) and it differs by
    at most ``update_bound(step, lr)``. So is the optimizer state of such a parameter (its
    moments are running means of that gradient)."""
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
        init_rows = {r["name"]: r for r in init["rows"]} if init is not None else None
        bound, lr_max = update_bound(step, lr)
        for r in weights["rows"]:
            if r["status"] != "fail" or r["name"] not in noisy:
                continue
            why = []
            big = isinstance(r.get("max_abs"), (int, float)) and not r["max_abs"] <= (bound or 0)
            if bound is not None and big:
                steps = int(step) + 1
                n = "one step" if steps == 1 else f"{steps} steps"
                why.append(
                    f"differs by {r['max_abs']:.3g}, more than {n} of lr {lr_max:.3g} can move it"
                )
            if init_rows is not None:
                first = init_rows.get(r["name"])
                if first is None or first["status"] not in MATCHED:
                    why.append(
                        "initial weights differ" if first is not None else "no initial weight"
                    )
            if why:
                r["reason"] = "; ".join(why) + "; " + r.get("reason", "")
            else:
                r["status"] = "noise"
                r["reason"] = "updated from a gradient at noise level; " + r.get("reason", "")
    for r in optimizer["rows"] if optimizer is not None else []:
        param = r["name"].rpartition(":")[0]
        if r["status"] == "fail" and param in noisy:
            r["status"] = "noise"
            r["reason"] = "optimizer state of a gradient at noise level; " + r.get("reason", "")
    for cat in (grads, weights, optimizer):
        if cat is not None:
            cat.update(
                {k: v for k, v in _summarise(cat["rows"], cat["ignored"]).items() if k != "rows"}
            )


UPDATE_FACTOR = 4.0  # a weight may move by this many learning rates per step (Adam: ~1)


def update_bound(step: Any, lr: Any) -> tuple[float | None, float | None]:
    """(``UPDATE_FACTOR * (step + 1) * max(lr)``, max(lr)): how far the optimizer can have
    moved a weight by the end of ``step``; (None, None) when step or lr is unknown."""
    lrs = lr if isinstance(lr, (list, tuple)) else [lr]
    lrs = [float(x) for x in lrs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if not lrs or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, None
    return UPDATE_FACTOR * (step + 1) * max(lrs), max(lrs)


def _init_category(
    ref: StepSource, cand: StepSource, tols: dict, name_map: NameMap
) -> tuple[dict[str, Any] | None, str | None]:
    """The initial state (INIT_WEIGHTS) of both sides through the name map, or (None, why)
    when a side did not capture it."""
    absent = [
        side for side, src in (("reference", ref), ("candidate", cand)) if not src.has(INIT_WEIGHTS)
    ]
    if absent:
        return None, "no initial state captured" + (
            f" in the {absent[0]}" if len(absent) == 1 else ""
        )
    r = ref.tensors(INIT_WEIGHTS)
    c = cand.tensors(INIT_WEIGHTS)
    for obj, src in ((r, ref), (c, cand)):
        if not isinstance(obj, dict):
            raise art.ArtifactError(f"{src.path / INIT_WEIGHTS}: expected a dict of name -> tensor")
    return _dict_category(r, c, tols, "init", name_map), None
