"""Pair the two sides' values when a port passes them in another layout or under other names.

A port may feed ``[B, F, T]`` where NeMo feeds ``[B, T, F]``, expand a ``[1, T, D]`` tensor to
``[B, T, D]``, call an argument ``x`` where NeMo says ``input``, or pass a ``cache=None`` that NeMo
does not. ``to_layout`` rearranges a reference tensor into the candidate's shape (a permutation of
axes or a broadcast of size-1 axes) and names the transform; ``pair_leaves`` pairs the leaves of
two call signatures by name first, then by value, and drops ``None`` and plain values that only
one side passes. Both the teacher-forced capture and the compare use them.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

MAX_PERMUTED_DIMS = 5
_MISSING = object()


def leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, value) of every tensor or plain value in a nested structure, depth first."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        out = []
        for i, v in enumerate(obj):
            out += leaves(v, f"{prefix}[{i}]")
        return out
    return [(prefix, obj)]


def call_inputs(call: dict[str, Any]) -> dict[str, Any]:
    """Inputs of a recorded call by argument name."""
    names = list(call.get("input_names") or [])
    values = list(call.get("inputs") or [])
    names += [f"arg{i}" for i in range(len(names), len(values))]
    return dict(zip(names, values, strict=False))


def _kind(t: torch.Tensor) -> str:
    return "float" if t.is_floating_point() or t.is_complex() else "exact"


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two same-shape tensors (NaN at the same place counts as 0)."""
    if a.numel() == 0:
        return 0.0
    if _kind(a) == "exact" and _kind(b) == "exact":
        return float((a != b).double().mean())
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(a.double()) & torch.isnan(b.double()), 0.0, d)
    d = torch.nan_to_num(d, nan=float("inf"), posinf=float("inf"))
    return float(d.mean())


def to_layout(ref: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """``ref`` rearranged into ``like``'s shape, and the transform's name ('' when none was
    needed): a permutation of axes (the closest in value when several fit), an expansion of
    size-1 axes, or the first slice of axes that ``like`` holds as size 1 (only when ``ref`` is
    constant along them). None when no such transform gives ``like``'s shape."""
    if ref.shape == like.shape:
        return ref, ""
    if (
        ref.dim() == like.dim()
        and 1 < ref.dim() <= MAX_PERMUTED_DIMS
        and sorted(ref.shape) == sorted(like.shape)
    ):
        best: tuple[float, torch.Tensor, tuple[int, ...]] | None = None
        for perm in itertools.permutations(range(ref.dim())):
            moved = ref.permute(perm)
            if moved.shape != like.shape:
                continue
            d = distance(moved, like)
            if best is None or d < best[0]:
                best = (d, moved, perm)
        if best is not None:
            return best[1], "permute(" + ", ".join(map(str, best[2])) + ")"
    if ref.dim() <= like.dim():
        try:
            return ref.expand(like.shape), f"expand {list(ref.shape)} to {list(like.shape)}"
        except RuntimeError:
            pass
    if ref.dim() == like.dim() and all(
        c in (r, 1) for c, r in zip(like.shape, ref.shape, strict=True)
    ):
        index = tuple(slice(0, 1) if c == 1 else slice(None) for c in like.shape)
        first = ref[index]
        if torch.equal(first.expand(ref.shape), ref):
            return first, f"broadcast {list(ref.shape)} held as {list(like.shape)}"
    return None


def _tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _alignable_elsewhere(cv: torch.Tensor, ref: dict[str, Any], path: str) -> bool:
    """Whether some other reference tensor could be ``cv`` in another layout."""
    return any(
        p != path and _tensor(v) and _kind(v) == _kind(cv) and to_layout(v, cv) is not None
        for p, v in ref.items()
    )


def pair_leaves(
    ref: dict[str, Any], cand: dict[str, Any]
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Pair reference and candidate leaves (path -> value) of one call's inputs or outputs.

    Returns (pairs of (ref path, cand path), ref-only paths, cand-only paths). Tensors pair by
    path when their layouts are compatible, then by value: each remaining candidate tensor takes
    the remaining reference tensor of the same kind (float or exact) whose rearrangement into its
    layout is closest. Plain values (None, numbers, strings) pair by path only; a ``None`` or a
    plain value passed by one side only is dropped (a default argument), never listed; a tensor
    on one side and ``None`` under the same name on the other is a pair (and a difference).
    """
    pairs: list[tuple[str, str]] = []
    used_ref: set[str] = set()
    left: list[str] = []
    for path, cv in cand.items():
        rv = ref.get(path, _MISSING)
        if rv is _MISSING:
            left.append(path)
        elif _tensor(rv) and _tensor(cv):
            if to_layout(rv, cv) is not None or not _alignable_elsewhere(cv, ref, path):
                pairs.append((path, path))  # same name: compared (a shape mismatch is named)
                used_ref.add(path)
            else:
                left.append(path)
        elif (not _tensor(rv) and not _tensor(cv)) or rv is None or cv is None:
            pairs.append((path, path))  # plain values, or a tensor against None: compared
            used_ref.add(path)
        else:
            left.append(path)
    free = [p for p, v in ref.items() if p not in used_ref and _tensor(v)]
    cand_only = []
    for path in left:
        cv = cand[path]
        if not _tensor(cv):
            continue  # a default or flag that only the candidate passes
        best: tuple[float, str] | None = None
        for rp in free:
            rv = ref[rp]
            if _kind(rv) != _kind(cv):
                continue
            moved = to_layout(rv, cv)
            if moved is None:
                continue
            d = distance(moved[0], cv)
            if best is None or d < best[0]:
                best = (d, rp)
        if best is None:
            cand_only.append(path)
            continue
        pairs.append((best[1], path))
        free.remove(best[1])
    return pairs, free, cand_only
