"""The initial state category and the noise rule for weights (only an update can explain it)."""

from __future__ import annotations

import torch

from nestalign.compare import compare_steps, load_tolerances, verdict_lines
from nestalign.summary import rows as summary_rows
from nestalign.summary import tsv
from test_verdicts import make_step, pair, parts

TOLS = load_tolerances(atol=1e-6, rtol=1e-5)


def test_differing_initial_weights_are_their_own_finding(tmp_path):
    def edit(c):
        c["init"]["enc.lin.weight"] = c["init"]["enc.lin.weight"] + 0.6
        c["init"]["dec.bias"] = c["init"]["dec.bias"] + 0.1

    result = compare_steps(*pair(tmp_path, edit), TOLS)
    assert result["verdict"] == "fail"
    init = result["init"]
    assert (init["differs"], init["total"], init["first"]) == (2, 4, "enc.lin.weight")
    assert init["reason"].startswith("12 of 12 elements outside atol=1e-06")
    (entry,) = result["divergences"]
    assert {k: v for k, v in entry.items() if k not in ("max_abs", "max_rel")} == {
        "where": "initial weights: enc.lin.weight",
        "class": "init",
        "direction": "forward",
        "name": "enc.lin.weight",
        "module": "enc.lin",
    }
    assert abs(entry["max_abs"] - 0.6) < 1e-6
    lines = verdict_lines(result)
    assert lines[1] == f"  init differs: 2 of 4 tensors, first enc.lin.weight ({init['reason']})"
    assert "  divergence: initial weights: enc.lin.weight (init)" in lines
    assert "  fail [init] dec.bias: 2 of 2 elements outside atol=1e-06 rtol=1e-05" in "\n".join(
        lines
    )
    (row,) = summary_rows([result])
    assert row["verdict"] == "FAIL" and row["init_matched"] == "2/4"
    assert row["failing"].startswith("init:enc.lin.weight (12 of 12 elements outside")


def test_no_initial_state_is_a_note_not_an_error(tmp_path):
    def old(c):
        c["init"] = None

    result = compare_steps(*pair(tmp_path, old, old), TOLS)
    assert result["verdict"] == "pass" and "init" not in result["categories"]
    assert result["init"] is None
    assert result["notes"] == [
        {"category": "init", "name": "initial state", "reason": "no initial state captured"}
    ]
    (row,) = summary_rows([result])
    assert row["init_matched"] is None and "\tPASS\t" in tsv([row])
    one_side = compare_steps(*pair(tmp_path / "b", old), TOLS)
    assert one_side["verdict"] == "pass"
    assert one_side["notes"][0]["reason"] == "no initial state captured in the candidate"


def _noise_bias(c, delta: float = 0.0, init_delta: float = 0.0, grad: float = 1.0):
    """enc.lin.bias gets a gradient at noise level (1e-12 beside a weight gradient of ~1);
    the candidate's updated bias differs by ``delta``, its initial bias by ``init_delta``."""
    c["grads"]["enc.lin.bias"] = torch.full((4,), 1e-12 * grad)
    c["weights"]["enc.lin.bias"] = c["weights"]["enc.lin.bias"] + delta
    c["init"]["enc.lin.bias"] = c["init"]["enc.lin.bias"] + init_delta


def _bias_rows(tmp_path, step: int = 0, **kw):
    ref, cand = parts(step=step), parts(step=step)
    _noise_bias(ref)
    _noise_bias(cand, grad=2.0, **kw)
    result = compare_steps(make_step(tmp_path / "r", ref), make_step(tmp_path / "c", cand), TOLS)
    rows = {
        c: {r["name"]: r for r in result["categories"][c]["rows"]} for c in ("grads", "weights")
    }
    assert rows["grads"]["enc.lin.bias"]["status"] == "noise"
    return result, rows["weights"]["enc.lin.bias"]


def test_a_weight_updated_from_noise_within_one_step_of_lr_is_noise(tmp_path):
    result, row = _bias_rows(tmp_path, delta=1e-3)  # lr 1e-3, step 0: at most 4e-3
    assert row["status"] == "noise"
    assert row["reason"].startswith("updated from a gradient at noise level; ")
    assert result["verdict"] == "pass"


def test_a_weight_further_than_the_update_can_move_it_fails(tmp_path):
    result, row = _bias_rows(tmp_path, delta=0.6)
    assert row["status"] == "fail"
    assert row["reason"].startswith(
        "differs by 0.6, more than one step of lr 0.001 can move it; 4 of 4 elements outside"
    )
    assert result["verdict"] == "fail"
    assert f"  fail [weights] enc.lin.bias: {row['reason']}" in "\n".join(verdict_lines(result))


def test_a_weight_whose_initial_value_differed_is_never_noise(tmp_path):
    result, row = _bias_rows(tmp_path, delta=1e-3, init_delta=1e-3)
    assert row["status"] == "fail"
    assert row["reason"].startswith("initial weights differ; 4 of 4 elements outside")
    assert result["init"]["first"] == "enc.lin.bias"


def test_the_bound_grows_with_the_step(tmp_path):
    _, row = _bias_rows(tmp_path / "a", step=2, delta=1e-2)  # 4 * 3 * 1e-3 = 1.2e-2
    assert row["status"] == "noise"
    _, row = _bias_rows(tmp_path / "b", step=2, delta=2e-2)
    assert row["reason"].startswith("differs by 0.02, more than 3 steps of lr 0.001 can move it")
