"""The capture library on small torch modules: names, call indices, gradients, files."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from nestalign import artifacts as art
from nestalign.callback import CaptureCallback
from nestalign.capture import ROOT, LayerRecorder, model_structure


class Block(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.act = act  # shared between blocks

    def forward(self, x):
        return self.act(self.linear(x))


class Pair(nn.Module):
    """Returns a tuple: two outputs of one input."""

    def forward(self, x):
        return x * 2, x.sum(-1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.SiLU()
        self.first = Block(shared)
        self.second = Block(shared)
        self.relu = nn.ReLU(inplace=True)
        self.pair = Pair()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.relu(self.first(x) - 0.1)
        h = self.second(h)
        h = self.first(h)  # the same block called twice
        doubled, summed = self.pair(h)
        return {"out": self.head(doubled), "summed": summed}


def run(model: nn.Module, x: torch.Tensor, record: bool):
    recorder = LayerRecorder(model) if record else None
    if recorder:
        recorder.start()
    out = model(x)
    loss = out["out"].square().mean() + out["summed"].mean()
    loss.backward()
    if recorder:
        recorder.stop()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads, recorder


@pytest.fixture
def net_and_input():
    torch.manual_seed(0)
    return Net(), torch.randn(3, 4, requires_grad=False)


def test_calls_are_named_indexed_and_ordered(net_and_input):
    model, x = net_and_input
    _, _, rec = run(model, x, record=True)
    names = [(c["name"], c["call"]) for c in rec.calls]
    assert names == [
        (ROOT, 0),
        ("first", 0),
        ("first.linear", 0),
        ("first.act", 0),
        ("relu", 0),
        ("second", 0),
        ("second.linear", 0),
        ("second.act", 0),  # the shared SiLU is named after the block that calls it
        ("first", 1),
        ("first.linear", 1),
        ("first.act", 1),
        ("pair", 0),
        ("head", 0),
    ]
    by_start = {c["start"]: c for c in rec.calls}
    assert all(by_start[c["parent_start"]]["name"] == c["parent"] for c in rec.calls[1:])
    # completion order: children finish before their parents
    assert rec.calls[2]["end"] < rec.calls[1]["end"] < rec.calls[0]["end"]


def test_recording_changes_no_number(net_and_input):
    model, x = net_and_input
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_plain, grads_plain, _ = run(model, x, record=False)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    out_rec, grads_rec, _ = run(model, x, record=True)
    assert all(torch.equal(out_plain[k], out_rec[k]) for k in out_plain)
    assert all(torch.equal(grads_plain[k], grads_rec[k]) for k in grads_plain)
    assert "forward" not in vars(model)  # the root wrapper is gone after stop()


def test_inplace_module_input_is_taken_before_the_call(net_and_input):
    model, x = net_and_input
    _, _, rec = run(model, x, record=True)
    relu = next(c for c in rec.calls if c["name"] == "relu")
    first_out = rec.calls[1]["outputs"]
    assert torch.equal(relu["inputs"][0], first_out - 0.1)
    assert (relu["inputs"][0] < 0).any()  # negative values survive in the recorded input
    assert torch.equal(relu["outputs"], relu["inputs"][0].clamp(min=0))


def test_tuple_and_dict_outputs_and_their_gradients(net_and_input):
    model, x = net_and_input
    _, _, rec = run(model, x, record=True)
    pair = next(c for c in rec.calls if c["name"] == "pair")
    assert isinstance(pair["outputs"], list) and len(pair["outputs"]) == 2
    # d loss / d summed = 1/3 for each of the 3 rows
    assert torch.allclose(pair["grad_outputs"][1], torch.full((3,), 1 / 3))
    root = rec.calls[0]
    assert set(root["outputs"]) == {"out", "summed"}
    out = root["outputs"]["out"]
    assert torch.allclose(root["grad_outputs"][0], 2 * out / out.numel())


def test_gradient_into_an_output_later_modified_in_place(net_and_input):
    """first's output feeds `- 0.1` then an in-place ReLU: its gradient is the pre-ReLU one."""
    model, x = net_and_input
    _, _, rec = run(model, x, record=True)
    first0 = rec.calls[1]
    relu = next(c for c in rec.calls if c["name"] == "relu")
    expected = relu["grad_outputs"][0] * (relu["inputs"][0] > 0)
    assert torch.equal(first0["grad_outputs"][0], expected)


def test_structure_lists_state_dict_in_order(net_and_input):
    model, _ = net_and_input
    model.register_buffer("counter", torch.zeros((), dtype=torch.int64))
    structure = model_structure(model)
    assert [e["name"] for e in structure["entries"]] == list(model.state_dict())
    counter = next(e for e in structure["entries"] if e["name"] == "counter")
    assert counter == {
        "name": "counter",
        "kind": "buffer",
        "shape": [],
        "dtype": "int64",
        "requires_grad": False,
    }
    assert structure["num_parameters"] == sum(p.numel() for p in model.parameters())


class LitNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        out = self(batch["x"])
        return out["out"].square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = [{"x": torch.randn(4)} for _ in range(8)]
        return torch.utils.data.DataLoader(data, batch_size=2)


def fit(tmp_path, steps, max_steps=3, fingerprint=False):
    torch.manual_seed(0)
    model = LitNet()
    cb = CaptureCallback(
        str(tmp_path), steps, metadata={"framework": "toy"}, fingerprint=fingerprint
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(model)
    return model, cb


def test_callback_writes_requested_steps_only(tmp_path):
    model, cb = fit(tmp_path, steps=[1], max_steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]  # no staging left behind
    step = tmp_path / "step_1"
    assert sorted(p.name for p in step.iterdir()) == sorted(art.ALL_FILES)
    for name in art.TENSOR_FILES:
        torch.load(step / name, weights_only=True)  # plain data only
    meta = json.loads((step / art.METADATA).read_text())
    assert meta["framework"] == "toy" and meta["step"] == 1
    weights = art.load_tensors(step / art.WEIGHTS)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # last step
    grads = art.load_tensors(step / art.GRADS)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    batch = art.load_tensors(step / art.BATCH)
    assert batch["x"].shape == (2, 4)
    calls = art.load_tensors(step / art.LAYERS)
    assert calls[0]["name"] == ROOT and calls[0]["grad_outputs"][0] is not None


@pytest.mark.parametrize("fingerprint", [False, True])
def test_the_initial_state_is_written_once_per_run(tmp_path, fingerprint):
    """Later steps hard-link the first step's initial_weights.pt and initial_rng.pt and reuse
    their index entries; the files are those a run that writes only that step has."""
    fit_with = lambda out, steps: fit(out, steps, fingerprint=fingerprint)  # noqa: E731
    fit_with(tmp_path / "all", [0, 1, 2])
    fit_with(tmp_path / "last", [2])
    first, *later = (tmp_path / "all" / f"step_{s}" for s in (0, 1, 2))
    alone = tmp_path / "last" / "step_2"
    for name in (art.INITIAL_WEIGHTS, art.INITIAL_RNG):
        files = [art.load_json(d / art.INDEX)["files"][name] for d in (first, *later, alone)]
        assert all(f == files[0] for f in files) and files[0]
        if fingerprint:
            assert not (first / name).exists()
            continue
        assert all((d / name).stat().st_ino == (first / name).stat().st_ino for d in later)
        assert (first / name).read_bytes() == (alone / name).read_bytes()
        assert (alone / name).stat().st_ino != (first / name).stat().st_ino


def test_weights_are_taken_after_the_optimizer_step(tmp_path):
    model, _ = fit(tmp_path, steps=[0], max_steps=1)
    weights = art.load_tensors(tmp_path / "step_0" / art.WEIGHTS)
    grads = art.load_tensors(tmp_path / "step_0" / art.GRADS)
    torch.manual_seed(0)
    initial = LitNet().state_dict()
    for name, grad in grads.items():  # plain SGD, lr 0.1
        assert torch.allclose(weights[name], initial[name] - 0.1 * grad)


def test_the_training_state_holds_the_norm_of_the_steps_gradients(tmp_path):
    """grad_norm is taken on the writer thread, from the copies the step's gradients file holds."""
    fit(tmp_path, steps=[0, 1], max_steps=2)
    for step in (0, 1):
        grads = art.load_tensors(tmp_path / f"step_{step}" / art.GRADS)
        state = art.load_tensors(tmp_path / f"step_{step}" / art.TRAINING_STATE)
        want = torch.cat([g.double().reshape(-1) for g in grads.values()]).norm()
        assert state["grad_norm"].dtype == torch.float64
        assert torch.allclose(state["grad_norm"], want, rtol=1e-12), step


def test_a_step_beyond_training_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"before capturing steps \[5\]"):
        fit(tmp_path, steps=[5], max_steps=2)


def test_failed_write_leaves_no_step_directory(tmp_path):
    writer = art.StepWriter(tmp_path, 0)
    writer.json(art.METADATA, {"a": 1})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_identical_content_gives_identical_bytes(tmp_path):
    obj = {"a": torch.arange(5.0), "b": [torch.ones(2, 2), None, "x"]}
    art.save_tensors(tmp_path / "one.pt", obj)
    art.save_tensors(tmp_path / "two.pt", obj)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()


def test_truncated_artifact_is_named_in_the_error(tmp_path):
    path = tmp_path / "loss.pt"
    art.save_tensors(path, torch.tensor(1.0))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(art.ArtifactError, match="loss.pt"):
        art.load_tensors(path)


def test_the_capture_process_keeps_freed_memory_on_glibc():
    """capture_main asks glibc's malloc to keep what is freed (runner.keep_freed_memory); each
    setting must be accepted. Run in a child, so the test process keeps its own allocator."""
    import os
    import platform
    import subprocess
    import sys

    code = "from nestalign.runner import keep_freed_memory; print(keep_freed_memory())"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")


def test_arguments_are_named_for_callables_that_cannot_be_hashed():
    from nestalign.capture import _bind

    class Forward:
        __hash__ = None  # an __eq__ without __hash__ makes a class unhashable

        def __call__(self, audio, length=None):
            return audio

    assert _bind(Forward(), (1,), {"length": 2}) == {"audio": 1, "length": 2}
    assert _bind(torch.nn.Linear(2, 2).forward, (3,), {}) == {"input": 3}
