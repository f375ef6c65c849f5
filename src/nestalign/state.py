"""The state a run starts from: weights and buffers plus every random generator.

``initial_state(model)`` is what a capture writes as ``initial_weights.pt`` and
``initial_rng.pt``; ``start_from(model, step_dir, name_map)`` puts a reference capture's initial
state into the candidate's model (through the name map, strictly) and its generators (the
``init_from`` capture key).
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


def start_from(
    model: nn.Module, step_dir: str | os.PathLike, name_map: NameMap | None = None
) -> None:
    """Load a reference capture's initial weights (mapped to the candidate's names) and RNG."""
    step_dir = Path(step_dir)
    ref = art.load_tensors(step_dir / art.INITIAL_WEIGHTS)
    rng = art.load_tensors(step_dir / art.INITIAL_RNG)
    own = model.state_dict()
    nmap = name_map or IDENTITY
    try:
        state = nmap.unmap_state(ref, {k: list(v.shape) for k, v in own.items()})
    except NameMapError as exc:
        raise InitError(f"init_from={step_dir}: {exc}") from exc
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    bad = [k for k in own if k in state and list(state[k].shape) != list(own[k].shape)]
    if missing or extra or bad:
        parts = []
        for label, names in (("missing", missing), ("unexpected", extra), ("shape differs", bad)):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                parts.append(f"{label}: {', '.join(names[:3])}{more}")
        raise InitError(
            f"init_from={step_dir}: the reference's initial weights do not fit this model "
            f"({'; '.join(parts)}); add name-map rules for the renamed tensors"
        )
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(state[name].to(dtype=value.dtype))
    restore_rng(rng)
