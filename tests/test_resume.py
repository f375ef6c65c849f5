"""Resuming a run after a captured step (resume_from, nestalign.resume) gives the bytes of a run
from scratch, for the nest port and for real NeMo, mid-epoch and across an epoch end with its
validation run; the training state is compared two-sided (optimizer, rng categories) and a fault
planted in the optimizer's state is named there, by parameter, before the weights diverge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captures import capture_argv, nest_capture
from conftest import run_python
from nestalign import artifacts as art
from nestalign.callback import CaptureCallback
from nestalign.compare import compare_steps, load_tolerances
from nestalign.resume import ResumeError

# The tiny config's 8 training clips in batches of 2: steps 0-3 are epoch 0 (validation after
# step 3), steps 4-7 epoch 1.
RUN_FACTS = ("run", "overrides", "created")  # metadata keys that describe the process


def assert_same_run(a: Path, b: Path, steps: list[int]) -> None:
    """Every file of every step bitwise equal; metadata equal except the process facts."""
    for step in steps:
        da, db = art.step_dir(a, step), art.step_dir(b, step)
        assert sorted(p.name for p in da.iterdir()) == sorted([*art.ALL_FILES, art.CONFIG])
        for name in art.TENSOR_FILES + (art.STRUCTURE,):
            assert (da / name).read_bytes() == (db / name).read_bytes(), f"step {step}: {name}"
        # the fingerprints are equal; the index's file stamps are the files' own mtimes
        ia, ib = (art.load_json(d / art.INDEX) for d in (da, db))
        assert ia["files"] == ib["files"], f"step {step}: {art.INDEX}"
        ma, mb = (json.loads((d / art.METADATA).read_text()) for d in (da, db))
        for key in set(ma) | set(mb):
            if key not in RUN_FACTS:
                assert ma.get(key) == mb.get(key), f"step {step}: metadata {key}"


def optimizer_steps(run: Path, step: int) -> int:
    meta = json.loads((art.step_dir(run, step) / art.METADATA).read_text())
    return meta["run"]["optimizer_steps"]


@pytest.fixture(scope="module")
def nest_runs(tmp_path_factory, data) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("nest")
    scratch, parts = tmp / "scratch", tmp / "parts"
    nest_capture(scratch, data, steps="0,1,2,3,4,5")
    nest_capture(parts, data, steps="0,1,2")
    nest_capture(parts, data, (), f"resume_from={parts}/step_2", steps="3")  # ends epoch 0
    nest_capture(parts, data, (), f"resume_from={parts}/step_3", steps="4,5")  # after validation
    return {"scratch": scratch, "parts": parts}


@pytest.mark.slow
def test_nest_resumed_runs_equal_a_run_from_scratch(nest_runs):
    assert_same_run(nest_runs["scratch"], nest_runs["parts"], [0, 1, 2, 3, 4, 5])


@pytest.mark.slow
def test_a_resumed_run_trains_only_its_new_steps(nest_runs):
    assert optimizer_steps(nest_runs["scratch"], 5) == 6
    assert optimizer_steps(nest_runs["parts"], 2) == 3
    assert optimizer_steps(nest_runs["parts"], 3) == 1
    assert optimizer_steps(nest_runs["parts"], 5) == 2


@pytest.mark.slow
def test_the_training_state_holds_optimizer_rng_and_data_position(nest_runs):
    state = art.load_tensors(art.step_dir(nest_runs["scratch"], 3) / art.TRAINING_STATE)
    moments = state["optimizer"]["state"]["encoder.layers.0.self_attn.linear_q.weight"]
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(moments)
    assert float(moments["step"]) == 4.0
    assert state["position"] == {
        "global_step": 4,
        "epoch": 0,
        "batch_in_epoch": 3,
        "batches_that_stepped": 4,
    }
    assert state["data"]["next_position"] is None  # step 3 ended the epoch
    mid = art.load_tensors(art.step_dir(nest_runs["scratch"], 1) / art.TRAINING_STATE)
    assert mid["data"]["next_position"] == 2 and len(mid["data"]["batches"]) == 4
    assert not torch.equal(mid["rng_before"]["torch"], mid["rng_after"]["torch"])


def test_resume_from_a_later_step_is_refused(tmp_path, data):
    nest_capture(tmp_path, data, steps="0")
    with pytest.raises(ValueError, match=r"holds step 0: the steps to capture \[0\] must all"):
        CaptureCallback(str(tmp_path / "again"), [0], resume_from=str(tmp_path / "step_0"))


@pytest.mark.slow
def test_nemo_resumed_runs_equal_a_run_from_scratch(tmp_path, data):
    def capture(out: Path, steps: str, *keys: str) -> None:
        run_python("nemo", ["scripts/capture_nemo.py", *capture_argv(out, data, steps, *keys)])

    capture(tmp_path / "scratch", "0,1,2,3,4")
    capture(tmp_path / "parts", "0,1")
    capture(tmp_path / "parts", "2,3", f"resume_from={tmp_path}/parts/step_1")
    capture(tmp_path / "parts", "4", f"resume_from={tmp_path}/parts/step_3")
    assert_same_run(tmp_path / "scratch", tmp_path / "parts", [0, 1, 2, 3, 4])
    assert optimizer_steps(tmp_path / "parts", 4) == 1


def _scale_exp_avg_sq(name: str, factor: float):
    """A CaptureCallback whose run scales one parameter's exp_avg_sq right after step 0."""

    class Faulty(CaptureCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step - 1
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if step == 0:
                param = pl_module.get_parameter(name)
                trainer.optimizers[0].state[param]["exp_avg_sq"].mul_(factor)

    return Faulty


@pytest.mark.slow
def test_an_optimizer_fault_is_named_in_the_optimizer_category_first(tmp_path, data, monkeypatch):
    name = "encoder.layers.1.feed_forward2.linear1.weight"
    plain = nest_capture(tmp_path / "plain", data, steps="0,1").parent
    monkeypatch.setattr("nestalign.callback.CaptureCallback", _scale_exp_avg_sq(name, 4.0))
    faulty = nest_capture(tmp_path / "faulty", data, steps="0,1").parent
    tols = load_tolerances(atol=1e-5, rtol=1e-5)
    step0 = compare_steps(art.step_dir(plain, 0), art.step_dir(faulty, 0), tols)
    assert step0["verdict"] == "pass"
    step1 = compare_steps(art.step_dir(plain, 1), art.step_dir(faulty, 1), tols)
    assert step1["verdict"] == "fail"
    failed = [r["name"] for r in step1["categories"]["optimizer"]["rows"] if not r["ok"]]
    assert failed and all(f.startswith(name + ":") for f in failed), failed
    # the weights: at the tolerance nothing fails yet (the learning rate is still small);
    # bitwise, the faulty parameter is the only weight that moved differently
    assert step1["categories"]["weights"]["failed"] == 0
    a, b = (art.load_tensors(art.step_dir(run, 1) / art.WEIGHTS) for run in (plain, faulty))
    assert [k for k in a if not torch.equal(a[k], b[k])] == [name]
    assert step1["categories"]["rng"]["failed"] == 0


@pytest.mark.slow
def test_a_run_with_loader_workers_is_captured_but_not_resumable(tmp_path, data):
    """Worker processes draw their own batches: the capture says so, and resuming is refused
    (the workflow then reruns such a seed from step 0)."""
    step = nest_capture(tmp_path / "run", data, (), "model.train_ds.num_workers=1", steps="0")
    assert art.load_json(step / art.METADATA)["resumable"] is False
    assert art.load_tensors(step / art.TRAINING_STATE)["data"] is None
    with pytest.raises(ResumeError, match="its run's loader was not resumable"):
        CaptureCallback(str(tmp_path / "more"), [1], resume_from=str(step))
