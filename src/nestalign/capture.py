"""Record what a model computes in one training step, without changing a single number.

``LayerRecorder`` puts forward pre-hooks and forward hooks on every submodule and a wrapper on the
root's ``forward``. For each module call it keeps a detached copy of the inputs (taken before the
call, so in-place modules cannot alter them) and of the outputs (taken right after the call, before
a later in-place op can), and registers a tensor hook on every output that requires grad to keep
the gradient flowing into that output during backward. Hooks never return a value, so neither the
forward nor the backward computation changes.

A module instance used under several names (one activation shared by many blocks) is named after
the call that encloses it: the alias whose parent is the module currently running. When the parent
holds it under several names (one ReLU in three slots of a Sequential), the k-th call within one
parent call takes the k-th of those names.
"""

from __future__ import annotations

import inspect
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nestalign import artifacts as art

ROOT = "<root>"


def _leaves(obj: Any) -> list[Any]:
    """Tensor leaves of a nested structure, in order (dicts by insertion order)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _leaves(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for name in obj.__dataclass_fields__ for t in _leaves(getattr(obj, name))]
    return []


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by parameter name in signature order; positional names as a fallback."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        return dict(bound.arguments)
    except (TypeError, ValueError):
        named = {f"arg{i}": a for i, a in enumerate(args)}
        named.update(kwargs)
        return named


def model_structure(model: nn.Module) -> dict[str, Any]:
    """Every state_dict entry in order (name, kind, shape, dtype, requires_grad) and the modules."""
    params = dict(model.named_parameters())
    entries = []
    for name, value in model.state_dict(keep_vars=True).items():
        is_param = name in params
        entries.append(
            {
                "name": name,
                "kind": "parameter" if is_param else "buffer",
                "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch."),
                "requires_grad": bool(value.requires_grad) if is_param else False,
            }
        )
    modules = [{"name": n or ROOT, "type": type(m).__name__} for n, m in model.named_modules()]
    return {
        "entries": entries,
        "modules": modules,
        "num_parameters": sum(p.numel() for p in params.values()),
        "num_trainable": sum(p.numel() for p in params.values() if p.requires_grad),
    }


class LayerRecorder:
    """Records every module call of ``model`` while active (see the module docstring)."""

    def __init__(self, model: nn.Module, grads: bool = True):
        self.model = model
        self.grads = grads
        self.calls: list[dict[str, Any]] = []
        self._aliases: dict[int, list[str]] = defaultdict(list)
        for name, module in model.named_modules(remove_duplicate=False):
            if name:
                self._aliases[id(module)].append(name)
        self._stack: list[
            tuple[str, dict[int, int], int]
        ] = []  # running: name, child counts, start
        self._counts: dict[str, int] = defaultdict(int)
        self._handles: list[Any] = []
        self._finished = 0
        self._root_forward = None

    # -- naming -------------------------------------------------------------------------------
    def _name_of(self, module: nn.Module) -> str:
        names = self._aliases[id(module)]
        if not self._stack:
            return names[0]
        parent, seen, _ = self._stack[-1]
        slots = [n for n in names if (n.rpartition(".")[0] or ROOT) == parent]
        if not slots:
            return names[0]
        k = seen.get(id(module), 0)
        seen[id(module)] = k + 1
        return slots[k % len(slots)]

    # -- hooks --------------------------------------------------------------------------------
    def _enter(self, name: str, module: nn.Module, fn: Callable, args: tuple, kwargs: dict):
        inputs = _bind(fn, args, kwargs)
        entry = {
            "name": name,
            "call": self._counts[name],
            "type": type(module).__name__,
            "parent": self._stack[-1][0] if self._stack else None,
            "parent_start": self._stack[-1][2] if self._stack else None,
            "start": len(self.calls),
            "end": -1,
            "input_names": list(inputs),
            "inputs": art.to_plain(list(inputs.values())),
            "outputs": None,
            "grad_outputs": None,
        }
        self._counts[name] += 1
        self.calls.append(entry)
        self._stack.append((name, {}, entry["start"]))
        return entry

    def _leave(self, entry: dict[str, Any], output: Any) -> None:
        self._stack.pop()
        entry["outputs"] = art.to_plain(output)
        entry["end"] = self._finished
        self._finished += 1
        if not (self.grads and torch.is_grad_enabled()):
            return
        leaves = _leaves(output)
        grads: list[Any] = [None] * len(leaves)
        entry["grad_outputs"] = grads
        for i, t in enumerate(leaves):
            if t.requires_grad:
                t.register_hook(self._grad_hook(grads, i))

    @staticmethod
    def _grad_hook(store: list[Any], i: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            store[i] = grad.detach().to("cpu", copy=True)

        return hook

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._enter(self._name_of(module), module, module.forward, args, kwargs)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._leave(self.calls[self._stack[-1][2]], output)  # the innermost running call

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.calls.clear()
        self._counts.clear()
        self._finished = 0
        for name, module in self.model.named_modules():
            if not name:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(self._post, with_kwargs=True, always_call=False)
            )
        original = self.model.forward
        self._root_forward = original

        def recorded_forward(*args, **kwargs):
            entry = self._enter(ROOT, self.model, original, args, kwargs)
            output = original(*args, **kwargs)
            self._leave(entry, output)
            return output

        self.model.forward = recorded_forward

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._root_forward is not None:
            del self.model.forward  # drop the instance attribute, back to the class method
            self._root_forward = None

    def root_output(self) -> Any:
        """Outputs of the first root call (the model's forward) of this step."""
        for call in self.calls:
            if call["name"] == ROOT:
                return call["outputs"]
        return None


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def name_outputs(output: Any, names: Iterable[str] | None) -> dict[str, Any]:
    """The forward output as a dict: a tuple is keyed by ``names`` (or output_0, output_1, ...)."""
    if isinstance(output, dict):
        return dict(output)
    items = list(output) if isinstance(output, (list, tuple)) else [output]
    names = list(names or [])
    return {names[i] if i < len(names) else f"output_{i}": v for i, v in enumerate(items)}
