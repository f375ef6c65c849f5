"""Tolerance settings: global atol/rtol, per category, and the noise-level factor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

TOLERANCE_KEYS = ("batch", "forward", "loss", "grads", "weights", "layers", "layer_grads")
NOISE_FACTOR = 1024.0  # a tensor below NOISE_FACTOR * eps * (its module's scale) is noise


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
