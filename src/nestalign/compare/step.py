"""One step: every category of a reference step directory against a candidate's."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from nestalign import artifacts as art
from nestalign.compare import divergence
from nestalign.compare.categories import (
    INIT_WEIGHTS,
    _dict_category,
    _init_category,
    _mark_noise,
    _structure,
)
from nestalign.compare.layers import _layers, fp_noise
from nestalign.compare.reader import StepSource
from nestalign.compare.rows import FAILED, _summarise
from nestalign.compare.tolerances import NOISE_FACTOR, TOLERANCE_KEYS, load_tolerances
from nestalign.compare.training import training_categories
from nestalign.namemap import IDENTITY, NameMap, NameMapError

FORMAT = "nestalign.compare/1"
CATEGORIES = ("structure", *TOLERANCE_KEYS)  # structure first, then the numeric ones
NUMERIC = CATEGORIES[1:]  # the categories whose failures fail the verdict
# metadata.json keys both sides must agree on before numbers are compared
METADATA_KEYS = (
    "seed",
    "step",
    "threads",
    "device",
    "deterministic",
    "deterministic_algorithms",
    "cudnn_allow_tf32",
    "matmul_allow_tf32",
    "torch",
    "config_sha256",
)


def _scalar(x: Any) -> float | None:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x.detach().double())
    if isinstance(x, (int, float)):
        return float(x)
    return None


def metadata_differences(ref: dict[str, Any], cand: dict[str, Any]) -> list[str]:
    """``KEY REF vs CAND`` for each METADATA_KEYS entry both sides have and disagree on."""
    return [
        f"{k} {ref[k]} vs {cand[k]}"
        for k in METADATA_KEYS
        if k in ref and k in cand and ref[k] != cand[k]
    ]


def _nonfinite(cats: dict[str, Any], losses: dict[str, Any]) -> list[str]:
    """Loss and forward items that are NaN/Inf on both sides (where they agree)."""
    out = []
    for cat in ("forward", "loss"):
        for r in (cats.get(cat) or {}).get("rows", []):
            ref_bad = (r.get("nan_ref") or 0) + (r.get("inf_ref") or 0)
            cand_bad = (r.get("nan_cand") or 0) + (r.get("inf_cand") or 0)
            if ref_bad and cand_bad:
                out.append(f"{cat}:{r['name']}")
    ref, cand = losses.get("reference"), losses.get("candidate")
    if (
        not any(x.startswith("loss:") for x in out)
        and isinstance(ref, float)
        and isinstance(cand, float)
        and not math.isfinite(ref)
        and not math.isfinite(cand)
    ):
        out.append("loss:loss")
    return out


def _param_gradient_culprit(cats: dict[str, Any]) -> dict[str, Any] | None:
    """The module of the failing parameter gradient that comes last in state_dict order (the
    backward runs last to first, so that is where the difference shows first)."""
    grads = cats.get("grads") or {}
    failing = [r["name"] for r in grads.get("rows", []) if r["status"] in FAILED]
    if not failing:
        return None
    order = {r["name"]: i for i, r in enumerate((cats.get("structure") or {}).get("rows", []))}
    rows = {r["name"]: i for i, r in enumerate(grads["rows"])}
    param = max(failing, key=lambda n: (order.get(n, -1), rows[n]))
    module = param.rpartition(".")[0] or "<root>"
    return {
        "name": param,
        "kind": "culprit",
        "module": module,
        "where": f"{module} (parameter gradient {param})",
    }


def _structure_notes(s: dict[str, Any]) -> list[dict[str, Any]]:
    notes = []
    d = s.get("first_order_difference")
    if d:
        notes.append(
            {
                "name": d["ref"],
                "reason": f"parameter order differs from position {d['index']}: "
                f"{d['ref']} vs {d['cand']}",
            }
        )
    notes += [
        {"name": r["name"], "reason": r.get("reason") or r["status"]}
        for r in s.get("rows", [])
        if r["status"] in FAILED
    ]
    mods = s.get("modules") or {}
    notes += [
        {"name": m["name"], "reason": f"module type {m['ref']} vs {m['cand']}"}
        for m in mods.get("type_differences", [])
    ]
    notes += [
        {"name": n, "reason": "module only in the reference"} for n in mods.get("only_ref", [])
    ]
    notes += [
        {"name": n, "reason": "module only in the candidate"} for n in mods.get("only_cand", [])
    ]
    return notes


def _collect_notes(result: dict[str, Any]) -> None:
    """result["notes"]: everything that differs but does not fail the step, per category."""
    notes = result["notes"]
    cats = result["categories"]
    for cat in CATEGORIES:
        c = cats.get(cat)
        if not c:
            continue
        found = _structure_notes(c) if cat == "structure" else list(c.get("notes", []))
        if cat == "structure":
            c["notes"] = c.get("notes", []) + found
        notes += [{"category": cat, **n} for n in found]
        notes += [
            {"category": cat, "name": n, "reason": "ignored by the name map"}
            for n in c.get("ignored", [])
        ]


# -- the step comparison ----------------------------------------------------------------------
def compare_steps(
    ref_dir: str | os.PathLike,
    cand_dir: str | os.PathLike,
    tolerances: dict[str, Any] | None = None,
    name_map: NameMap | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    use_index: bool = True,
) -> dict[str, Any]:
    """Compare one captured step of the reference with the candidate's (see module docstring).

    The metadata of both sides is cross-checked first (METADATA_KEYS): a difference is an error
    and nothing is compared, unless ``force`` (then it is a note). Tensors whose fingerprints in
    both sides' tensor_index.json agree are not read (``use_index=False`` reads them all)."""
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
        "notes": [],
        "losses": {"reference": None, "candidate": None},
        "tolerances": tols,
        "name_map": nmap.to_dict(),
        "categories": {},
        "init": None,
        "nonfinite": [],
        "divergence": divergence.empty(),
        "divergences": [],
    }
    try:
        ref = StepSource(ref_dir, allow_pickle, use_index)
        cand = StepSource(cand_dir, allow_pickle, use_index)
    except art.ArtifactError as exc:
        result["errors"].append({"category": "all", "error": str(exc)})
        return result
    metas = {}
    for side, src in (("reference", ref), ("candidate", cand)):
        try:
            meta = src.metadata()
        except art.ArtifactError as exc:
            result["errors"].append({"category": "metadata", "error": str(exc)})
            meta = {}
        metas[side] = meta if isinstance(meta, dict) else {}
        result[side] = metas[side].get("framework") or src.path.parent.parent.name or side
        for key in ("seed", "step"):
            if result[key] is None and metas[side].get(key) is not None:
                result[key] = metas[side][key]
    differs = metadata_differences(metas["reference"], metas["candidate"])
    if differs:
        message = "metadata differs: " + ", ".join(differs)
        if not force:
            result["errors"].append({"category": "metadata", "error": message})
            return result
        result["notes"].append(
            {"category": "metadata", "name": "metadata", "reason": message + " (--force)"}
        )
    lr = metas["candidate"].get("lr") or metas["reference"].get("lr")
    cats = result["categories"]

    def guarded(category: str, fn, file: str) -> None:
        try:
            fn()
        except art.ArtifactError as exc:
            result["errors"].append({"category": category, "error": str(exc)})
            cats[category] = {**_summarise([]), "error": str(exc)}
        except NameMapError as exc:
            msg = f"name map does not apply to {file}: {exc}"
            result["errors"].append({"category": category, "error": msg})
            cats[category] = {**_summarise([]), "error": msg}
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            msg = (
                f"{ref.path / file} or {cand.path / file}: unexpected content "
                f"({type(exc).__name__}: {exc})"
            )
            result["errors"].append({"category": category, "error": msg})
            cats[category] = {**_summarise([]), "error": msg}

    def structure() -> None:
        cats["structure"] = _structure(ref, cand, nmap)

    def init() -> None:
        found, why = _init_category(ref, cand, tols, nmap)
        if found is None:
            result["notes"].append({"category": "init", "name": "initial state", "reason": why})
            return
        cats["init"] = found
        bad = [r for r in found["rows"] if r["status"] in FAILED]
        result["init"] = {
            "differs": len(bad),
            "total": found["total"],
            "first": bad[0]["name"] if bad else None,
            "reason": bad[0].get("reason", "") if bad else None,
        }
        if bad:
            result["divergences"].append(
                {
                    "where": f"initial weights: {bad[0]['name']}",
                    "class": "init",
                    "direction": "forward",
                    "name": bad[0]["name"],
                    "module": bad[0]["name"].rpartition(".")[0] or "<root>",
                    "max_abs": bad[0].get("max_abs"),
                    "max_rel": bad[0].get("max_rel"),
                }
            )

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
        cats["layers"], cats["layer_grads"], div = _layers(r, c, tols, nmap)
        result["divergences"] += list(div.pop("divergences", None) or [])
        result["divergence"] = div

    guarded("structure", structure, art.STRUCTURE)
    guarded("init", init, INIT_WEIGHTS)
    for category, file, mapped in (
        ("batch", art.BATCH, False),
        ("forward", art.FORWARD, False),
        ("loss", art.LOSS, False),
        ("grads", art.GRADS, True),
        ("weights", art.WEIGHTS, True),
    ):
        guarded(category, lambda c=category, f=file, m=mapped: simple(c, f, m), file)
    guarded("layers", layers, art.LAYERS)

    def training() -> None:
        found, why = training_categories(ref, cand, tols, nmap)
        if why is not None:
            note = {"category": "optimizer", "name": "training state", "reason": why}
            result["notes"].append(note)
        cats.update(found)

    guarded("optimizer", training, art.TRAINING_STATE)
    if "layer_grads" not in cats:
        cats["layer_grads"] = {**_summarise([]), "error": cats["layers"].get("error")}
    if cats["grads"].get("error") is None:
        weights = cats["weights"] if cats["weights"].get("error") is None else None
        init_cat = cats.get("init") if (cats.get("init") or {}).get("error") is None else None
        optim = cats.get("optimizer")
        optim = optim if optim is not None and optim.get("error") is None else None
        _mark_noise(
            cats["grads"],
            weights,
            tols.get("noise_factor") or NOISE_FACTOR,
            init=init_cat,
            step=result["step"],
            lr=lr,
            optimizer=optim,
        )
    if result["divergence"]["backward"]["first"] is None:
        first = _param_gradient_culprit(cats)
        result["divergence"]["backward"]["first"] = first
        if first is not None and not any(
            e["direction"] == "backward" for e in result["divergences"]
        ):
            row = next(r for r in cats["grads"]["rows"] if r["name"] == first["name"])
            result["divergences"].append(
                {
                    "where": first["where"],
                    "class": "fp noise" if fp_noise(row) else "code",
                    "direction": "backward",
                    "name": first["name"],
                    "module": first["module"],
                    "max_abs": row.get("max_abs"),
                    "max_rel": row.get("max_rel"),
                }
            )
    _collect_notes(result)
    result["nonfinite"] = _nonfinite(cats, result["losses"])
    if result["errors"]:
        result["verdict"] = "error"
    elif any((cats.get(c) or {}).get("failed") for c in NUMERIC):
        result["verdict"] = "fail"
    elif result["nonfinite"]:
        result["verdict"] = "nonfinite"
    else:
        result["verdict"] = "pass"
    return result
