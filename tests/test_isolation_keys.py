"""init_from and force_from on small modules: the initial state through a name map (strict), the
generators restored, and clear errors for a reference that does not fit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from nestalign import artifacts as art
from nestalign.callback import CaptureCallback
from nestalign.namemap import NameMap
from nestalign.state import InitError, initial_state, restore_rng, rng_states, start_from


class Ref(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.norm = nn.BatchNorm1d(5)


class Port(nn.Module):
    """The same tensors under another name, one weight stored transposed."""

    def __init__(self):
        super().__init__()
        self.w_t = nn.Parameter(torch.zeros(3, 5))
        self.b = nn.Parameter(torch.zeros(5))
        self.norm = nn.BatchNorm1d(5)


def _reference_step(tmp_path) -> tuple[dict, object]:
    torch.manual_seed(0)
    ref = Ref()
    with torch.no_grad():
        ref.norm.running_mean.uniform_()
    state = initial_state(ref)
    step = tmp_path / "ref" / "step_0"
    step.mkdir(parents=True)
    art.save_tensors(step / art.INITIAL_WEIGHTS, state["weights"])
    art.save_tensors(step / art.INITIAL_RNG, state["rng"])
    return state["weights"], step


def test_rng_states_round_trip():
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    saved = rng_states()
    first = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng(art.to_plain(saved))
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_start_from_maps_names_and_layouts_and_restores_the_generators(tmp_path):
    weights, step = _reference_step(tmp_path)
    expected = torch.rand(3)  # what the reference's generator draws next
    nmap = NameMap(
        exact={"b": "proj.bias"},
        transforms=[{"match": r"^w_t$", "transpose": [1, 0]}],
        regex=[(r"^w_t$", "proj.weight")],
    )
    torch.manual_seed(123)
    port = Port()
    start_from(port, step, nmap)
    assert torch.equal(port.w_t, weights["proj.weight"].t())
    assert torch.equal(port.b, weights["proj.bias"])
    assert torch.equal(port.norm.running_mean, weights["norm.running_mean"])
    assert torch.equal(torch.rand(3), expected)


def test_start_from_is_strict_and_names_what_does_not_fit(tmp_path):
    _, step = _reference_step(tmp_path)
    with pytest.raises(InitError) as err:  # no rule for b, and w_t lacks its transpose
        start_from(Port(), step, NameMap(regex=[(r"^w_t$", "proj.weight")]))
    assert str(err.value).startswith(f"init_from={step}: ")
    assert "reference names missing: b (for b)" in str(err.value)
    assert "proj.weight has shape [5, 3], [3, 5] expected" in str(err.value)


def test_force_from_must_be_a_captured_step(tmp_path):
    step = tmp_path / "ref" / "step_3"
    step.mkdir(parents=True)
    art.save_json(step / art.METADATA, {"step": 3})
    with pytest.raises(ValueError, match=r"holds step 3, which is not among the steps"):
        CaptureCallback(str(tmp_path / "out"), steps=[0, 1], force_from=str(step))
