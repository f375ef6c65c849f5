"""Step-level isolation (state_from, `isolation: {state: reference}`): a candidate step started
from the reference's complete training state after the step before carries only its own error.

On mutant ports (tests/mutants.py) that store a weight transposed, wrap a module (renamed
parameters) and build their modules in another order (another parameter order in the
optimizer), the state goes through the name map and the step is bitwise the reference's. A fault
planted in one step only fails that step alone, where the free-running run fails every later one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from captures import nest_capture
from mutants import combined_name_map
from nestalign import artifacts as art
from nestalign.callback import CaptureCallback
from nestalign.compare import compare_steps, load_tolerances
from nestalign.compare.verdict import failing_items
from nestalign.namemap import NameMap
from nestalign.resume import ResumeError, load_named_optimizer_state, named_optimizer_state

EXACT = load_tolerances(atol=0.0, rtol=0.0)
DEFAULT = load_tolerances(atol=1e-5, rtol=1e-5)
FAULT = "encoder.layers.1.feed_forward2.linear1"
PORT = [
    "transposed_weight",
    "wrapped_pre_encode",
    "init_attention_before_conv",
    "attn_arg_names",
    "identity_module",
]


# -- the optimizer's state through a name map (no training) -----------------------------------
class Ref(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(2, 2, bias=False)
        self.k = nn.Linear(2, 2, bias=False)
        self.out = nn.Linear(2, 3)


class Port(nn.Module):
    """q and k fused into one [4, 2] weight, out's weight stored [in, out], registered first."""

    def __init__(self):
        super().__init__()
        self.proj_t = nn.Parameter(torch.zeros(2, 3))
        self.bias = nn.Parameter(torch.zeros(3))
        self.qk = nn.Parameter(torch.zeros(4, 2))


TRANSFORMS = [
    {"match": r"qk", "split": {"dim": 0, "into": ["q.weight", "k.weight"]}},
    {"match": r"proj_t", "transpose": [1, 0]},
]
PORT_MAP = NameMap(
    exact={"bias": "out.bias"}, transforms=TRANSFORMS, regex=[(r"^proj_t$", "out.weight")]
)


def _stepped_ref() -> tuple[Ref, torch.optim.Optimizer]:
    torch.manual_seed(0)
    ref = Ref()
    opt = torch.optim.Adam(ref.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        ref.out(ref.k(ref.q(torch.randn(5, 2)))).square().sum().backward()
        opt.step()
    return ref, opt


def test_optimizer_state_goes_through_renames_splits_and_transposes():
    ref, ref_opt = _stepped_ref()
    saved = named_optimizer_state(ref_opt, ref)
    port = Port()
    opt = torch.optim.Adam(port.parameters(), lr=1.0)
    load_named_optimizer_state(opt, port, saved, PORT_MAP)
    state = {n: opt.state[p] for n, p in port.named_parameters()}
    ref_state = {n: ref_opt.state[p] for n, p in ref.named_parameters()}
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state["proj_t"][key], ref_state["out.weight"][key].t())
        assert torch.equal(state["bias"][key], ref_state["out.bias"][key])
        fused = torch.cat([ref_state["q.weight"][key], ref_state["k.weight"][key]])
        assert torch.equal(state["qk"][key], fused)
    assert float(state["qk"]["step"]) == 2.0
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.01


def test_an_optimizer_state_that_misses_a_parameter_is_refused_by_name():
    ref, ref_opt = _stepped_ref()
    saved = named_optimizer_state(ref_opt, ref)
    port = Port()
    opt = torch.optim.Adam(port.parameters())
    no_bias = NameMap(transforms=TRANSFORMS, regex=[(r"^proj_t$", "out.weight")])
    with pytest.raises(ResumeError, match=r"state_from=X: .*not in both: bias, out\.bias"):
        load_named_optimizer_state(opt, port, saved, no_bias, "state_from=X")


def test_state_from_excludes_resume_from_and_init_from(tmp_path):
    with pytest.raises(ValueError, match="resume_from and state_from exclude each other"):
        CaptureCallback(str(tmp_path), [1], resume_from="a", state_from="b")
    with pytest.raises(ValueError, match="state_from and init_from exclude each other"):
        CaptureCallback(str(tmp_path), [1], init_from="a", state_from="b")


# -- real captures of the nest port and its mutants --------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """The plain port's run over steps 0-4 (step 3 ends epoch 0 with its validation)."""
    return nest_capture(tmp_path_factory.mktemp("ref"), data, steps="0,1,2,3,4").parent


def _name_map(names: list[str], tmp: Path) -> tuple[NameMap, str]:
    path = tmp / "name_map.yaml"
    path.write_text(yaml.safe_dump(combined_name_map(names)))
    return NameMap.load(path), f"name_map={path}"


def _worst(result: dict, cats=("forward", "loss", "grads", "weights", "optimizer", "rng")):
    return {c: result["categories"][c]["worst"]["max_abs"] for c in cats}


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 4])  # mid-epoch, and right after the epoch's validation
def test_a_port_started_from_the_reference_state_is_bitwise_the_reference(
    tmp_path, data, reference, step
):
    nmap, key = _name_map(PORT, tmp_path)
    start = art.step_dir(reference, step - 1)
    cand = nest_capture(tmp_path / "cand", data, PORT, key, f"state_from={start}", steps=str(step))
    result = compare_steps(art.step_dir(reference, step), cand, EXACT, nmap)
    assert not result["errors"]
    # Every tensor is bitwise equal. The one number that is not is the gradient norm, a sum of
    # squares taken in each side's memory order: the transposed weight's gradient is summed in
    # another order, an fp-noise difference of the capture's own arithmetic.
    failing = failing_items(result)
    assert [(c, n) for c, n, _ in failing] in ([], [("optimizer", "grad_norm")]), failing
    norm = [r for r in result["categories"]["optimizer"]["rows"] if r["name"] == "grad_norm"]
    assert norm[0]["max_rel"] < 1e-15, norm
    worst = _worst(result, ("forward", "loss", "grads", "weights", "layers", "rng"))
    assert set(worst.values()) == {0.0}, worst
    moments = [r for r in result["categories"]["optimizer"]["rows"] if r["name"] != "grad_norm"]
    assert moments and all(r["max_abs"] == 0.0 for r in moments)
    meta = art.load_json(cand / art.METADATA)
    assert meta["state_from"] == str(start) and meta["run"]["optimizer_steps"] == 1


@pytest.mark.slow
def test_a_fused_projection_gets_its_state_split_back(tmp_path, data, reference):
    """fused_qkv: the optimizer's moments of linear_q/k/v are concatenated into linear_qkv's."""
    names = [*PORT, "fused_qkv"]
    nmap, key = _name_map(names, tmp_path)
    start = art.step_dir(reference, 1)
    cand = nest_capture(tmp_path / "cand", data, names, key, f"state_from={start}", steps="2")
    # fused_qkv sums the gradient into the attention input in one GEMM instead of three: fp
    # noise from there back to the encoder's start, which the default tolerance takes; the
    # moments of gradients that are zero in exact arithmetic are noise with them
    result = compare_steps(art.step_dir(reference, 2), cand, DEFAULT, nmap)
    assert result["verdict"] == "pass", result["errors"] or failing_items(result)
    rows = {r["name"]: r for r in result["categories"]["optimizer"]["rows"]}
    for part in ("q", "k", "v"):
        row = rows[f"encoder.layers.1.self_attn.linear_{part}.weight:exp_avg_sq"]
        assert row["cand_name"].startswith("encoder.layers.1.self_attn.linear_qkv.weight")
        assert row["status"] == "pass", row


@pytest.mark.slow
def test_a_fault_in_one_step_fails_only_that_step_when_each_step_starts_from_the_reference(
    tmp_path, data, reference
):
    fault = f"fault={FAULT}*1.001@1"
    free = nest_capture(tmp_path / "free", data, (), fault, steps="0,1,2").parent
    verdicts = [
        compare_steps(art.step_dir(reference, s), art.step_dir(free, s), DEFAULT)["verdict"]
        for s in (0, 1, 2)
    ]
    assert verdicts == ["pass", "fail", "fail"]  # free-running: step 2 inherits step 1's error
    own = {}
    for step in (1, 2):
        start = f"state_from={art.step_dir(reference, step - 1)}"
        cand = nest_capture(tmp_path / f"own_{step}", data, (), fault, start, steps=str(step))
        own[step] = compare_steps(art.step_dir(reference, step), cand, DEFAULT)
    assert own[1]["verdict"] == "fail"
    assert own[1]["divergence"]["forward"]["first"]["where"].startswith(FAULT)
    assert own[2]["verdict"] == "pass"
    assert set(_worst(own[2]).values()) == {0.0}, _worst(own[2])
