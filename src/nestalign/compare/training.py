"""The training-state categories of a step (training_state.pt): optimizer and rng.

``optimizer``: each parameter's optimizer state after the step (Adam's ``exp_avg``,
``exp_avg_sq``, ``step``), named ``<parameter>:<key>`` with the parameter name through the name
map, plus the learning rate each parameter group applied (``lr[<group>]``) and the gradient norm
(``grad_norm``). ``rng``: every generator's state when the step's training started (torch, CUDA,
numpy, python); states are integers, so any difference fails, and it means the two sides drew
different random numbers before this step.
"""

from __future__ import annotations

from typing import Any

import torch

from nestalign import artifacts as art
from nestalign.compare.categories import _dict_category
from nestalign.compare.reader import StepSource
from nestalign.compare.rows import _summarise
from nestalign.namemap import NameMap


def _optimizer_items(state: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({state key: {parameter: tensor}}, {scalar name: tensor}) of a saved training state."""
    per_key: dict[str, dict[str, Any]] = {}
    for param, entry in ((state.get("optimizer") or {}).get("state") or {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                per_key.setdefault(key, {})[param] = value
    scalars: dict[str, Any] = {}
    for i, lr in enumerate(state.get("lr_applied") or []):
        value = torch.tensor(float(lr), dtype=torch.float64)
        art.attach_index(value, [art.tensor_fingerprint(value)])  # equal ones are not read
        scalars[f"lr[{i}]"] = value
    if isinstance(state.get("grad_norm"), torch.Tensor):
        scalars["grad_norm"] = state["grad_norm"]
    return per_key, scalars


def _param_shapes(state: dict[str, Any]) -> dict[str, list[int]]:
    """Each parameter's shape, from the first tensor of its optimizer state that has one."""
    shapes: dict[str, list[int]] = {}
    for param, entry in ((state.get("optimizer") or {}).get("state") or {}).items():
        for value in entry.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                shapes[param] = list(value.shape)
                break
    return shapes


def optimizer_category(
    ref: dict[str, Any], cand: dict[str, Any], tols: dict, name_map: NameMap
) -> dict[str, Any]:
    r_keys, r_scalars = _optimizer_items(ref)
    c_keys, c_scalars = _optimizer_items(cand)
    shapes = _param_shapes(cand)
    rows: list[dict[str, Any]] = []
    ignored: list[str] = []
    for key in sorted(set(r_keys) | set(c_keys)):
        r_items, c_items = r_keys.get(key, {}), c_keys.get(key, {})
        if c_items and all(v.dim() == 0 for v in c_items.values()):
            # one number per parameter (Adam's step): each reference name the parameter stands
            # for gets it as it is; a transform (a split, a transpose) is for tensors of its shape
            c_items = {
                target: v
                for name, v in c_items.items()
                for target, _ in name_map.map_shape(name, shapes.get(name, []))
                if not name_map.ignored(target)
            }
            r_items = {n: v for n, v in r_items.items() if not name_map.ignored(n)}
            found = _dict_category(r_items, c_items, tols, "optimizer", None)
        else:
            found = _dict_category(r_items, c_items, tols, "optimizer", name_map)
        for row in found["rows"]:
            row["name"] = f"{row['name']}:{key}"
            if "cand_name" in row:
                row["cand_name"] = f"{row['cand_name']}:{key}"
        rows += found["rows"]
        ignored += [f"{n}:{key}" for n in found.get("ignored", [])]
    rows += _dict_category(r_scalars, c_scalars, tols, "optimizer", None)["rows"]
    return _summarise(rows, ignored)


def rng_category(ref: dict[str, Any], cand: dict[str, Any], tols: dict) -> dict[str, Any]:
    exact = {
        **tols,
        "categories": {**(tols.get("categories") or {}), "rng": {"atol": 0, "rtol": 0}},
    }
    return _dict_category(
        ref.get("rng_before") or {}, cand.get("rng_before") or {}, exact, "rng", None
    )


def training_categories(
    ref: StepSource, cand: StepSource, tols: dict, name_map: NameMap
) -> tuple[dict[str, Any], str | None]:
    """{"optimizer": ..., "rng": ...}; ({}, why) when one side did not capture its state, ({},
    None) when neither did (captures made before training states were)."""
    absent = [src.path for src in (ref, cand) if not src.has(art.TRAINING_STATE)]
    if len(absent) == 2:
        return {}, None
    if absent:
        return {}, f"no {art.TRAINING_STATE} in {', '.join(map(str, absent))} (an older capture)"
    r, c = ref.tensors(art.TRAINING_STATE), cand.tensors(art.TRAINING_STATE)
    return {
        "optimizer": optimizer_category(r, c, tols, name_map),
        "rng": rng_category(r, c, tols),
    }, None
