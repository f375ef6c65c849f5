"""Teacher forcing: run the candidate with every matched module call fed the reference's values.

``ForcingRecorder(model, ref_calls, name_map)`` records like ``LayerRecorder`` and, for each call
that has a counterpart in the reference's recorded calls (same name through the name map, same
call index):

- before the call, its tensor inputs are replaced by the reference's inputs (paired by name,
  then by value; rearranged into the candidate's layout), and the torch generator is set to the
  state the reference had at that call's start when the reference call drew random numbers;
- after the call, its own output is recorded and the reference's output is passed on instead;
- backward, the gradient arriving at each output is recorded and the reference's output
  gradient is passed on instead.

So what each call records is its *own* error: its code (or its parent's glue before it) run on
the reference's values. Replacements keep the autograd graph: the candidate's tensor receives
the gradient of the value that replaced it.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nestalign.align import call_inputs, leaves, pair_leaves, to_layout
from nestalign.capture import ROOT, LayerRecorder, rng_now
from nestalign.namemap import IDENTITY, NameMap


class _Graft(torch.autograd.Function):
    """Forward: the reference's value. Backward: the gradient goes to the candidate's tensor."""

    @staticmethod
    def forward(ctx, cand: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return ref.clone(memory_format=torch.preserve_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _like(ref: torch.Tensor, cand: torch.Tensor, ref_order: bool = False) -> torch.Tensor:
    """A copy of ``ref`` (already in cand's shape) with cand's dtype and device.

    Memory order matters to random ops (a dropout mask is drawn in memory order): with
    ``ref_order`` (the reference's call drew random numbers) the copy keeps the reference's
    order; otherwise it is contiguous when the candidate's tensor was (its code may ``view`` it).
    """
    value = ref.to(device=cand.device, dtype=cand.dtype)
    if not ref_order and (value.is_contiguous() or cand.is_contiguous()):
        return value.contiguous().clone()
    return value.clone(memory_format=torch.preserve_format)


def graft(ref: torch.Tensor, cand: torch.Tensor, ref_order: bool = False) -> torch.Tensor | None:
    """``ref`` in cand's layout, connected to cand's graph; None when no layout fits."""
    moved = to_layout(ref, cand)
    if moved is None:
        return None
    value = _like(moved[0], cand, ref_order)
    if cand.requires_grad and torch.is_grad_enabled():
        return _Graft.apply(cand, value)
    return value


def _replace(obj: Any, new: dict[str, Any], prefix: str = "") -> Any:
    """``obj`` with the leaves at the paths of ``new`` replaced (paths as ``align.leaves``)."""
    if prefix in new:
        return new[prefix]
    if isinstance(obj, dict):
        return {k: _replace(v, new, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_replace(v, new, f"{prefix}[{i}]") for i, v in enumerate(obj)]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    return obj


def forced_values(ref: Any, cand: Any, ref_order: bool = False) -> dict[str, Any]:
    """Replacement tensors for the candidate's leaves (path -> tensor), taken from ``ref``
    (also where the candidate passes None and the reference a tensor)."""
    r = {p: v for p, v in leaves(ref)}
    c = {p: v for p, v in leaves(cand)}
    pairs, _, _ = pair_leaves(r, c)
    out = {}
    done: dict[int, torch.Tensor | None] = {}  # one replacement per tensor object: a tensor
    for rp, cp in pairs:  # passed as query, key and value stays one tensor (one gradient)
        rv, cv = r[rp], c[cp]
        if isinstance(rv, torch.Tensor) and isinstance(cv, torch.Tensor):
            if id(cv) not in done:
                done[id(cv)] = graft(rv, cv, ref_order)
            if done[id(cv)] is not None:
                out[cp] = done[id(cv)]
        elif isinstance(rv, torch.Tensor) and cv is None:
            out[cp] = rv.clone()  # the candidate passes None where the reference passes a tensor
    return out


def _paired_grads(ref: Any, ref_grads: Any, cand: Any) -> dict[int, torch.Tensor]:
    """The reference's gradient for each tensor leaf of ``cand`` (by index), via pair_leaves."""
    if not ref_grads:
        return {}
    r, c = dict(leaves(ref)), dict(leaves(cand))
    r_paths = [p for p, v in r.items() if isinstance(v, torch.Tensor)]
    c_paths = [p for p, v in c.items() if isinstance(v, torch.Tensor)]
    pairs, _, _ = pair_leaves(r, c)
    out = {}
    for rp, cp in pairs:
        if rp in r_paths and cp in c_paths:
            k = r_paths.index(rp)
            g = ref_grads[k] if k < len(ref_grads) else None
            if isinstance(g, torch.Tensor):
                out[c_paths.index(cp)] = g
    return out


class ForcingRecorder(LayerRecorder):
    """A LayerRecorder that teacher-forces the matched calls (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        ref_calls: list[dict[str, Any]],
        name_map: NameMap | None = None,
        grads: bool = True,
    ):
        super().__init__(model, grads)
        self.name_map = name_map or IDENTITY
        self.ref = {(c["name"], c["call"]): c for c in ref_calls}
        self._seen_ref: dict[str, int] = defaultdict(int)
        self._ref_of: dict[int, dict[str, Any]] = {}
        self._grad_refs: dict[tuple[int, str], dict[int, torch.Tensor]] = {}

    def start(self) -> None:
        self._seen_ref.clear()
        self._ref_of.clear()
        self._grad_refs.clear()
        super().start()

    def _match(self, name: str) -> dict[str, Any] | None:
        ref_name = name if name == ROOT else self.name_map.map(name)
        k = self._seen_ref[ref_name]
        self._seen_ref[ref_name] = k + 1
        return self.ref.get((ref_name, k))

    def _forced_enter(
        self, name: str, module: nn.Module, fn: Callable, args: tuple, kwargs: dict
    ) -> tuple[dict[str, Any], tuple, dict]:
        ref = self._match(name)
        if ref is not None and isinstance(ref.get("rng_state"), torch.Tensor):
            torch.set_rng_state(ref["rng_state"])  # replay the reference's random draws
            if self._stack:
                self._stack[-1].rng_last = rng_now()
        entry = self._enter(name, module, fn, args, kwargs)
        entry["forced"] = ref is not None
        if ref is None:
            return entry, args, kwargs
        self._ref_of[entry["start"]] = ref
        try:
            bound = inspect.signature(fn).bind(*args, **kwargs)
        except (TypeError, ValueError):
            entry["forced"] = False
            return entry, args, kwargs
        ref_in, cand_in = call_inputs(ref), dict(bound.arguments)
        new = forced_values(ref_in, cand_in, ref_order=ref.get("rng_state") is not None)
        self._grad_refs[(entry["start"], "grad_inputs")] = _paired_grads(
            ref_in, ref.get("grad_inputs"), cand_in
        )
        for key in list(bound.arguments):
            bound.arguments[key] = _replace(bound.arguments[key], new, key)
        return entry, bound.args, bound.kwargs

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        _, args, kwargs = self._forced_enter(
            self._name_of(module), module, module.forward, args, kwargs
        )
        return args, kwargs

    def _enter_root(self, fn: Callable, args: tuple, kwargs: dict) -> tuple[dict, tuple, dict]:
        return self._forced_enter(ROOT, self.model, fn, args, kwargs)

    def _outgoing(self, entry: dict[str, Any], output: Any) -> Any:
        ref = self._ref_of.pop(entry["start"], None)
        if ref is None:
            return output
        new = forced_values(ref.get("outputs"), output)
        if not new:
            return output
        self._grad_refs[(entry["start"], "grad_outputs")] = _paired_grads(
            ref.get("outputs"), ref.get("grad_outputs"), output
        )
        return _replace(output, new)

    def _replacement(self, targets: list[tuple], grad: torch.Tensor) -> torch.Tensor | None:
        for entry, key, _, i in targets:
            ref_grad = self._grad_refs.get((entry["start"], key), {}).get(i)
            if ref_grad is not None:
                moved = to_layout(ref_grad, grad)
                # an expanded tensor's copies each got their own share, and the reference only
                # holds the sum: such a gradient cannot be split back, so it is left as it is
                if moved is not None and not moved[1].startswith(("expand", "broadcast")):
                    return _like(moved[0], grad)
        return None
