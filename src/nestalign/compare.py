"""Compare two captured steps (reference and candidate) category by category.

``compare_steps(ref_dir, cand_dir, tolerances, name_map=None)`` returns a plain dict (builtins
only, safe to pickle and to load with a restricted unpickler):

    format, reference, candidate, seed, step, verdict ("pass" | "fail" | "error"), errors,
    losses {reference, candidate}, tolerances, name_map,
    categories {structure, batch, forward, loss, grads, weights, layers, layer_grads}:
        matched, total, failed, noise, only_ref, only_cand, ignored, worst, rows, error
    divergence {forward, backward}: classes per call and the first culprit (nestalign.divergence)

Artifacts are loaded one pair at a time, memory-mapped, with ``weights_only=True``. A missing or
damaged artifact becomes an entry in ``errors`` (verdict "error") naming the file.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from nestalign import artifacts as art
from nestalign import divergence
from nestalign.divergence import call_inputs, leaves
from nestalign.metrics import compare_tensors
from nestalign.namemap import IDENTITY, NameMap

FORMAT = "nestalign.compare/1"
CATEGORIES = ("structure", "batch", "forward", "loss", "grads", "weights", "layers", "layer_grads")
TOLERANCE_KEYS = ("batch", "forward", "loss", "grads", "weights", "layers", "layer_grads")
NOISE_FACTOR = 1024.0  # a tensor below NOISE_FACTOR * eps * (its module's scale) is noise
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
MAX_LEAVES_LISTED = 8


# -- tolerances -------------------------------------------------------------------------------
class ToleranceError(ValueError):
    """A tolerance file that cannot be read or has unknown keys."""


def load_tolerances(
    path: str | os.PathLike | None = None, atol: float | None = None, rtol: float | None = None
) -> dict[str, Any]:
    """Tolerances as a plain dict: {atol, rtol, noise_factor, categories: {cat: {atol, rtol}}}.

    ``path`` is a YAML file, or the mapping itself inline (``'{atol: 0, rtol: 0}'``).

    None means "per dtype, as torch.testing.assert_close". The command line's atol/rtol are the
    global values; a category in the file overrides them for that category.
    """
    data: dict[str, Any] = {}
    if path is not None:
        inline = str(path).lstrip().startswith("{")  # a mapping given on the command line
        try:
            data = yaml.safe_load(str(path) if inline else Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ToleranceError(f"{path}: cannot read tolerances ({exc})") from exc
        unknown = set(data) - {"atol", "rtol", "noise_factor", "categories"}
        cats = data.get("categories") or {}
        unknown |= {f"categories.{c}" for c in set(cats) - set(TOLERANCE_KEYS)}
        if unknown:
            raise ToleranceError(f"{path}: unknown keys {sorted(unknown)}")
    out: dict[str, Any] = {
        "atol": _num(atol if atol is not None else data.get("atol"), path),
        "rtol": _num(rtol if rtol is not None else data.get("rtol"), path),
        "noise_factor": _num(data.get("noise_factor", NOISE_FACTOR), path),
        "categories": {},
    }
    for cat, tol in (data.get("categories") or {}).items():
        if not isinstance(tol, dict) or set(tol) - {"atol", "rtol"}:
            raise ToleranceError(f"{path}: categories.{cat} must be {{atol: A, rtol: R}}")
        out["categories"][cat] = {k: _num(v, path) for k, v in tol.items()}
    return out


def _num(value: Any, path: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ToleranceError(f"{path}: tolerance {value!r} is not a number") from exc


def _tol(tols: dict[str, Any], category: str) -> tuple[float | None, float | None]:
    cats = tols.get("categories", {})
    specific = cats.get(category) or (cats.get("grads") if category == "layer_grads" else None)
    specific = specific or {}
    return specific.get("atol", tols.get("atol")), specific.get("rtol", tols.get("rtol"))


# -- reading a step directory (this project's layout or the original tool's) ------------------
class StepSource:
    """One captured step directory; artifacts load one at a time and are never cached."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        if not self.path.is_dir():
            raise art.ArtifactError(f"{self.path}: not a step directory")
        self.original = (self.path / "layer_outputs.pkl").exists() and not (
            self.path / art.LAYERS
        ).exists()

    def metadata(self) -> dict[str, Any]:
        if (self.path / art.METADATA).exists():
            return art.load_json(self.path / art.METADATA)
        meta: dict[str, Any] = {}
        for path in (self.path.parent / "metadata.pkl", self.path / "metadata.pkl"):
            if self.original and path.exists():
                data = self._pickle(path)
                meta.update(data if isinstance(data, dict) else {})
        if "step" not in meta and self.path.name.removeprefix("step_").isdigit():
            meta["step"] = int(self.path.name.removeprefix("step_"))
        return meta

    def structure(self) -> dict[str, Any]:
        if not self.original:
            return art.load_json(self.path / art.STRUCTURE)
        for cand in (self.path / "model_structure.pkl", self.path.parent / "model_structure.pkl"):
            if cand.exists():
                return _original_structure(self._pickle(cand), cand)
        raise art.ArtifactError(f"{self.path}: no model_structure.pkl here or in the run dir")

    def tensors(self, name: str) -> Any:
        path = self.path / name
        if name == art.LAYERS and self.original:
            return _original_layers(self._pickle(self.path / "layer_outputs.pkl"))
        try:
            return art.load_tensors(path, mmap=True)
        except art.ArtifactError:
            if not (self.original and self.allow_pickle and path.is_file()):
                raise
            return self._pickle(path, torch_file=True)

    def _pickle(self, path: Path, torch_file: bool = False) -> Any:
        if not self.allow_pickle:
            raise art.ArtifactError(
                f"{path}: a pickle this project did not write; loading it runs code from the "
                "file, so it needs --allow-pickle"
            )
        warnings.warn(
            f"unpickling {path} (--allow-pickle): only do this for files you trust", stacklevel=2
        )
        try:
            if torch_file:
                return torch.load(path, map_location="cpu", weights_only=False)
            with open(path, "rb") as fh:
                return pickle.load(fh)
        except Exception as exc:
            raise art.ArtifactError(f"{path}: cannot be unpickled ({exc})") from exc


def _original_structure(data: Any, path: Path) -> dict[str, Any]:
    params = data.get("parameters") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        raise art.ArtifactError(f"{path}: expected a dict with 'parameters'")
    entries = []
    for name, info in params.items():
        info = info if isinstance(info, dict) else {}
        entries.append(
            {
                "name": str(name),
                "kind": "parameter",
                "shape": [int(s) for s in info.get("shape", [])],
                "dtype": str(info.get("dtype", "")).removeprefix("torch."),
                "requires_grad": bool(info.get("requires_grad", True)),
            }
        )
    return {"entries": entries}


def _original_layers(data: Any) -> list[dict[str, Any]]:
    """The original tool's {name: {forward_outputs, forward_inputs}} as module calls."""
    if not isinstance(data, dict):
        raise art.ArtifactError("layer_outputs.pkl: expected a dict of layer name -> record")
    calls = []
    for i, (name, rec) in enumerate(data.items()):
        rec = rec if isinstance(rec, dict) else {"forward_outputs": rec}
        inputs = rec.get("forward_inputs")
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        calls.append(
            {
                "name": str(name),
                "call": 0,
                "type": "",
                "parent": None,
                "start": i,
                "end": i,
                "input_names": [f"arg{k}" for k in range(len(inputs))],
                "inputs": inputs if rec.get("forward_inputs") is not None else [],
                "outputs": rec.get("forward_outputs"),
                "grad_outputs": None,
            }
        )
    return calls


# -- flattening and pair rows -----------------------------------------------------------------
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
    ref: dict[str, Any], cand: dict[str, Any], atol: float | None, rtol: float | None
) -> list[dict[str, Any]]:
    """Rows for every name on either side, reference order first."""
    rows = []
    for name, value in ref.items():
        if name in cand:
            rows.append(_row(name, compare_tensors(value, cand[name], atol, rtol)))
        else:
            rows.append(_missing(name, "only_ref"))
    rows += [_missing(n, "only_cand") for n in cand if n not in ref]
    return rows


def _summarise(rows: list[dict[str, Any]], ignored: list[str] | None = None) -> dict[str, Any]:
    matched = [r for r in rows if r["status"] in ("pass", "noise")]
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
        "failed": sum(r["status"] not in ("pass", "noise") for r in rows),
        "noise": [r["name"] for r in rows if r["status"] == "noise"],
        "only_ref": [r["name"] for r in rows if r["status"] == "only_ref"],
        "only_cand": [r["name"] for r in rows if r["status"] == "only_cand"],
        "ignored": list(ignored or []),
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


# -- categories -------------------------------------------------------------------------------
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


def _scalar(x: Any) -> float | None:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x.detach().double())
    if isinstance(x, (int, float)):
        return float(x)
    return None


# -- the step comparison ----------------------------------------------------------------------
def compare_steps(
    ref_dir: str | os.PathLike,
    cand_dir: str | os.PathLike,
    tolerances: dict[str, Any] | None = None,
    name_map: NameMap | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Compare one captured step of the reference with the candidate's (see module docstring)."""
    tols = tolerances or load_tolerances()
    nmap = name_map or IDENTITY
    result: dict[str, Any] = {
        "format": FORMAT,
        "ref_dir": str(ref_dir),
        "cand_dir": str(cand_dir),
        "reference": None,
        "candidate": None,
        "seed": None,
        "step": None,
        "verdict": "error",
        "errors": [],
        "losses": {"reference": None, "candidate": None},
        "tolerances": tols,
        "name_map": nmap.to_dict(),
        "categories": {},
        "divergence": divergence.empty(),
    }
    try:
        ref, cand = StepSource(ref_dir, allow_pickle), StepSource(cand_dir, allow_pickle)
    except art.ArtifactError as exc:
        result["errors"].append({"category": "all", "error": str(exc)})
        return result
    for side, src in (("reference", ref), ("candidate", cand)):
        try:
            meta = src.metadata()
        except art.ArtifactError as exc:
            result["errors"].append({"category": "metadata", "error": str(exc)})
            meta = {}
        result[side] = meta.get("framework") or src.path.parent.parent.name or side
        for key in ("seed", "step"):
            if result[key] is None and meta.get(key) is not None:
                result[key] = meta[key]
    cats = result["categories"]

    def guarded(category: str, fn, file: str) -> None:
        try:
            fn()
        except art.ArtifactError as exc:
            result["errors"].append({"category": category, "error": str(exc)})
            cats[category] = {**_summarise([]), "error": str(exc)}
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            msg = (
                f"{ref.path / file} or {cand.path / file}: unexpected content "
                f"({type(exc).__name__}: {exc})"
            )
            result["errors"].append({"category": category, "error": msg})
            cats[category] = {**_summarise([]), "error": msg}

    def structure() -> None:
        cats["structure"] = _structure(ref, cand, nmap)

    def simple(category: str, file: str, mapped: bool) -> None:
        r = ref.tensors(file)
        c = cand.tensors(file)
        if category == "loss":
            result["losses"] = {"reference": _scalar(r), "candidate": _scalar(c)}
        cats[category] = _dict_category(r, c, tols, category, nmap if mapped else None)

    def layers() -> None:
        r = ref.tensors(art.LAYERS)
        c = cand.tensors(art.LAYERS)
        for calls, src in ((r, ref), (c, cand)):
            if not isinstance(calls, list) or not all(
                isinstance(x, dict) and "name" in x and "call" in x for x in calls
            ):
                raise art.ArtifactError(
                    f"{src.path / art.LAYERS}: expected a list of module calls with name and call"
                )
        cats["layers"], cats["layer_grads"], result["divergence"] = _layers(r, c, tols, nmap)

    guarded("structure", structure, art.STRUCTURE)
    for category, file, mapped in (
        ("batch", art.BATCH, False),
        ("forward", art.FORWARD, False),
        ("loss", art.LOSS, False),
        ("grads", art.GRADS, True),
        ("weights", art.WEIGHTS, True),
    ):
        guarded(category, lambda c=category, f=file, m=mapped: simple(c, f, m), file)
    guarded("layers", layers, art.LAYERS)
    if "layer_grads" not in cats:
        cats["layer_grads"] = {**_summarise([]), "error": cats["layers"].get("error")}
    if cats["grads"].get("error") is None:
        weights = cats["weights"] if cats["weights"].get("error") is None else None
        _mark_noise(cats["grads"], weights, tols.get("noise_factor") or NOISE_FACTOR)
    if result["errors"]:
        result["verdict"] = "error"
    elif any(cats[c]["failed"] for c in CATEGORIES):
        result["verdict"] = "fail"
    else:
        result["verdict"] = "pass"
    return result


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: verdict, per-category counts, first culprits."""
    lines = [
        f"{result['reference']} vs {result['candidate']} seed={result['seed']} "
        f"step={result['step']}: {result['verdict'].upper()}"
    ]
    for err in result["errors"]:
        lines.append(f"  error [{err['category']}]: {err['error']}")
    for cat in CATEGORIES:
        c = result["categories"].get(cat)
        if not c or c.get("error"):
            continue
        w = c["worst"]
        lines.append(
            f"  {cat:<12} {c['matched']}/{c['total']} matched"
            + (f", worst max_rel {w['max_rel']:.3g} ({w['item']})" if w.get("max_rel") else "")
            + (f", {len(c['noise'])} at noise level" if c["noise"] else "")
        )
    for direction in ("forward", "backward"):
        first = result["divergence"][direction]["first"]
        if first:
            lines.append(f"  first {direction} culprit: {first['where']}")
    return lines


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` through a temporary file beside ``path`` and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_result(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Pickle the result (plain builtins only) atomically."""
    write_atomic(path, pickle.dumps(result, protocol=4))


def seed_sections(result: dict[str, Any], limit: int = 10) -> list[str]:
    """The five sections of the original comparison tool: counts, match rates, mismatches."""
    cats = result["categories"]
    lines: list[str] = []

    def head(title: str) -> None:
        lines.extend(["", "=" * 80, title, "=" * 80])

    def counts(cat: str) -> None:
        c = cats.get(cat) or {}
        if c.get("error"):
            lines.append(f"  ERROR: {c['error']}")
            return
        total, matched = c.get("total", 0), c.get("matched", 0)
        rate = 100.0 * matched / total if total else 0.0
        lines.append(f"  items: {total}  matched: {matched} ({rate:.2f}%)")
        lines.append(
            f"  only in {result['reference']}: {len(c.get('only_ref', []))}  "
            f"only in {result['candidate']}: {len(c.get('only_cand', []))}"
        )
        if c.get("noise"):
            lines.append(f"  at noise level: {len(c['noise'])}")
        bad = [r for r in c.get("rows", []) if r["status"] not in ("pass", "noise")]
        for r in bad[:limit]:
            lines.append(f"  Mismatch: {r['name']}: {r.get('reason', '')}")
            if isinstance(r.get("max_abs"), float) and not math.isnan(r["max_abs"]):
                lines.append(
                    f"    max abs {r['max_abs']:.3e}  max rel {r.get('max_rel', math.nan):.3e}"
                    f"  cosine {r.get('cosine', math.nan):.8f}"
                )
        if len(bad) > limit:
            lines.append(f"  ... and {len(bad) - limit} more")

    head("1. Model structure")
    counts("structure")
    s = cats.get("structure") or {}
    if s.get("first_order_difference"):
        d = s["first_order_difference"]
        lines.append(f"  order differs from position {d['index']}: {d['ref']} vs {d['cand']}")
    head("2. Forward output")
    counts("forward")
    head("3. Loss")
    loss = result["losses"]
    lines.append(
        f"  {result['reference']}: {loss['reference']}  {result['candidate']}: {loss['candidate']}"
    )
    counts("loss")
    head("4. Parameter gradients")
    counts("grads")
    head("5. Layer outputs")
    counts("layers")
    for direction in ("forward", "backward"):
        first = result["divergence"][direction]["first"]
        if first:
            lines.append(f"  first {direction} culprit: {first['where']}")
    return lines
