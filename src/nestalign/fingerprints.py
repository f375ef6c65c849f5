"""Compare fingerprint captures (``capture=fingerprint``): verdicts from hashes and statistics.

A fingerprint capture keeps, per tensor, its hash and ``artifacts.tensor_stats`` (sum, sum of
magnitudes, L2 norm, minimum, maximum), never its bytes. Two tensors pass elementwise at
(atol, rtol), ``|c - r| <= atol + rtol * |r|`` everywhere, only if

    |sum c - sum r|, |abs_sum c - abs_sum r|  <=  n * atol + rtol * abs_sum r
    |norm c - norm r|                         <=  sqrt(n) * atol + rtol * norm r
    |max c - max r|, |min c - min r|          <=  atol + rtol * scale r

so a statistic outside its bound proves the full compare would fail that tensor, and equal hashes
prove it identical. Per tensor: ``identical``, ``fail`` (a bound broken, or dtype, size or NaN/Inf
counts differ), ``close`` (every bound kept: not a proof) or ``unchecked`` (no statistics: NaN or
Inf present, complex, a fused tensor a name map splits, a call without a counterpart).

A step is PASS when every tensor is identical and none unchecked, FAIL when the loss or any tensor
fails, CLOSE otherwise. A run's ``localise`` step, the one the workflow captures again in full, is
its first FAIL step, else its first CLOSE step (None when every step passes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nestalign import artifacts as art
from nestalign.compare.categories import _mark_noise
from nestalign.compare.layers import match_candidate
from nestalign.compare.step import metadata_differences
from nestalign.compare.tolerances import _tol, grads_scaled, load_tolerances, scaled_atol
from nestalign.metrics import DEFAULT_TOLERANCES
from nestalign.namemap import NameMap, NameMapError

FORMAT = 1
SLACK = 1e-12  # relative rounding allowance of the float64 statistics (different summation orders)
LISTED = 10  # failing tensors kept per step
SCALED = ("grads", "layer_grads", "optimizer")  # categories whose atol scales with the reference
EXACT = ("rng",)
NOISY = ("grads", "weights", "optimizer")  # where a noise-level gradient's parameter is not failed
_DEFAULTS = {str(k).removeprefix("torch."): v for k, v in DEFAULT_TOLERANCES.items()}
STATUSES = ("identical", "close", "fail", "unchecked")


def _with_defaults(dtype: str, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """(atol, rtol), each None replaced by ``dtype``'s assert_close default (metrics)."""
    default_rtol, default_atol = _DEFAULTS.get(dtype, (0.0, 0.0))
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


class FingerprintError(RuntimeError):
    """A step directory that is not a readable fingerprint capture."""


def load_step(step_dir: str | os.PathLike) -> dict[str, Any]:
    """metadata and, per tensor file, its skeleton with each tensor mark replaced by the tensor's
    fingerprint (``{"file": {...}}``)."""
    step_dir = Path(step_dir)
    try:
        meta = art.load_json(step_dir / art.METADATA)
        index = art.load_json(step_dir / art.INDEX)
    except art.ArtifactError as exc:
        raise FingerprintError(str(exc)) from None
    if index.get("mode") != "fingerprint":
        raise FingerprintError(
            f"{step_dir}: not a fingerprint capture (capture=fingerprint); "
            "compare a full capture with scripts/compare.py"
        )
    try:
        files = {
            name: _resolve(index["skeletons"][name], entries)
            for name, entries in index["files"].items()
        }
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise FingerprintError(
            f"{step_dir / art.INDEX}: damaged fingerprint index ({exc!r})"
        ) from None
    return {"dir": str(step_dir), "meta": meta, "files": files}


def _resolve(skeleton: Any, entries: list[dict[str, Any]]) -> Any:
    return art.fill_skeleton(skeleton, lambda i: {**entries[i], art.TENSOR_MARK: True})


def _is_fp(x: Any) -> bool:
    return isinstance(x, dict) and x.get(art.TENSOR_MARK) is True


def _leaves(x: Any) -> Iterator[dict[str, Any]]:
    if _is_fp(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)


def judge(
    r: dict[str, Any],
    c: dict[str, Any],
    atol: float | None,
    rtol: float | None,
    scaled: bool = False,
) -> tuple[str, str]:
    """(status, reason) of one pair of fingerprints (see the module docstring)."""
    same_layout = r["shape"] == c["shape"]
    if art.same_bytes(r, c):
        return "identical", ""
    if r["dtype"] != c["dtype"]:
        return "fail", f"dtype {r['dtype']} vs {c['dtype']}"
    n = math.prod(r["shape"])
    if n != math.prod(c["shape"]):
        if _broadcasts(r["shape"], c["shape"]):  # an expanded copy compares after summing
            return "unchecked", f"shape {r['shape']} vs {c['shape']} (broadcast)"
        return "fail", f"shape {r['shape']} vs {c['shape']}"
    if (r["nan"], r["inf"]) != (c["nan"], c["inf"]):
        return "fail", f"NaN/Inf counts {r['nan']}/{r['inf']} vs {c['nan']}/{c['inf']}"
    a, b = r.get("stats"), c.get("stats")
    if a is None or b is None:
        return "unchecked", "no statistics (NaN/Inf, complex or empty)"
    atol, rtol = _with_defaults(r["dtype"], atol, rtol)
    if scaled:
        atol = scaled_atol(atol, r.get("scale"))
    scale = r.get("scale") or 0.0
    bounds = {
        "sum": n * atol + rtol * a["abs_sum"],
        "abs_sum": n * atol + rtol * a["abs_sum"],
        "norm": math.sqrt(n) * atol + rtol * a["norm"],
        "max": atol + rtol * scale,
        "min": atol + rtol * scale,
    }
    slack = {  # the extremes are exact
        "sum": SLACK * (a["abs_sum"] + b["abs_sum"]),
        "abs_sum": SLACK * (a["abs_sum"] + b["abs_sum"]),
        "norm": SLACK * (a["norm"] + b["norm"]),
    }
    for key, bound in bounds.items():
        diff = abs(b[key] - a[key])
        if diff > bound + slack.get(key, 0.0):
            return "fail", f"{key} differs by {diff:.3g} (bound {bound:.3g})"
    note = "" if same_layout else f" (shape {r['shape']} vs {c['shape']})"
    return "close", f"statistics within bounds{note}"


def _broadcasts(a: list[int], b: list[int]) -> bool:
    """Whether one shape expands to the other (numpy's broadcasting rules)."""
    return len(a) == len(b) and all(x == y or 1 in (x, y) for x, y in zip(a, b, strict=True))


def _noisy(ref: dict[str, Any], cand: dict[str, Any], factor: float) -> set[str]:
    """The parameters whose gradient the full compare would call rounding noise if it failed
    (categories._mark_noise on each gradient's scale)."""
    rows = []
    for name, r in ref.items():
        c = cand.get(name)
        if _is_fp(r) and _is_fp(c) and r.get("scale") is not None:
            rows.append(
                {
                    "name": name,
                    "status": "fail",
                    "scale": max(r["scale"], c.get("scale") or 0.0),
                    "shape_ref": r["shape"],
                    "shape_cand": c["shape"],
                    "dtype_ref": r["dtype"],
                    "dtype_cand": c["dtype"],
                }
            )
    _mark_noise({"rows": rows, "ignored": []}, None, factor)
    return {r["name"] for r in rows if r["status"] == "noise"}


class _Step:
    """The per-tensor judgements of one step, by category."""

    def __init__(self, tols: dict[str, Any]):
        self.tols = tols
        self.counts: dict[str, dict[str, int]] = {}
        self.failing: list[str] = []
        self.failed = 0
        self.noisy: set[str] = set()

    def pair(self, cat: str, name: str, r: Any, c: Any) -> str:
        counts = self.counts.setdefault(cat, dict.fromkeys(STATUSES, 0))
        if not (_is_fp(r) or _is_fp(c)):
            if r == c:  # no tensor on either side (a gradient that flowed nowhere)
                return "identical"
            status, reason = "unchecked", "not a tensor"
        elif not (_is_fp(r) and _is_fp(c)):
            status, reason = "unchecked", "no counterpart"
        else:
            atol, rtol = (0.0, 0.0) if cat in EXACT else _tol(self.tols, cat)
            scaled = cat in SCALED and grads_scaled(self.tols)
            status, reason = judge(r, c, atol, rtol, scaled)
            if status == "fail" and cat in NOISY and name.split(":")[0] in self.noisy:
                status = "close"  # the full compare's verdict on it: at noise level
        counts[status] += 1
        if status == "fail":
            self.failed += 1
            if len(self.failing) < LISTED:
                self.failing.append(f"[{cat}] {name}: {reason}")
        return status

    def leaves(self, cat: str, label: str, ref: Any, cand: Any) -> None:
        """The tensors of two containers, paired in order (generator states)."""
        for i, (a, b) in enumerate(zip(_leaves(ref), _leaves(cand), strict=False)):
            self.pair(cat, f"{label}[{i}]", a, b)

    def named(self, cat: str, ref: dict, cand: dict, nmap: NameMap) -> None:
        """Tensors keyed by state_dict name (candidate names through the name map)."""
        mapped = _mapped(cand, nmap)
        for name, r in ref.items():
            if not nmap.ignored(name):
                self.pair(cat, name, r, mapped.get(name))

    def summary(self) -> dict[str, int]:
        total = dict.fromkeys(STATUSES, 0)
        for counts in self.counts.values():
            for k, v in counts.items():
                total[k] += v
        return total


def _mapped(cand: dict[str, Any], nmap: NameMap) -> dict[str, Any]:
    """Candidate fingerprints under reference names; a fused tensor that the name map splits
    gives each part None (the parts' statistics are unknown)."""
    out: dict[str, Any] = {}
    for name, value in cand.items():
        if not _is_fp(value):
            out[nmap.map(name)] = value
            continue
        parts = nmap.map_shape(name, value["shape"])
        for ref_name, _ in parts:
            out[ref_name] = value if len(parts) == 1 else None
    return out


def compare_step(
    ref_dir: str | os.PathLike,
    cand_dir: str | os.PathLike,
    tolerances: dict[str, Any] | None = None,
    name_map: NameMap | None = None,
) -> dict[str, Any]:
    """The fingerprint verdict of one step: plain builtins (see docs/compare.md)."""
    tols = tolerances or load_tolerances()
    nmap = name_map or NameMap()
    ref, cand = load_step(ref_dir), load_step(cand_dir)
    rm, cm = ref["meta"], cand["meta"]
    out: dict[str, Any] = {
        "format": FORMAT,
        "ref_dir": str(ref_dir),
        "cand_dir": str(cand_dir),
        "reference": rm.get("framework"),
        "candidate": cm.get("framework"),
        "seed": rm.get("seed"),
        "step": rm.get("step"),
        "losses": {"reference": rm.get("loss"), "candidate": cm.get("loss")},
        "errors": [],
    }
    differs = metadata_differences(rm, cm)
    if differs:
        out.update(verdict="error", errors=[f"metadata differs: {'; '.join(differs)}"])
        return out
    s = _Step(tols)
    rf, cf = ref["files"], cand["files"]
    s.noisy = _noisy(
        rf.get(art.GRADS) or {}, _mapped(cf.get(art.GRADS) or {}, nmap), tols["noise_factor"]
    )
    for cat, file in (("batch", art.BATCH), ("forward", art.FORWARD), ("loss", art.LOSS)):
        r, c = rf.get(file), cf.get(file)
        if _is_fp(r) or _is_fp(c):
            s.pair(cat, cat, r, c)
        else:
            for name, value in (r or {}).items():
                s.pair(cat, name, value, (c or {}).get(name))
    for cat, file in (
        ("init", art.INITIAL_WEIGHTS),
        ("grads", art.GRADS),
        ("weights", art.WEIGHTS),
    ):
        s.named(cat, rf.get(file) or {}, cf.get(file) or {}, nmap)
    first = _layers(s, rf.get(art.LAYERS) or [], cf.get(art.LAYERS) or [], nmap)
    _training(s, rf.get(art.TRAINING_STATE) or {}, cf.get(art.TRAINING_STATE) or {}, nmap)
    rng_r, rng_c = rf.get(art.INITIAL_RNG) or {}, cf.get(art.INITIAL_RNG) or {}
    for key, value in rng_r.items():
        s.leaves("rng", f"initial {key}", value, rng_c.get(key))
    loss_fails = _loss_fails(out["losses"], tols)
    totals = s.summary()
    if loss_fails:
        s.failing.insert(0, f"[loss] loss: {loss_fails}")
    verdict = (
        "fail"
        if loss_fails or totals["fail"]
        else "pass"
        if not totals["close"] and not totals["unchecked"]
        else "close"
    )
    out.update(
        verdict=verdict,
        counts=totals,
        categories=s.counts,
        failing=s.failing,
        failed=s.failed + bool(loss_fails),
        first=first,
    )
    return out


def _loss_fails(losses: dict[str, Any], tols: dict[str, Any]) -> str:
    a, b = losses["reference"], losses["candidate"]
    if not isinstance(a, float) or not isinstance(b, float):
        return "" if a == b else f"{a} vs {b}"
    atol, rtol = _with_defaults("float32", *_tol(tols, "loss"))  # the metadata's float32 loss
    return "" if abs(a - b) <= atol + rtol * abs(a) else f"{a!r} vs {b!r}"


def _layers(s: _Step, ref_calls: list, cand_calls: list, nmap: NameMap) -> dict[str, Any]:
    """Judge each reference call's outputs and the gradients into them; the first forward
    difference (earliest failing call to complete) and the first backward one (the failing
    gradient closest to the loss)."""
    by_key, _ = match_candidate(cand_calls, nmap, [])
    forward = backward = None
    for r in ref_calls:
        if nmap.ignored(r["name"]):
            continue
        name = f"{r['name']}#{r['call']}"
        c = by_key.get((r["name"], r["call"]))
        for key, cat in (("outputs", "layers"), ("grad_outputs", "layer_grads")):
            ref_leaves = list(_leaves(r.get(key)))
            cand_leaves = list(_leaves(c.get(key))) if c is not None else None
            if cand_leaves is None or len(cand_leaves) != len(ref_leaves):
                for i, leaf in enumerate(ref_leaves):
                    s.pair(cat, f"{name} {key}[{i}]", leaf, None)
                continue
            failed = [
                s.pair(cat, f"{name} {key}[{i}]", a, b)
                for i, (a, b) in enumerate(zip(ref_leaves, cand_leaves, strict=True))
            ].count("fail")
            end = r.get("end", 0)
            if failed and key == "outputs" and (forward is None or end < forward[0]):
                forward = (end, name)
            if failed and key == "grad_outputs" and (backward is None or end > backward[0]):
                backward = (end, name)
    # a forward difference changes every gradient after it: backward is named only without one
    return {
        "forward": forward and forward[1],
        "backward": None if forward else backward and backward[1],
    }


def _training(s: _Step, ref: dict, cand: dict, nmap: NameMap) -> None:
    r_opt = (ref.get("optimizer") or {}).get("state") or {}
    c_opt = {nmap.map(k): v for k, v in ((cand.get("optimizer") or {}).get("state") or {}).items()}
    for param, entry in r_opt.items():
        for key, value in entry.items():
            if _is_fp(value):
                other = (c_opt.get(param) or {}).get(key)
                s.pair("optimizer", f"{param}:{key}", value, other)
    if _is_fp(ref.get("grad_norm")):
        s.pair("optimizer", "grad_norm", ref["grad_norm"], cand.get("grad_norm"))
    if ref.get("lr_applied") != cand.get("lr_applied"):
        s.pair("optimizer", "lr_applied", ref.get("lr_applied"), cand.get("lr_applied"))
    for key in ("rng_before", "rng_after"):
        s.leaves("rng", key, ref.get(key), cand.get(key))


def compare_run(
    ref_run: str | os.PathLike,
    cand_run: str | os.PathLike,
    steps: list[int],
    tolerances: dict[str, Any] | None = None,
    name_map: NameMap | None = None,
) -> dict[str, Any]:
    """Every step of one seed's two runs, and the step to capture again in full."""
    results = []
    for step in steps:
        try:
            results.append(
                compare_step(
                    art.step_dir(ref_run, step), art.step_dir(cand_run, step), tolerances, name_map
                )
            )
        except (FingerprintError, NameMapError) as exc:
            results.append({"step": step, "verdict": "error", "errors": [str(exc)], "first": {}})
    fails = [r["step"] for r in results if r["verdict"] == "fail"]
    close = [r["step"] for r in results if r["verdict"] == "close"]
    return {
        "format": FORMAT,
        "reference": str(ref_run),
        "candidate": str(cand_run),
        "steps": results,
        "localise": fails[0] if fails else close[0] if close else None,
    }


def step_lines(result: dict[str, Any]) -> list[str]:
    """Terminal lines of one step (docs/compare.md, fingerprint compare)."""
    head = f"step {result['step']}: {result['verdict'].upper()}"
    if result["verdict"] == "error":
        return [head, *(f"  error: {e}" for e in result["errors"])]
    c = result["counts"]
    total = sum(c.values())
    losses = result["losses"]
    lines = [
        f"{head} ({c['identical']} identical, {c['close']} close, {c['fail']} failing, "
        f"{c['unchecked']} unchecked of {total} tensors; loss {losses['reference']} vs "
        f"{losses['candidate']})"
    ]
    lines += [f"  fail {item}" for item in result["failing"]]
    if result["failed"] > len(result["failing"]):
        lines.append(f"  ... and {result['failed'] - len(result['failing'])} more")
    for direction in ("forward", "backward"):
        if result["first"][direction]:
            lines.append(f"  first {direction} difference: {result['first'][direction]}")
    return lines


def run_lines(run: dict[str, Any]) -> list[str]:
    lines = [line for r in run["steps"] for line in step_lines(r)]
    where = run["localise"]
    lines.append(
        f"localise: step {where}" if where is not None else "localise: none (every step PASS)"
    )
    return lines


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """A fingerprint compare's JSON (scripts/compare_fingerprints.py)."""
    try:
        run = art.load_json(path)
    except art.ArtifactError as exc:
        raise FingerprintError(str(exc)) from None
    if not isinstance(run, dict) or run.get("format") != FORMAT or "steps" not in run:
        raise FingerprintError(f"{path}: not a fingerprint compare (format {FORMAT} expected)")
    return run


def as_results(run: dict[str, Any], compare_format: int) -> list[dict[str, Any]]:
    """Each step of a fingerprint compare in the shape of a comparison result (no categories),
    for the summary and the report: ``evidence`` "fingerprint"."""
    out = []
    for r in run["steps"]:
        first = r.get("first") or {}
        out.append(
            {
                "format": compare_format,
                "seed": r.get("seed"),
                "step": r.get("step"),
                "reference": r.get("reference"),
                "candidate": r.get("candidate"),
                "verdict": r["verdict"],
                "losses": r.get("losses") or {"reference": None, "candidate": None},
                "categories": {},
                "divergence": {
                    d: {"first": {"where": f"{first[d]} (fingerprints)"} if first.get(d) else None}
                    for d in ("forward", "backward")
                },
                "errors": [{"category": "fingerprints", "error": e} for e in r.get("errors", [])],
                "evidence": "fingerprint",
                "failing_fingerprints": r.get("failing") or [],
                "failed": r.get("failed", 0),
            }
        )
    return out
