"""Training state after a captured step, and resuming a run from it bitwise.

A capture writes ``training_state.pt`` beside each step: the optimizer's state per parameter
name, the scheduler states, the trainer's counters, the data position (the epoch's batches and
which comes next) and the generator states at the two places a continuation needs them:

- ``rng_before``: when the step's training starts (what the ``rng`` compare category checks);
- ``rng_after``: when the run next touched its data after the step (after any validation that
  ends an epoch), or when it ended.

``resume_from=STEP_DIR`` starts a run right after that step: weights from
``parameter_weights.pt``, everything else from ``training_state.pt``; the loader yields the rest of
the saved epoch, each generator is set back where the original run had it, and the trainer's
step, epoch and batch counters continue. The train loader's batch sampler is wrapped for this
(``ResumableBatchSampler``) in every capture, resumed or not: the wrapper draws an epoch's batches
at its first request, as torch's samplers do, so wrapping changes nothing a run computes.
Only single-process loading (``num_workers=0``) is resumed exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nestalign import artifacts as art
from nestalign.namemap import IDENTITY, NameMap, NameMapError
from nestalign.state import InitError, load_weights, map_weights, restore_rng


class ResumeError(RuntimeError):
    """A saved training state that this run cannot continue from."""


class ResumableBatchSampler:
    """A DataLoader's batch sampler that remembers each epoch's batches and can continue one.

    ``on_entry`` is called each time the loader asks for something (a new epoch or a batch),
    before anything is drawn: the capture records there the state a continuation starts in.
    Lightning asks for each batch of a sized loader when its step starts, so the state recorded
    at the request for batch k is the run's state just before step k's data is loaded.

    With ``resume`` (a saved data position and ``rng_after``) the first request continues the
    saved epoch, generators set back first; when the saved step ended its epoch, the generators
    are set back when the next epoch's iterator is made (before the loader draws its seed).
    ``on_resume(position)`` is called then, for the trainer's counters.
    """

    def __init__(
        self,
        inner: Any,
        on_entry: Callable[[], None],
        resume: dict[str, Any] | None = None,
        on_resume: Callable[[int], None] | None = None,
    ):
        self.inner = inner
        self.on_entry = on_entry
        self.resume = resume
        self.on_resume = on_resume or (lambda position: None)
        self.batches: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        self.on_entry()
        # Lightning may make an iterator it never uses; each one resets to the saved state.
        if self.resume is not None and self.resume["next_position"] is None:
            restore_rng(self.resume["rng_after"])
        return self._epoch()

    def _epoch(self) -> Iterator[list[int]]:
        batches: list[list[int]] | None = None
        position = 0
        while True:
            self.on_entry()
            if self.resume is not None:
                resume, self.resume = self.resume, None
                if resume["next_position"] is not None:
                    restore_rng(resume["rng_after"])
                    batches, position = resume["batches"], resume["next_position"]
                    self.on_resume(position)
            if batches is None:
                batches = [[int(i) for i in b] for b in self.inner]
            self.batches = batches
            if position >= len(batches):
                return
            position += 1
            yield batches[position - 1]


def wrap_train_loader(
    pl_module: nn.Module,
    on_entry: Callable[[], None],
    resume: dict[str, Any] | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> list[ResumableBatchSampler]:
    """Make ``pl_module.train_dataloader()`` return its loader with a ResumableBatchSampler.

    Returns a list that receives the sampler once Lightning asks for the loader.
    """
    made: list[ResumableBatchSampler] = []
    original = pl_module.train_dataloader

    def train_dataloader():
        loader = original()
        inner = getattr(loader, "batch_sampler", None)
        if inner is None or getattr(loader, "num_workers", 0) != 0:
            return loader  # not resumable; training_state.pt says so
        if not isinstance(inner, ResumableBatchSampler):
            # DataLoader refuses to change its sampler after construction; the loader is ours
            # to wrap here and nothing else holds its old sampler.
            sampler = ResumableBatchSampler(inner, on_entry, resume, on_resume)
            object.__setattr__(loader, "batch_sampler", sampler)
        made[:] = [loader.batch_sampler]
        return loader

    pl_module.train_dataloader = train_dataloader
    return made


def named_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's state_dict with parameter names in place of its indices."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [
        name_of.get(id(p), f"<unnamed {i}>")
        for g in optimizer.param_groups
        for i, p in enumerate(g["params"])
    ]
    raw = optimizer.state_dict()
    groups = []
    for group in raw["param_groups"]:
        groups.append({**group, "params": [order[i] for i in group["params"]]})
    return {
        "state": {order[i]: art.to_plain(s) for i, s in raw["state"].items()},
        "param_groups": art.to_plain(groups),
    }


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    named: dict[str, Any],
    name_map: NameMap | None = None,
    where: str = "resume_from",
) -> None:
    """Load ``named_optimizer_state`` output, saved under the name map's reference names.

    Groups pair by position and must hold the same parameters; the saved hyperparameters are
    loaded. Per-parameter tensors go through the map's renames and transforms like weights;
    a number (Adam's ``step``) is taken from the reference parameter(s) the candidate's stands
    for. Parameters the map ignores keep their own state.
    """
    nmap = name_map or IDENTITY
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    own = [[name_of.get(id(p), "<unnamed>") for p in g["params"]] for g in optimizer.param_groups]
    refs = {
        n: [r for r, _ in nmap.map_shape(n, list(params[n].shape))] if n in params else [n]
        for g in own
        for n in g
    }
    saved = named["param_groups"]
    mapped = [sorted(r for n in g for r in refs[n] if not nmap.ignored(r)) for g in own]
    if len(own) != len(saved) or any(
        m != sorted(g["params"]) for m, g in zip(mapped, saved, strict=False)
    ):
        diff = sorted(
            set(sum(mapped, [])).symmetric_difference(r for g in saved for r in g["params"])
        )
        raise ResumeError(
            f"{where}: the optimizer's parameters differ from the saved state's "
            f"({sum(map(len, mapped))} vs {sum(len(g['params']) for g in saved)} parameters in "
            f"{len(own)} vs {len(saved)} groups"
            + (f"; not in both: {', '.join(diff[:3])}" if diff else "")
            + ")"
        )
    order = [n for g in own for n in g]
    state: dict[int, dict[str, Any]] = {}
    current = optimizer.state_dict()["state"]
    for i, n in enumerate(order):
        ref_names = [r for r in refs[n] if not nmap.ignored(r)]
        if not ref_names:
            if i in current:
                state[i] = current[i]
            continue
        have = [r in named["state"] for r in ref_names]
        if not any(have):
            continue  # not stepped yet on the saved side
        if not all(have):
            raise ResumeError(f"{where}: {n}'s optimizer state is saved for only part of it")
        state[i] = _param_state(n, params.get(n), ref_names, named["state"], nmap, where)
    index = {n: i for i, n in enumerate(order)}
    groups = [
        {**g, "params": [index[n] for n in names]} for g, names in zip(saved, own, strict=True)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _param_state(
    name: str,
    param: torch.Tensor | None,
    ref_names: list[str],
    saved: dict[str, dict[str, Any]],
    nmap: NameMap,
    where: str,
) -> dict[str, Any]:
    """One candidate parameter's optimizer state from the saved state of its reference names."""
    out: dict[str, Any] = {}
    for key in saved[ref_names[0]]:
        values = [saved[r].get(key) for r in ref_names]
        shaped = param is not None and all(
            isinstance(v, torch.Tensor) and v.dim() > 0 for v in values
        )
        if shaped:
            try:
                ref = dict(zip(ref_names, values, strict=True))
                tensors = nmap.unmap_state(ref, {name: list(param.shape)})
            except NameMapError as exc:
                raise ResumeError(f"{where}: optimizer state {key!r}: {exc}") from exc
            out[key] = tensors[name]
            continue
        first = values[0]
        same = all(
            torch.equal(v, first) if isinstance(v, torch.Tensor) else v == first for v in values[1:]
        )
        if not same:
            raise ResumeError(f"{where}: {name}: the saved {key!r} differs between {ref_names}")
        out[key] = first
    return out


def trainer_position(trainer: Any) -> dict[str, int]:
    """Step, epoch and batch counters right after the current training batch."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return {
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
        "batch_in_epoch": int(epoch_loop.batch_idx),
        # Lightning counts the batch once this hook returns (no gradient accumulation here).
        "batches_that_stepped": int(epoch_loop._batches_that_stepped) + 1,
    }


def data_position(sampler: ResumableBatchSampler | None, trainer: Any) -> dict[str, Any] | None:
    """Where the loader stands after the current batch, or None when it is not resumable."""
    if sampler is None:
        return None
    after = int(trainer.fit_loop.epoch_loop.batch_idx) + 1
    if after >= len(sampler.batches):
        return {"batches": [], "next_position": None}
    return {"batches": sampler.batches, "next_position": after}


def _set_counter_fields(tracker: Any, value: int) -> None:
    for field in ("ready", "started", "processed", "completed"):
        if hasattr(tracker, field):
            setattr(tracker, field, value)


def _set_counter(progress: Any, value: int) -> None:
    for tracker in (progress.total, progress.current):
        _set_counter_fields(tracker, value)


class Resumer:
    """Puts a saved training state into a fresh run, each part at the moment it belongs.

    ``resume_from``: the run's own earlier capture. ``state_from`` (with ``name_map``): another
    framework's capture, whose tensors are named and laid out as the name map's reference.
    """

    def __init__(self, step_dir: str, name_map: NameMap | None = None, key: str = "resume_from"):
        self.step_dir = step_dir
        self.name_map = name_map
        self.where = f"{key}={step_dir}"
        self.state = art.load_tensors(f"{step_dir}/{art.TRAINING_STATE}")
        self.meta = art.load_json(f"{step_dir}/{art.METADATA}")
        if self.state.get("data") is None:
            raise ResumeError(
                f"{self.where}: its run's loader was not resumable "
                "(single-process loading, num_workers=0, is needed)"
            )
        self.step = int(self.meta["step"])

    def _weights(self, name: str, model: nn.Module) -> dict[str, torch.Tensor]:
        ref = art.load_tensors(f"{self.step_dir}/{name}")
        try:
            return map_weights(ref, model.state_dict(), self.name_map, self.where)
        except InitError as exc:
            raise ResumeError(str(exc)) from None

    def initial(self, model: nn.Module) -> dict[str, Any]:
        """The saved run's initial state, in this model's names (its initial_* artifacts)."""
        weights = art.to_plain(model.state_dict())  # names the map ignores keep their own
        weights.update(self._weights(art.INITIAL_WEIGHTS, model))
        return {"weights": weights, "rng": art.load_tensors(f"{self.step_dir}/{art.INITIAL_RNG}")}

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        load_weights(pl_module, self._weights(art.WEIGHTS, pl_module))
        load_named_optimizer_state(
            trainer.optimizers[0], pl_module, self.state["optimizer"], self.name_map, self.where
        )
        configs = trainer.lr_scheduler_configs
        saved = self.state["schedulers"]
        if len(configs) != len(saved):
            raise ResumeError(
                f"{self.where}: {len(saved)} saved schedulers, this run has {len(configs)}"
            )
        for config, state in zip(configs, saved, strict=True):
            own = config.scheduler.state_dict()
            if set(own) != set(state):
                diff = sorted(set(own).symmetric_difference(state))
                raise ResumeError(
                    f"{self.where}: the saved scheduler state does not fit "
                    f"{type(config.scheduler).__name__} (keys not in both: {', '.join(diff)})"
                )
            config.scheduler.load_state_dict(state)

    def on_train_start(self, trainer: Any) -> None:
        """Step and epoch counters, once the fit loop has made its first iterator."""
        pos = self.state["position"]
        epoch = pos["epoch"] + (1 if self.state["data"]["next_position"] is None else 0)
        _set_counter(trainer.fit_loop.epoch_progress, epoch)
        loop = trainer.fit_loop.epoch_loop
        optim = loop.automatic_optimization.optim_progress.optimizer
        for tracker in (optim.step.total, optim.zero_grad.total):
            _set_counter_fields(tracker, pos["global_step"])
        loop._batches_that_stepped = pos["batches_that_stepped"]

    def data(self) -> dict[str, Any]:
        """The sampler's resume argument: the saved data position and generators."""
        return {**self.state["data"], "rng_after": self.state["rng_after"]}

    def on_resume(self, trainer: Any) -> Callable[[int], None]:
        """Batch counters of the resumed epoch, set when its first batch is asked for."""

        def set_position(position: int) -> None:
            _set_counter(trainer.fit_loop.epoch_loop.batch_progress, position)
            trainer.fit_loop._data_fetcher.fetched = position

        return set_position
