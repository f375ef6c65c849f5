"""Lightning callback that captures the requested training steps of any LightningModule.

    from nestalign.callback import CaptureCallback
    trainer = Trainer(..., callbacks=[CaptureCallback("out/run", steps=[0, 2], metadata={...})])

For each step in ``steps`` (0 = the first optimizer step) it writes ``out/run/step_N/`` with the
batch, the forward output, the loss, the parameter gradients before the optimizer step, the state
after it, every module call (see nestalign.capture and docs/artifacts.md), and the run's initial
state (weights and generators when fitting starts). Other steps run untouched: no hook is
attached while they run.

Isolation (docs/compare.md): ``init_from=STEP_DIR`` starts the run from a reference capture's
initial state (weights through the name map, strictly, and every generator); ``force_from=STEP_DIR``
teacher-forces the step that directory holds (nestalign.forcing); ``state_from=STEP_DIR``
continues from a reference capture's complete training state after its step (nestalign.resume,
through the name map), so the next step's error is that step's own.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from nestalign import artifacts as art
from nestalign.capture import LayerRecorder, environment, model_structure, name_outputs
from nestalign.forcing import ForcingRecorder
from nestalign.namemap import NameMap
from nestalign.resume import (
    ResumableBatchSampler,
    ResumeError,
    Resumer,
    data_position,
    named_optimizer_state,
    trainer_position,
    wrap_train_loader,
)
from nestalign.state import initial_state, rng_states, start_from


class CaptureCallback(pl.Callback):
    def __init__(
        self,
        out_dir: str,
        steps: Iterable[int],
        metadata: dict[str, Any] | None = None,
        output_names: Iterable[str] | None = None,
        layer_grads: bool = True,
        init_from: str | None = None,
        force_from: str | None = None,
        name_map: NameMap | None = None,
        resume_from: str | None = None,
        config_yaml: str | None = None,
        state_from: str | None = None,
        fingerprint: bool = False,
    ):
        self.out_dir = out_dir
        self.fingerprint = fingerprint
        self.steps = sorted({int(s) for s in steps})
        self.metadata = dict(metadata or {})
        self.output_names = list(output_names or [])
        self.layer_grads = layer_grads
        self.init_from = init_from
        self.force_from = force_from
        self.name_map = name_map
        self.config_yaml = config_yaml
        self.forced = _forced_steps(force_from, self.steps)
        given = [k for k, v in (("resume_from", resume_from), ("state_from", state_from)) if v]
        given += ["init_from"] if init_from and given else []
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} exclude each other: each sets the start")
        self.resumer = (
            Resumer(resume_from)
            if resume_from is not None
            else Resumer(state_from, name_map, "state_from")
            if state_from is not None
            else None
        )
        if self.resumer is not None and self.steps[0] <= self.resumer.step:
            raise ValueError(
                f"{self.resumer.where} holds step {self.resumer.step}: the steps to capture "
                f"{self.steps} must all come after it"
            )
        self.metadata.update(init_from=init_from, force_from=force_from, state_from=state_from)
        self.metadata["capture"] = "fingerprint" if fingerprint else "full"
        self._recorder: LayerRecorder | None = None
        self._initial: dict[str, Any] | None = None
        self._step: int | None = None
        self._parts: dict[str, Any] = {}
        self._sampler: list[ResumableBatchSampler] = []
        # (writer, training state, gradient copies, the write of the other files)
        self._pending: tuple[art.StepWriter, dict[str, Any], dict, Future] | None = None
        self._commits: list[Future] = []  # each a written step's directory, or its error
        self._io = ThreadPoolExecutor(1, thread_name_prefix="capture-writer")
        self._initial_writer: art.StepWriter | None = None  # the first step this process wrote
        self._optimizer_steps = 0
        self.written: list[str] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        art.load_scanner()  # the fingerprints' compiled code, before any step is timed
        # Stop after the last captured step. Set here, once the schedulers exist: they are built
        # from the config's run length, which must not depend on the steps captured.
        loop = trainer.fit_loop.epoch_loop
        last = self.steps[-1] + 1
        loop.max_steps = last if loop.max_steps < 0 else min(loop.max_steps, last)
        resumer = self.resumer
        self._sampler = wrap_train_loader(
            pl_module,
            self._finish_pending,
            resumer.data() if resumer else None,
            resumer.on_resume(trainer) if resumer else None,
        )
        if self.resumer is not None:
            self._initial = self.resumer.initial(pl_module)
            self.resumer.on_fit_start(trainer, pl_module)
            return
        if self.init_from is not None:
            start_from(pl_module, self.init_from, self.name_map)
        self._initial = initial_state(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.resumer is not None:
            if not self._sampler:
                raise ResumeError(
                    f"{self.resumer.where}: this run's train loader cannot be "
                    "resumed (it needs a batch sampler and num_workers=0)"
                )
            self.resumer.on_train_start(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps:
            return
        self._step = step
        # The batch is copied before the forward: the model may modify it in place (dither).
        self._parts = {"batch": art.to_plain(batch), "rng_before": rng_states()}
        if step in self.forced:
            ref_calls = art.load_tensors(f"{self.forced[step]}/{art.LAYERS}")
            self._recorder = ForcingRecorder(pl_module, ref_calls, self.name_map, self.layer_grads)
        else:
            self._recorder = LayerRecorder(pl_module, grads=self.layer_grads)
        self._recorder.start()

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self._recorder is not None:
            self._parts["loss"] = loss.detach().to("cpu", copy=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._optimizer_steps += 1
        if self._recorder is None:
            return
        self._recorder.stop()  # nothing after the backward belongs to this step's calls
        self._parts["grads"] = {
            name: p.grad.detach().to("cpu", copy=True)
            for name, p in pl_module.named_parameters()
            if p.grad is not None
        }
        self._parts["lr"] = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._recorder is None:
            return
        recorder, parts, step = self._recorder, self._parts, self._step
        self._recorder, self._parts, self._step = None, {}, None
        recorder.stop()
        if "loss" not in parts and isinstance(outputs, dict) and "loss" in outputs:
            parts["loss"] = outputs["loss"].detach().to("cpu", copy=True)
        self._finish_pending()
        self._drain()  # the step before is written while this one trains, no further back
        state = training_state(trainer, pl_module, parts, self._sampler)
        loss = parts.get("loss")
        meta = {
            **self.metadata,
            "step": step,
            "global_step_after": trainer.global_step,
            "lr": parts.get("lr"),
            "loss": None if loss is None else _finite_or_str(float(loss)),
            "forced": step in self.forced,
            "run": {
                "resumed_from": self.resumer.step_dir if self.resumer else None,
                "optimizer_steps": self._optimizer_steps,
            },
            "resumable": state["data"] is not None,
            **environment(),
        }
        forward = name_outputs(recorder.root_output(), self.output_names)
        if all(v is None for v in forward.values()):
            print(
                f"warning: step {step}: the forward output is empty ({art.FORWARD} holds "
                f"{sorted(forward)} = None): the training step did not call the model's "
                "forward; the layers and gradients are still captured",
                file=sys.stderr,
            )
        files = [
            (art.BATCH, parts["batch"], False),
            (art.FORWARD, forward, False),
            (art.LOSS, loss, False),
            (art.GRADS, parts.get("grads", {}), False),
            (art.WEIGHTS, art.to_plain(pl_module.state_dict()), False),
            (art.LAYERS, recorder.calls, True),
        ]
        first = self._initial_writer
        initial = self._initial or {"weights": {}, "rng": {}}
        structure = model_structure(pl_module)
        writer = art.StepWriter(self.out_dir, step, self.fingerprint)

        def write() -> None:  # on the writer thread: every value above is a copy of its own
            writer.json(art.METADATA, meta)
            writer.json(art.STRUCTURE, structure)
            if self.config_yaml is not None:
                writer.text(art.CONFIG, self.config_yaml)
            for name, obj, once in files:
                writer.tensors(name, obj, once=once)
            if first is None:
                writer.tensors(art.INITIAL_WEIGHTS, initial["weights"])
                writer.tensors(art.INITIAL_RNG, initial["rng"])
            else:  # the run's first written step holds them: linked, not written again
                writer.reuse(art.INITIAL_WEIGHTS, first)
                writer.reuse(art.INITIAL_RNG, first)

        self._initial_writer = first or writer
        # Committed once the run has gone past what follows the step (see _finish_pending).
        self._pending = (writer, state, parts.get("grads", {}), self._io.submit(write))

    def _finish_pending(self) -> None:
        """Take the pending step's generator state as of now, and have the step committed.

        Called when the loader next asks for data and when training ends: what lies between the
        step and that moment (an epoch's validation) is part of the state a resumed run skips.
        The files are written on one background thread while training goes on; ``_drain`` waits.
        """
        if self._pending is None:
            return
        (writer, state, grads, written), self._pending = self._pending, None
        state = {**state, "rng_after": rng_states()}

        def commit() -> str:
            try:
                written.result()  # the step's other files (re-raises their error)
                state["grad_norm"] = grad_norm(grads)  # from the copies: off the training thread
                writer.tensors(art.TRAINING_STATE, state)
                return str(writer.commit())
            except BaseException:
                writer.abort()
                raise

        self._commits.append(self._io.submit(commit))

    def _drain(self) -> None:
        """Wait for the steps being written; a failed write is raised here."""
        commits, self._commits = self._commits, []
        for job in commits:
            self.written.append(job.result())

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._pending is not None:
            writer, _, _, written = self._pending
            self._pending = None
            wait([written])
            writer.abort()
        wait(self._commits)  # what was complete stays; a failed one has removed its staging
        self._commits = []

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish_pending()
        self._drain()
        missing = [s for s in self.steps if not any(p.endswith(f"step_{s}") for p in self.written)]
        if missing:
            raise RuntimeError(
                f"training ended at step {trainer.global_step} before capturing steps {missing}: "
                "raise trainer.max_steps or give the loader more data"
            )


def training_state(
    trainer, pl_module, parts: dict[str, Any], sampler: list[ResumableBatchSampler]
) -> dict[str, Any]:
    """Optimizer, schedulers, counters and data position after the step (TRAINING_STATE)."""
    return {
        "optimizer": named_optimizer_state(trainer.optimizers[0], pl_module),
        "lr_applied": parts.get("lr"),
        "grad_norm": None,  # grad_norm(parts["grads"]), taken on the writer thread
        "schedulers": [
            art.to_plain(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs
        ],
        "position": trainer_position(trainer),
        "data": data_position(sampler[0] if sampler else None, trainer),
        "rng_before": parts.get("rng_before"),
    }


def grad_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The L2 norm (float64) of all floating-point gradients; None when there are none."""
    norms = [g.double().norm() for g in grads.values() if g.is_floating_point()]
    return torch.stack(norms).norm() if norms else None


def _forced_steps(force_from: str | None, steps: list[int]) -> dict[int, str]:
    """{step: reference step dir} to teacher-force: one step dir, or a run dir of step_N dirs."""
    if force_from is None:
        return {}
    if Path(force_from, art.METADATA).is_file():
        meta = art.load_json(f"{force_from}/{art.METADATA}")
        step = int(meta.get("step", -1))
        if step not in steps:
            raise ValueError(
                f"force_from={force_from} holds step {meta.get('step')}, which is not among "
                f"the steps to capture {steps}"
            )
        return {step: force_from}
    dirs = {s: str(art.step_dir(force_from, s)) for s in steps}
    missing = [s for s, d in dirs.items() if not Path(d, art.METADATA).is_file()]
    if missing:
        raise ValueError(f"force_from={force_from}: no reference capture of steps {missing}")
    return dirs


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
