"""The state a run starts from: weights and buffers plus every random generator.

``initial_state(model)`` is what a capture writes as ``initial_weights.pt`` and
``initial_rng.pt``; ``start_from(model, step_dir, name_map)`` puts a reference capture's initial
state into the candidate's model (through the name map, strictly: ``map_weights``) and its
generators (the ``init_from`` capture key).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nestalign import artifacts as art
from nestalign.namemap import IDENTITY, NameMap, NameMapError


class InitError(RuntimeError):
    """A reference initial state that does not fit the candidate's model."""


def rng_states() -> dict[str, Any]:
    """torch (CPU and current CUDA device), numpy and python generator states as plain data."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng(states: dict[str, Any]) -> None:
    """Set every generator from ``rng_states()`` output (CUDA only when both sides have it)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


def initial_state(model: nn.Module) -> dict[str, Any]:
    """The model's state_dict (detached CPU copies) and the generators, right now."""
    return {"weights": art.to_plain(model.state_dict()), "rng": rng_states()}


def map_weights(
    ref: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    name_map: NameMap | None,
    where: str,
) -> dict[str, torch.Tensor]:
    """Reference-named tensors as the candidate's ``own`` names and layouts (the name map's
    renames and transforms, inverted). Strict: a tensor of ``own`` that nothing maps to, a
    reference tensor left over or a shape that differs is an InitError naming them, prefixed by
    ``where``. Candidate tensors whose reference names the map ignores are left out."""
    nmap = name_map or IDENTITY
    try:
        state = nmap.unmap_state(ref, {k: list(v.shape) for k, v in own.items()})
    except NameMapError as exc:
        raise InitError(f"{where}: {exc}") from exc
    skipped = {
        k for k in own if all(nmap.ignored(r) for r, _ in nmap.map_shape(k, list(own[k].shape)))
    }
    used = {r for k in state for r, _ in nmap.map_shape(k, list(own[k].shape))}
    missing = [k for k in own if k not in state and k not in skipped]
    extra = [k for k in ref if k not in used and not nmap.ignored(k)]
    bad = [k for k in state if list(state[k].shape) != list(own[k].shape)]
    if missing or extra or bad:
        parts = []
        for label, names in (("missing", missing), ("unexpected", extra), ("shape differs", bad)):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                parts.append(f"{label}: {', '.join(names[:3])}{more}")
        raise InitError(
            f"{where}: the reference's tensors do not fit this model ({'; '.join(parts)}); "
            "add name-map rules for the renamed tensors"
        )
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (the model's own names) into the model's parameters and buffers."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name in state:
                value.copy_(state[name].to(dtype=value.dtype))


def start_from(
    model: nn.Module, step_dir: str | os.PathLike, name_map: NameMap | None = None
) -> None:
    """Load a reference capture's initial weights (mapped to the candidate's names) and RNG."""
    step_dir = Path(step_dir)
    ref = art.load_tensors(step_dir / art.INITIAL_WEIGHTS)
    rng = art.load_tensors(step_dir / art.INITIAL_RNG)
    load_weights(model, map_weights(ref, model.state_dict(), name_map, f"init_from={step_dir}"))
    restore_rng(rng)
