"""Tolerance settings: global atol/rtol, per category, and the noise-level factor."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from nestalign.metrics import default_tolerance, scale_of

TOLERANCE_KEYS = (
    "init",
    "batch",
    "forward",
    "loss",
    "grads",
    "weights",
    "layers",
    "layer_grads",
    "optimizer",
    "rng",
)
NOISE_FACTOR = 1024.0  # a tensor below NOISE_FACTOR * eps * (its module's scale) is noise
GRAD_ATOL_MODES = ("scaled", "absolute")
TINY = float(torch.finfo(torch.float32).tiny)  # the atol factor of an exactly-zero gradient


class ToleranceError(ValueError):
    """A tolerance file that cannot be read or has unknown keys."""


def load_tolerances(
    path: str | os.PathLike | None = None, atol: float | None = None, rtol: float | None = None
) -> dict[str, Any]:
    """Tolerances as a plain dict:
    {atol, rtol, noise_factor, grad_atol, categories: {cat: {atol, rtol}}}.

    ``path`` is a YAML file, or the mapping itself inline (``'{atol: 0, rtol: 0}'``).

    None means "per dtype, as torch.testing.assert_close". The command line's atol/rtol are the
    global values; a category in the file overrides them for that category. ``grad_atol`` is
    "scaled" (default: a gradient's atol is relative to its size, see ``scaled_atol``) or
    "absolute".
    """
    data: dict[str, Any] = {}
    if path is not None:
        inline = str(path).lstrip().startswith("{")  # a mapping given on the command line
        try:
            data = yaml.safe_load(str(path) if inline else Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ToleranceError(f"{path}: cannot read tolerances ({exc})") from exc
        if not isinstance(data, dict):
            raise ToleranceError(f"{path}: expected a mapping of tolerances")
        unknown = set(data) - {"atol", "rtol", "noise_factor", "grad_atol", "categories"}
        cats = data.get("categories") or {}
        unknown |= {f"categories.{c}" for c in set(cats) - set(TOLERANCE_KEYS)}
        if unknown:
            raise ToleranceError(f"{path}: unknown keys {sorted(unknown)}")
    out: dict[str, Any] = {
        "atol": _num(atol if atol is not None else data.get("atol"), path),
        "rtol": _num(rtol if rtol is not None else data.get("rtol"), path),
        "noise_factor": _num(data.get("noise_factor", NOISE_FACTOR), path),
        "grad_atol": data.get("grad_atol", "scaled"),
        "categories": {},
    }
    if out["grad_atol"] not in GRAD_ATOL_MODES:
        raise ToleranceError(
            f"{path}: grad_atol must be one of {', '.join(GRAD_ATOL_MODES)}, "
            f"not {out['grad_atol']!r}"
        )
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
    fallback = {"layer_grads": "grads", "init": "weights"}.get(category)
    specific = cats.get(category) or (cats.get(fallback) if fallback else None)
    specific = specific or {}
    return specific.get("atol", tols.get("atol")), specific.get("rtol", tols.get("rtol"))


def grads_scaled(tols: dict[str, Any]) -> bool:
    """Whether gradient atols scale with the gradient (``grad_atol: scaled``, the default)."""
    return tols.get("grad_atol", "scaled") == "scaled"


def scaled_atol(atol: float | None, scale: float | None) -> float | None:
    """The absolute tolerance of a gradient whose reference has largest magnitude ``scale``.

    Gradients span many orders of magnitude, so a fixed atol is larger than most gradients of a
    small model: the effective atol is ``atol * scale``. A gradient that is exactly zero on the
    reference side (scale 0) gets ``atol * TINY`` (float32's smallest normal number), i.e. it is
    compared practically exactly. None (no atol given, or no scale known) is returned unchanged.
    """
    if atol is None or scale is None or math.isnan(scale):
        return atol
    if math.isinf(scale):
        return atol
    return atol * scale if scale > 0 else atol * TINY


def tensor_scale(t: Any) -> float | None:
    """Largest finite magnitude of a float tensor (0.0 when it has none); None otherwise."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    return scale_of(t.detach())


def gradient_atol(atol: float | None, ref: Any) -> float | None:
    """``scaled_atol`` for one reference gradient tensor; no atol means its dtype's default."""
    scale = tensor_scale(ref)
    if scale is None:
        return atol
    if atol is None:
        atol = default_tolerance(ref.dtype)[0]
    return scaled_atol(atol, scale)
