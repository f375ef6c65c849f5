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

import functools
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


@functools.cache
def _signature(func: Callable) -> inspect.Signature:
    """A plain function's signature (functions hash by identity)."""
    return inspect.signature(func)


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by parameter name in signature order; positional names as a fallback. A bound
    method's signature is read once per function (the inspection cost about 10 % of a step)."""
    try:
        func = getattr(fn, "__func__", None)
        if func is not None:  # bound: the function's signature, with self bound too
            bound = _signature(func).bind(fn.__self__, *args, **kwargs)
            bound.arguments.pop(next(iter(bound.arguments)))
        else:  # any callable (not always hashable): inspected each time
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


class _Frame:
    """A running call: its name, child counts, start index and RNG bookkeeping."""

    __slots__ = ("name", "seen", "start", "rng_enter", "rng_last", "rng_own")

    def __init__(self, name: str, start: int, rng: tuple):
        self.name, self.seen, self.start = name, {}, start
        self.rng_enter = self.rng_last = rng
        self.rng_own = False


def rng_now() -> tuple[bytes, bytes | None]:
    """The torch CPU generator's state, and the current CUDA device's when CUDA is in use, as
    bytes (two states compare in a fraction of ``torch.equal``'s time)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state().numpy().tobytes(), None if cuda is None else cuda.numpy().tobytes()


class LayerRecorder:
    """Records every module call of ``model`` while active (see the module docstring).

    Each call also records whether it drew random numbers: ``rng`` is "own" when the torch
    generator advanced in the call's own code (between its children), "inner" when only inside
    its children, None otherwise; ``rng_state`` is the CPU generator state at the call's start
    when the call (or a child) drew, so that a teacher-forced run can replay it.
    """

    def __init__(self, model: nn.Module, grads: bool = True):
        self.model = model
        self.grads = grads
        self.calls: list[dict[str, Any]] = []
        self._aliases: dict[int, list[str]] = defaultdict(list)
        for name, module in model.named_modules(remove_duplicate=False):
            if name:
                self._aliases[id(module)].append(name)
        self._stack: list[_Frame] = []
        self._counts: dict[str, int] = defaultdict(int)
        self._handles: list[Any] = []
        self._finished = 0
        self._root_forward = None
        self._watched: dict[tuple[int, int], tuple[torch.Tensor, list[tuple]]] = {}
        self._copies: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- naming -------------------------------------------------------------------------------
    def _name_of(self, module: nn.Module) -> str:
        names = self._aliases[id(module)]
        if not self._stack:
            return names[0]
        frame = self._stack[-1]
        slots = [n for n in names if (n.rpartition(".")[0] or ROOT) == frame.name]
        if not slots:
            return names[0]
        k = frame.seen.get(id(module), 0)
        frame.seen[id(module)] = k + 1
        return slots[k % len(slots)]

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """One CPU copy per tensor value: an output that is the next call's input (or the input
        of several calls) is recorded, and saved, once. The source is kept until ``stop`` so its
        id is not reused; an in-place change makes a new version, and a new copy."""
        try:
            key = (id(t), t._version)
        except RuntimeError:  # inference tensors have no version counter
            return t.detach().to("cpu", copy=True)
        kept = self._copies.get(key)
        if kept is None:
            kept = self._copies[key] = (t, t.detach().to("cpu", copy=True))
        return kept[1]

    # -- hooks --------------------------------------------------------------------------------
    def _enter(self, name: str, module: nn.Module, fn: Callable, args: tuple, kwargs: dict):
        inputs = _bind(fn, args, kwargs)
        rng = rng_now()
        parent = self._stack[-1] if self._stack else None
        if parent is not None and parent.rng_last != rng:
            parent.rng_own = True
        entry = {
            "name": name,
            "call": self._counts[name],
            "type": type(module).__name__,
            "parent": parent.name if parent else None,
            "parent_start": parent.start if parent else None,
            "start": len(self.calls),
            "end": -1,
            "input_names": list(inputs),
            "inputs": art.to_plain(list(inputs.values()), self._copy),
            "outputs": None,
            "grad_outputs": None,
            "grad_inputs": None,
            "rng": None,
            "rng_state": None,
        }
        self._counts[name] += 1
        self.calls.append(entry)
        self._stack.append(_Frame(name, entry["start"], rng))
        if self.grads and torch.is_grad_enabled():
            self._watch(entry, "grad_inputs", _leaves(list(inputs.values())))
        return entry

    def _leave(self, entry: dict[str, Any], output: Any) -> Any:
        """Finish the innermost call; returns what the caller receives (here: ``output``)."""
        frame = self._stack.pop()
        rng = rng_now()
        own = frame.rng_own or frame.rng_last != rng
        drew = own or frame.rng_enter != rng
        entry["rng"] = "own" if own else "inner" if drew else None
        if drew:  # the CPU state as torch.get_rng_state gives it
            entry["rng_state"] = torch.frombuffer(bytearray(frame.rng_enter[0]), dtype=torch.uint8)
        if self._stack:
            self._stack[-1].rng_last = rng
        entry["outputs"] = art.to_plain(output, self._copy)
        entry["end"] = self._finished
        self._finished += 1
        seen = self._outgoing(entry, output)
        if self.grads and torch.is_grad_enabled():
            self._watch_grads(entry, seen)
        return seen

    def _outgoing(self, entry: dict[str, Any], output: Any) -> Any:
        """What the caller receives instead of ``output`` (a forcing recorder replaces it)."""
        return output

    def _watch_grads(self, entry: dict[str, Any], output: Any) -> None:
        self._watch(entry, "grad_outputs", _leaves(output))

    def _watch(self, entry: dict[str, Any], key: str, tensors: list[torch.Tensor]) -> None:
        """Keep, in ``entry[key][i]``, the gradient of ``tensors[i]`` during backward.

        One hook per tensor object: a tensor that is an output and later an input (or the input
        of several calls) has its one gradient (the sum over all its uses) kept for each.
        """
        store: list[Any] = [None] * len(tensors)
        entry[key] = store
        for i, t in enumerate(tensors):
            if not t.requires_grad:
                continue
            slot = (id(t), t._version)  # an in-place op makes a new value of the same object
            watched = self._watched.get(slot)
            if watched is None:
                watched = self._watched[slot] = (t, [])
                t.register_hook(self._grad_hook(watched[1]))
            watched[1].append((entry, key, store, i))

    def _grad_hook(self, targets: list[tuple]) -> Callable:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            kept = grad.detach().to("cpu", copy=True)
            for _, _, store, i in targets:
                store[i] = kept
            return self._replacement(targets, grad)

        return hook

    def _replacement(self, targets: list[tuple], grad: torch.Tensor) -> torch.Tensor | None:
        """The gradient passed on instead of ``grad`` (a forcing recorder feeds the reference's)."""
        return None

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        self._enter(self._name_of(module), module, module.forward, args, kwargs)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        seen = self._leave(self.calls[self._stack[-1].start], output)  # the innermost call
        return None if seen is output else seen

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.calls.clear()
        self._counts.clear()
        self._watched.clear()
        self._copies.clear()
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
            entry, args, kwargs = self._enter_root(original, args, kwargs)
            return self._leave(entry, original(*args, **kwargs))

        self.model.forward = recorded_forward

    def _enter_root(self, fn: Callable, args: tuple, kwargs: dict) -> tuple[dict, tuple, dict]:
        return self._enter(ROOT, self.model, fn, args, kwargs), args, kwargs

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watched.clear()  # backward is over: let the watched tensors go
        self._copies.clear()
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
