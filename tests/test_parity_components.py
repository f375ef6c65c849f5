"""Parity of the nest port with NeMo 3.0.0, component by component (real NeMo, CPU, bitwise).

Each env runs tests/parity_tools/run_model.py for the same seed and synthetic batch; the dumps
are compared here with exact equality: initial weights, log-mel features, tokens, masks, one
conformer layer, and every module call of a full train-mode forward/backward (outputs and
gradients flowing into them) plus the parameter gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import run_python

TOOL = "tests/parity_tools/run_model.py"
TINY = [
    "model.encoder.n_layers=2",
    "model.encoder.d_model=64",
    "model.encoder.n_heads=4",
    "model.encoder.subsampling_conv_channels=64",
]

pytestmark = pytest.mark.slow


def dump(out: Path, args: list[str]) -> dict[str, Path]:
    for fw in ("nemo", "nest"):
        run_python(fw, [TOOL, "--framework", fw, "--out", str(out / fw), *args])
    return {fw: out / fw for fw in ("nemo", "nest")}


def load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def leaves(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in leaves(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in leaves(v)]
    return [obj]


def max_abs_diff(a: Any, b: Any) -> float:
    """0.0 when bitwise equal (NaNs at the same places count as equal), else the largest gap."""
    if not isinstance(a, torch.Tensor):
        return 0.0 if a == b else float("inf")
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    both_nan = a.isnan() & b.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=bool)
    if torch.equal(a[~both_nan], b[~both_nan]):
        return 0.0
    return (a.double() - b.double()).abs()[~both_nan].max().item()


def assert_same(a: Any, b: Any, what: str) -> None:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb), f"{what}: {len(la)} vs {len(lb)} values"
    worst = max((max_abs_diff(x, y) for x, y in zip(la, lb, strict=True)), default=0.0)
    assert worst == 0.0, f"{what}: max abs diff {worst}"


def calls_of(step: dict, name: str) -> list[dict]:
    return [c for c in step["calls"] if c["name"] == name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    # 3 utterances of 9/7.5/5 s: 313 quantizer rows (more than one chunk), 2 threads
    args = ["--seed", "3", "--threads", "2", "--seconds", "9.0,7.5,5.0", *TINY]
    return dump(tmp_path_factory.mktemp("parity_tiny"), args)


@pytest.fixture(scope="module")
def steps(tiny) -> dict[str, dict[str, dict]]:
    """steps[mode][framework]: the recorded eval-mode and train-mode steps."""
    return {
        mode: {fw: load(p / f"{mode}.pt") for fw, p in tiny.items()} for mode in ("eval", "train")
    }


def test_initial_weights_and_structure(tiny):
    ref, got = load(tiny["nemo"] / "weights.pt"), load(tiny["nest"] / "weights.pt")
    assert list(ref) == list(got)
    for key in ref:
        assert max_abs_diff(ref[key], got[key]) == 0.0, key
    s_ref, s_got = load(tiny["nemo"] / "structure.pt"), load(tiny["nest"] / "structure.pt")
    assert s_ref["entries"] == s_got["entries"]
    assert [m["name"] for m in s_ref["modules"]] == [m["name"] for m in s_got["modules"]]


@pytest.mark.parametrize(
    "component", ["preprocessor", "preprocessor.featurizer", "quantizer", "mask_processor"]
)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_features_tokens_masks(steps, component, mode):
    ref, got = (calls_of(steps[mode][fw], component) for fw in ("nemo", "nest"))
    assert len(ref) == len(got) > 0
    for r, g in zip(ref, got, strict=True):
        assert_same(r["inputs"], g["inputs"], f"{component} inputs")
        assert_same(r["outputs"], g["outputs"], f"{component} outputs")


def test_one_conformer_layer(steps):
    ref, got = (calls_of(steps["train"][fw], "encoder.layers.0") for fw in ("nemo", "nest"))
    assert len(ref) == len(got) == 1
    for field in ("inputs", "outputs", "grad_outputs"):
        assert_same(ref[0][field], got[0][field], f"encoder.layers.0 {field}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_full_forward_backward(steps, mode):
    ref, got = steps[mode]["nemo"], steps[mode]["nest"]
    key = lambda c: (c["name"], c["call"], tuple(c["input_names"]))  # noqa: E731
    assert [key(c) for c in ref["calls"]] == [key(c) for c in got["calls"]]
    for r, g in zip(ref["calls"], got["calls"], strict=True):
        for field in ("inputs", "outputs", "grad_outputs"):
            assert_same(r[field], g[field], f"{r['name']}#{r['call']} {field}")
    assert_same(ref["outputs"], got["outputs"], "forward outputs and loss")
    assert torch.isfinite(got["outputs"]["loss"])
    assert list(ref["grads"]) == list(got["grads"])
    assert len(got["grads"]) == (88 if mode == "train" else 0)
    assert_same(ref["grads"], got["grads"], "parameter gradients")
    assert_same(ref["batch_after"], got["batch_after"], "batch after the in-place dither")
    assert_same(ref["buffers"], got["buffers"], "buffers (BatchNorm running stats, pe table)")


def test_full_config_weights_and_eval_forward(tmp_path):
    runs = dump(tmp_path, ["--seed", "0", "--threads", "2", "--seconds", "3.0,2.2", "--no-train"])
    ref, got = load(runs["nemo"] / "weights.pt"), load(runs["nest"] / "weights.pt")
    assert list(ref) == list(got) and len(ref) == 699
    for key in ref:
        assert max_abs_diff(ref[key], got[key]) == 0.0, key
    ref, got = load(runs["nemo"] / "eval.pt"), load(runs["nest"] / "eval.pt")
    assert [(c["name"], c["call"]) for c in ref["calls"]] == [
        (c["name"], c["call"]) for c in got["calls"]
    ]
    for r, g in zip(ref["calls"], got["calls"], strict=True):
        assert_same(r["outputs"], g["outputs"], f"{r['name']}#{r['call']} outputs")
    assert_same(ref["outputs"], got["outputs"], "forward outputs and loss")


def test_long_audio_rebuilds_positional_table(tmp_path):
    # 51.3 s = 5136 feature frames > pos_emb_max_len 5000: both rebuild the table at this call
    runs = dump(tmp_path, ["--seed", "5", "--seconds", "51.3,20.0", "--no-train", *TINY])
    ref, got = load(runs["nemo"] / "eval.pt"), load(runs["nest"] / "eval.pt")
    assert got["buffers"]["encoder.pos_enc.pe"].shape == (1, 2 * 5136 - 1, 64)
    assert_same(ref["buffers"], got["buffers"], "buffers (pe table)")
    assert [(c["name"], c["call"]) for c in ref["calls"]] == [
        (c["name"], c["call"]) for c in got["calls"]
    ]
    for r, g in zip(ref["calls"], got["calls"], strict=True):
        assert_same(r["outputs"], g["outputs"], f"{r['name']}#{r['call']} outputs")
    assert_same(ref["outputs"], got["outputs"], "forward outputs and loss")
