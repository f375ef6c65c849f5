"""One step: every category of a reference step directory against a candidate's."""

from __future__ import annotations

import os
from typing import Any

import torch

from nestalign import artifacts as art
from nestalign.compare import divergence
from nestalign.compare.categories import _dict_category, _mark_noise, _structure
from nestalign.compare.layers import _layers
from nestalign.compare.reader import StepSource
from nestalign.compare.rows import _summarise
from nestalign.compare.tolerances import NOISE_FACTOR, load_tolerances
from nestalign.namemap import IDENTITY, NameMap

FORMAT = "nestalign.compare/1"
CATEGORIES = ("structure", "batch", "forward", "loss", "grads", "weights", "layers", "layer_grads")


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
