"""Planted faults: each copy of a small speech-encoder-like model changes one place, and the
comparison must name that place as the first culprit (or the parent's glue), forward and
backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nestalign import artifacts as art
from nestalign.capture import LayerRecorder, model_structure
from nestalign.compare import compare_steps, load_tolerances
from nestalign.forcing import ForcingRecorder

D, HEADS, FEATS, VOCAB, T = 16, 2, 8, 11, 24


class Attention(nn.Module):
    def __init__(self, fault: str):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.drop = nn.Dropout(0.1)
        self.scale = (D // HEADS) ** -0.5 * (1.1 if fault == "scale" else 1.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, HEADS, D // HEADS).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], -1e4)
        p = self.drop(scores.softmax(-1))
        return self.o((p @ v).transpose(1, 2).reshape(b, t, D))


class _ScaledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class GradGate(nn.Module):
    """Identity forward; a faulty copy scales the gradient on the way back."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledBackward.apply(x, self.scale)


class FeedForward(nn.Module):
    def __init__(self, fault: str):
        super().__init__()
        self.lin1, self.act = nn.Linear(D, 2 * D), nn.SiLU()
        self.gate = GradGate(1.5 if fault == "bad_backward" else 1.0)
        self.drop, self.lin2 = nn.Dropout(0.1), nn.Linear(2 * D, D)
        self.skip_dropout = fault == "missing_dropout"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.act(self.lin1(x)))
        return self.lin2(h if self.skip_dropout else self.drop(h))


class Block(nn.Module):
    def __init__(self, index: int, fault: str):
        super().__init__()
        eps = 1e-3 if fault == "eps" and index == 1 else 1e-5
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D, eps=eps)
        self.attn = Attention(fault if index == 1 else "")
        self.ff = FeedForward(fault if index == 1 else "")
        self.drop = nn.Dropout(0.1)
        self.swap = fault == "swap" and index == 2
        self.drop_mask = fault == "drop_mask" and index == 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.swap:
            x = x + self.ff(self.norm2(x))
            return x + self.drop(self.attn(self.norm1(x), mask))
        x = x + self.drop(self.attn(self.norm1(x), None if self.drop_mask else mask))
        return x + self.ff(self.norm2(x))


class Subsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(FEATS, D, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(D, D, 3, padding=1)  # its bias gradient is zero: BatchNorm follows
        self.norm = nn.BatchNorm1d(D)
        self.act = nn.ReLU()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(feats.transpose(1, 2)))
        return self.act(self.norm(self.conv2(x))).transpose(1, 2)


class TinyEncoder(nn.Module):
    def __init__(self, fault: str = ""):
        super().__init__()
        self.fault = fault
        self.sub = Subsampling()
        self.blocks = nn.ModuleList(Block(i, fault) for i in range(3))
        self.out = nn.Linear(D, VOCAB)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor):
        x = self.sub(feats)
        sub_len = (lengths + 1) // 2 + (1 if self.fault == "mask_off_by_one" else 0)
        mask = torch.arange(x.shape[1])[None, :] < sub_len[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x), mask


def build(fault: str, seed: int) -> TinyEncoder:
    torch.manual_seed(seed)
    model = TinyEncoder(fault)
    if fault == "transposed":
        with torch.no_grad():
            w = model.blocks[0].attn.q.weight
            w.copy_(w.t().clone())
    return model


def capture(run_dir: Path, fault: str, seed: int = 7, forced_by: Path | None = None) -> Path:
    """One training step of the model with LayerRecorder, written as a step directory.

    ``forced_by``: a reference step to teacher-force this one with. The model is then built from
    another seed and loaded with the reference's initial weights (kept beside its run as
    initial.pt), and the generator is left in another state: forcing must replay its draws."""
    torch.set_num_threads(1)
    model = build(fault, seed if forced_by is None else seed + 100).train()
    if forced_by is not None:
        model.load_state_dict(art.load_tensors(forced_by.parent / "initial.pt"))
        if fault == "transposed":
            with torch.no_grad():
                w = model.blocks[0].attn.q.weight
                w.copy_(w.t().clone())
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, T, FEATS, generator=gen)
    lengths = torch.tensor([T, T - 9])
    targets = torch.randint(0, VOCAB, (2, T // 2), generator=gen)
    torch.manual_seed(seed + 1 if forced_by is None else seed + 999)
    if forced_by is None:
        rec = LayerRecorder(model)
    else:
        rec = ForcingRecorder(model, art.load_tensors(forced_by / art.LAYERS))
    rec.start()
    logits, mask = model(feats, lengths)
    loss = nn.functional.cross_entropy(logits[mask], targets[mask])
    loss.backward()
    rec.stop()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    writer = art.StepWriter(run_dir, 0)
    writer.json(art.METADATA, {"framework": fault or "reference", "seed": seed, "step": 0})
    writer.json(art.STRUCTURE, model_structure(model))
    writer.tensors(art.BATCH, {"feats": feats, "lengths": lengths, "targets": targets})
    writer.tensors(art.FORWARD, {"logits": logits.detach(), "mask": mask})
    writer.tensors(art.LOSS, loss.detach())
    writer.tensors(art.GRADS, grads)
    writer.tensors(art.WEIGHTS, art.to_plain(model.state_dict()))
    writer.tensors(art.LAYERS, rec.calls)
    return writer.commit()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return capture(tmp_path_factory.mktemp("ref"), "")


TOLS = {"atol": 1e-6, "rtol": 1e-5}

# fault -> (kind of the first forward culprit, the module it names)
FAULTS = {
    "eps": ("culprit", "blocks.1.norm2"),
    "scale": ("glue", "blocks.1.attn"),
    "transposed": ("culprit", "blocks.0.attn.q"),
    "missing_dropout": ("missing", "blocks.1.ff.drop"),
    "mask_off_by_one": ("glue", "<root>"),
    "swap": ("glue", "blocks.2"),
    "drop_mask": ("glue", "blocks.1"),
}


def test_identical_runs_pass(reference, tmp_path):
    result = compare_steps(reference, capture(tmp_path, ""), load_tolerances(**TOLS))
    assert result["verdict"] == "pass", result["categories"]["layers"]["worst"]
    assert result["divergence"]["forward"]["first"] is None
    assert result["divergence"]["backward"]["first"] is None
    assert result["categories"]["layers"]["matched"] == result["categories"]["layers"]["total"]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_first_culprit_is_the_planted_fault(reference, tmp_path, fault):
    result = compare_steps(reference, capture(tmp_path, fault), load_tolerances(**TOLS))
    assert result["verdict"] == "fail"
    kind, module = FAULTS[fault]
    first = result["divergence"]["forward"]["first"]
    assert first is not None and (first["kind"], first["module"]) == (kind, module), first
    back = result["divergence"]["backward"]["first"]
    assert back is not None and back["module"] == module, back


def test_backward_only_fault(reference, tmp_path):
    """Forward identical, one module's backward scales its gradient: the backward walk names it."""
    result = compare_steps(reference, capture(tmp_path, "bad_backward"), load_tolerances(**TOLS))
    assert result["verdict"] == "fail"
    assert result["divergence"]["forward"]["first"] is None
    assert result["categories"]["layers"]["failed"] == 0
    back = result["divergence"]["backward"]["first"]
    assert (back["kind"], back["module"]) == ("culprit", "blocks.1.ff.gate"), back
    assert back["name"] == "blocks.1.ff.act#0"  # the first gradient that differs


def test_parent_of_culprit_contains_it(reference, tmp_path):
    result = compare_steps(reference, capture(tmp_path, "eps"), load_tolerances(**TOLS))
    classes = {c["name"]: c["class"] for c in result["divergence"]["forward"]["calls"]}
    assert classes["blocks.1.norm2#0"] == "culprit"
    assert classes["blocks.1#0"] == "contains culprit"
    assert classes["<root>#0"] == "contains culprit"
    assert classes["blocks.2.norm1#0"] == "victim"
    assert "blocks.1.attn#0" not in classes  # ran before the fault and matched


@pytest.mark.parametrize("atol", [0.0, 1e-6])
def test_zero_gradients_are_noise(reference, tmp_path, atol):
    """conv2.bias (BatchNorm follows) and the key projection's bias (softmax ignores a shift)
    have zero gradients in exact arithmetic: both sides hold rounding noise, reported as such and
    kept out of the worst errors, while real differences next to them still fail."""
    tols = load_tolerances(atol=atol, rtol=1e-5)
    result = compare_steps(reference, capture(tmp_path, "eps"), tols)
    grads = result["categories"]["grads"]
    rows = {r["name"]: r for r in grads["rows"]}
    for name in ("sub.conv2", "blocks.0.attn.k"):
        bias, weight = rows[f"{name}.bias"], rows[f"{name}.weight"]
        assert bias["scale"] < 1e-5 * weight["scale"]
        assert bias["status"] == "noise" and "noise level" in bias["reason"]
        assert weight["status"] == "fail"
        assert f"{name}.bias" in grads["noise"]
    assert grads["worst"]["item"] not in grads["noise"]
    assert grads["worst"]["max_rel"] < 10


@pytest.fixture(scope="module")
def forced_reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("forced_ref")
    art.save_tensors(run / "initial.pt", art.to_plain(build("", 7).state_dict()))
    return capture(run, "")


# fault -> every divergence one forced run must list: (where, class, direction)
FORCED = {
    "": [],
    "eps": [("blocks.1.norm2#0 (LayerNorm)", "code", "forward")],
    "scale": [("glue in blocks.1.attn before blocks.1.attn.drop#0", "glue", "forward")],
    "transposed": [("blocks.0.attn.q#0 (Linear)", "code", "forward")],
    "missing_dropout": [("blocks.1.ff.drop#0 (missing in candidate)", "missing", "forward")],
    "mask_off_by_one": [("glue in <root> before blocks.0#0", "glue", "forward")],
    "swap": [("glue in blocks.2 before blocks.2.norm1#0", "glue", "forward")],
    "drop_mask": [("glue in blocks.1 before blocks.1.attn#0", "glue", "forward")],
    "bad_backward": [("blocks.1.ff.gate#0 (GradGate)", "code", "backward")],
}


@pytest.mark.parametrize("fault", sorted(FORCED))
def test_forced_run_lists_only_the_planted_fault(forced_reference, tmp_path, fault):
    """Teacher forcing: each call runs on the reference's inputs, so the one planted place is
    the only divergence listed, with its class, and everything after it matches."""
    cand = capture(tmp_path, fault, forced_by=forced_reference)
    result = compare_steps(forced_reference, cand, load_tolerances(**TOLS))
    got = [(e["where"], e["class"], e["direction"]) for e in result["divergences"]]
    assert got == FORCED[fault], got


@pytest.mark.parametrize("tols", [{}, {"atol": 1e-5, "rtol": 1e-5}], ids=["per-dtype", "1e-5"])
@pytest.mark.parametrize("fault", sorted(FAULTS) + ["bad_backward"])
def test_failing_layer_gradients_always_name_a_backward_culprit(reference, tmp_path, fault, tols):
    """A '-' reads as "no backward divergence": whenever a layer gradient fails, some place is
    named backward."""
    result = compare_steps(reference, capture(tmp_path, fault), load_tolerances(**tols))
    assert result["categories"]["layer_grads"]["failed"], fault  # every fault changes some
    assert result["divergence"]["backward"]["first"] is not None, fault
