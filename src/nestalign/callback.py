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
teacher-forces the step that directory holds (nestalign.forcing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch

from nestalign import artifacts as art
from nestalign.capture import LayerRecorder, environment, model_structure, name_outputs
from nestalign.forcing import ForcingRecorder
from nestalign.namemap import NameMap
from nestalign.state import initial_state, start_from


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
    ):
        self.out_dir = out_dir
        self.steps = sorted({int(s) for s in steps})
        self.metadata = dict(metadata or {})
        self.output_names = list(output_names or [])
        self.layer_grads = layer_grads
        self.init_from = init_from
        self.force_from = force_from
        self.name_map = name_map
        self.forced_step: int | None = None
        if force_from is not None:
            meta = art.load_json(f"{force_from}/{art.METADATA}")
            self.forced_step = int(meta.get("step", -1))
            if self.forced_step not in self.steps:
                raise ValueError(
                    f"force_from={force_from} holds step {meta.get('step')}, which is not among "
                    f"the steps to capture {self.steps}"
                )
        self.metadata.update(init_from=init_from, force_from=force_from)
        self._recorder: LayerRecorder | None = None
        self._initial: dict[str, Any] | None = None
        self._step: int | None = None
        self._parts: dict[str, Any] = {}
        self.written: list[str] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.init_from is not None:
            start_from(pl_module, self.init_from, self.name_map)
        self._initial = initial_state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps:
            return
        self._step = step
        # The batch is copied before the forward: the model may modify it in place (dither).
        self._parts = {"batch": art.to_plain(batch)}
        if step == self.forced_step:
            ref_calls = art.load_tensors(f"{self.force_from}/{art.LAYERS}")
            self._recorder = ForcingRecorder(pl_module, ref_calls, self.name_map, self.layer_grads)
        else:
            self._recorder = LayerRecorder(pl_module, grads=self.layer_grads)
        self._recorder.start()

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self._recorder is not None:
            self._parts["loss"] = loss.detach().to("cpu", copy=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
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
        writer = art.StepWriter(self.out_dir, step)
        try:
            loss = parts.get("loss")
            meta = {
                **self.metadata,
                "step": step,
                "global_step_after": trainer.global_step,
                "lr": parts.get("lr"),
                "loss": None if loss is None else _finite_or_str(float(loss)),
                "forced": step == self.forced_step,
                **environment(),
            }
            writer.json(art.METADATA, meta)
            writer.json(art.STRUCTURE, model_structure(pl_module))
            writer.tensors(art.BATCH, parts["batch"])
            writer.tensors(art.FORWARD, name_outputs(recorder.root_output(), self.output_names))
            writer.tensors(art.LOSS, loss)
            writer.tensors(art.GRADS, parts.get("grads", {}))
            writer.tensors(art.WEIGHTS, art.to_plain(pl_module.state_dict()))
            writer.tensors(art.LAYERS, recorder.calls)
            initial = self._initial or {"weights": {}, "rng": {}}
            writer.tensors(art.INITIAL_WEIGHTS, initial["weights"])
            writer.tensors(art.INITIAL_RNG, initial["rng"])
            self.written.append(str(writer.commit()))
        except BaseException:
            writer.abort()
            raise

    def on_train_end(self, trainer, pl_module) -> None:
        missing = [s for s in self.steps if not any(p.endswith(f"step_{s}") for p in self.written)]
        if missing:
            raise RuntimeError(
                f"training ended at step {trainer.global_step} before capturing steps {missing}: "
                "raise trainer.max_steps or give the loader more data"
            )


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
