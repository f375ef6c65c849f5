"""Verdicts: pass with notes, non-finite, metadata cross-check, named failures, summary columns."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nestalign import artifacts as art
from nestalign.compare import compare_steps, load_tolerances, save_result, verdict_lines
from nestalign.compare.tolerances import TINY, ToleranceError, scaled_atol
from nestalign.summary import load_result, tsv
from nestalign.summary import rows as summary_rows

ROOT = Path(__file__).resolve().parents[1]
TOLS = load_tolerances(atol=1e-6, rtol=1e-5)
PARAMS = ("enc.lin.weight", "enc.lin.bias", "dec.weight", "dec.bias")


def parts(seed: int = 42, step: int = 0, lr: float = 1e-3) -> dict[str, Any]:
    """The content of a small step directory (two Linear layers), deterministic."""
    g = torch.Generator().manual_seed(0)
    init = {
        "enc.lin.weight": torch.randn(4, 3, generator=g),
        "enc.lin.bias": torch.randn(4, generator=g),
        "dec.weight": torch.randn(2, 4, generator=g),
        "dec.bias": torch.randn(2, generator=g),
    }
    x = torch.randn(5, 3, generator=g)
    h = x @ init["enc.lin.weight"].t() + init["enc.lin.bias"]
    out = h @ init["dec.weight"].t() + init["dec.bias"]
    grads = {n: torch.randn(p.shape, generator=g) for n, p in init.items()}
    weights = {n: p - lr * torch.sign(grads[n]) for n, p in init.items()}

    def call(name, kind, start, inputs, outputs):
        return {
            "name": name,
            "call": 0,
            "type": kind,
            "parent": None,
            "parent_start": None,
            "start": start,
            "end": start,
            "input_names": ["input"],
            "inputs": [inputs],
            "outputs": outputs,
            "grad_outputs": [torch.ones_like(outputs)],
        }

    return {
        "meta": {
            "framework": "ref",
            "seed": seed,
            "step": step,
            "lr": [lr],
            "threads": 1,
            "device": "cpu",
            "deterministic": True,
            "torch": torch.__version__,
            "config_sha256": "c0ffee",
        },
        "structure": {
            "entries": [
                {
                    "name": n,
                    "kind": "parameter",
                    "shape": list(p.shape),
                    "dtype": "float32",
                    "requires_grad": True,
                }
                for n, p in init.items()
            ],
            "modules": [
                {"name": "<root>", "type": "Model"},
                {"name": "enc", "type": "Encoder"},
                {"name": "enc.lin", "type": "Linear"},
                {"name": "dec", "type": "Linear"},
            ],
        },
        "init": init,
        "batch": {"x": x},
        "forward": {"out": out},
        "loss": out.sum(),
        "grads": grads,
        "weights": weights,
        "layers": [call("enc.lin", "Linear", 0, x, h), call("dec", "Linear", 1, h, out)],
    }


def make_step(run_dir: Path, content: dict[str, Any] | None = None, **kw) -> Path:
    """Write ``content`` (default ``parts(**kw)``) as run_dir/step_N; init=None leaves out
    initial_weights.pt (an old capture)."""
    c = content if content is not None else parts(**kw)
    step = Path(run_dir) / f"step_{c['meta']['step']}"
    step.mkdir(parents=True)
    art.save_json(step / art.METADATA, c["meta"])
    art.save_json(step / art.STRUCTURE, c["structure"])
    if c.get("init") is not None:
        art.save_tensors(step / "initial_weights.pt", c["init"])
    art.save_tensors(step / art.BATCH, c["batch"])
    art.save_tensors(step / art.FORWARD, c["forward"])
    art.save_tensors(step / art.LOSS, c["loss"])
    art.save_tensors(step / art.GRADS, c["grads"])
    art.save_tensors(step / art.WEIGHTS, c["weights"])
    art.save_tensors(step / art.LAYERS, c["layers"])
    return step


def pair(tmp_path: Path, edit=None, ref_edit=None) -> tuple[Path, Path]:
    """A reference step and a candidate step, the candidate's content changed by ``edit``."""
    ref, cand = parts(), parts()
    cand["meta"]["framework"] = "cand"
    if ref_edit:
        ref_edit(ref)
    if edit:
        edit(cand)
    return make_step(tmp_path / "ref", ref), make_step(tmp_path / "cand", cand)


def test_identical_steps_pass_without_notes(tmp_path):
    result = compare_steps(*pair(tmp_path), TOLS)
    assert result["verdict"] == "pass", result["errors"]
    assert result["notes"] == [] and result["divergences"] == []
    assert result["init"] == {"differs": 0, "total": 4, "first": None, "reason": None}
    assert result["categories"]["init"]["matched"] == 4
    lines = verdict_lines(result)
    assert lines[0] == "ref vs cand seed=42 step=0: PASS"
    assert not [line for line in lines if "fail [" in line or "note:" in line]


def test_structure_differences_alone_pass_with_notes(tmp_path):
    def edit(c):
        s = c["structure"]
        s["entries"][0], s["entries"][1] = s["entries"][1], s["entries"][0]
        s["modules"][3]["type"] = "MyLinear"
        s["modules"].append({"name": "enc.extra", "type": "Identity"})

    result = compare_steps(*pair(tmp_path, edit), TOLS)
    assert result["verdict"] == "pass"
    notes = {(n["category"], n["name"]): n["reason"] for n in result["notes"]}
    assert notes == {
        ("structure", "enc.lin.weight"): "parameter order differs from position 0: "
        "enc.lin.weight vs enc.lin.bias",
        ("structure", "dec"): "module type Linear vs MyLinear",
        ("structure", "enc.extra"): "module only in the candidate",
    }
    lines = verdict_lines(result)
    assert lines[0].endswith(": PASS (3 notes)")
    assert "  note: [structure] dec: module type Linear vs MyLinear" in lines
    assert "  note: [structure] enc.extra: module only in the candidate" in lines
    (row,) = summary_rows([result])
    assert (row["verdict"], row["notes"], row["failing"]) == ("PASS", 3, "")
    assert "\t3\t-\t" in tsv([row])  # notes, failing (none), then errors


def test_one_sided_entry_and_ignored_items_are_notes(tmp_path):
    from nestalign.namemap import NameMap

    def edit(c):
        c["structure"]["entries"].append(
            {"name": "probe.w", "kind": "buffer", "shape": [1], "dtype": "float32"}
        )
        c["weights"]["probe.w"] = torch.zeros(1)

    result = compare_steps(*pair(tmp_path, edit), TOLS, NameMap(ignore=[r"probe\..*"]))
    assert result["verdict"] == "pass"
    ignored = [n for n in result["notes"] if n["reason"] == "ignored by the name map"]
    assert {(n["category"], n["name"]) for n in ignored} == {
        ("structure", "probe.w"),
        ("weights", "probe.w"),
    }
    result = compare_steps(*pair(tmp_path / "b", lambda c: c["structure"]["entries"].pop()), TOLS)
    assert result["verdict"] == "pass"  # structure alone never fails the step
    assert {"category": "structure", "name": "dec.bias", "reason": "absent in the candidate"} in (
        result["notes"]
    )


def _nan(c):
    c["forward"]["out"] = torch.full_like(c["forward"]["out"], math.nan)
    c["loss"] = torch.tensor(math.nan)


def test_nonfinite_on_both_sides_is_its_own_verdict(tmp_path):
    result = compare_steps(*pair(tmp_path, _nan, _nan), TOLS)
    assert result["verdict"] == "nonfinite"
    assert result["nonfinite"] == ["forward:out", "loss:loss"]
    lines = verdict_lines(result)
    assert lines[0].endswith(": NONFINITE")
    assert "  non-finite on both sides: forward:out, loss:loss" in lines
    (row,) = summary_rows([result])
    assert row["verdict"] == "NONFINITE" and row["loss_ref"] != row["loss_ref"]  # nan


def test_nonfinite_on_one_side_fails(tmp_path):
    result = compare_steps(*pair(tmp_path, _nan), TOLS)
    assert result["verdict"] == "fail"
    failing = [line for line in verdict_lines(result) if line.startswith("  fail [")]
    assert failing[0].startswith("  fail [forward] out: ")
    assert "NaN 0/10" in failing[0]


def _other_run(c):
    c["meta"].update(seed=43, step=1)


def test_metadata_mismatch_is_an_error_naming_the_keys(tmp_path):
    ref, cand = make_step(tmp_path / "ref"), make_step(tmp_path / "cand", seed=43, step=1)
    result = compare_steps(ref, cand, TOLS)
    assert result["verdict"] == "error"
    assert result["errors"] == [
        {"category": "metadata", "error": "metadata differs: seed 42 vs 43, step 0 vs 1"}
    ]
    assert result["categories"] == {}
    (row,) = summary_rows([result])
    assert row["verdict"] == "ERROR" and row["grads_matched"] is None
    forced = compare_steps(ref, cand, TOLS, force=True)
    assert forced["verdict"] == "pass"
    assert forced["notes"][0] == {
        "category": "metadata",
        "name": "metadata",
        "reason": "metadata differs: seed 42 vs 43, step 0 vs 1 (--force)",
    }


def test_metadata_keys_missing_on_one_side_are_no_mismatch(tmp_path):
    def edit(c):
        for key in ("torch", "threads", "config_sha256"):
            del c["meta"][key]

    assert compare_steps(*pair(tmp_path, edit), TOLS)["verdict"] == "pass"

    def other(c):
        c["meta"]["torch"] = "0.0.1"
        c["meta"]["deterministic"] = False

    result = compare_steps(*pair(tmp_path / "b", other), TOLS)
    assert result["errors"][0]["error"] == (
        f"metadata differs: deterministic True vs False, torch {torch.__version__} vs 0.0.1"
    )


@pytest.mark.parametrize("script", ["compare.py", "compare_nemo_nest_outputs.py"])
def test_force_on_the_command_lines(tmp_path, script):
    ref, cand = make_step(tmp_path / "ref"), make_step(tmp_path / "cand", seed=43)
    if script == "compare.py":
        args = ["--ref", str(ref), "--cand", str(cand), "--out", str(tmp_path / "r.pkl")]
    else:
        args = ["--nemo_output_dir", str(ref.parent), "--nest_output_dir", str(cand.parent)]
        args += ["--save_comparison", str(tmp_path / "r.pkl")]
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert "ERROR" in plain.stdout and "metadata differs: seed 42 vs 43" in plain.stdout
    forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert ": PASS (1 notes)" in forced.stdout
    assert "note: [metadata] metadata: metadata differs: seed 42 vs 43 (--force)" in forced.stdout
    assert load_result(tmp_path / "r.pkl")["verdict"] == "pass"


def test_every_failing_item_has_a_name_and_a_reason(tmp_path):
    def edit(c):
        c["grads"]["extra.weight"] = torch.ones(2)
        c["weights"]["dec.weight"] = c["weights"]["dec.weight"].double()
        c["grads"]["enc.lin.bias"] = c["grads"]["enc.lin.bias"].clone()
        c["grads"]["enc.lin.bias"][1] = math.nan
        c["init"]["enc.lin.weight"] = c["init"]["enc.lin.weight"].t().contiguous()

    result = compare_steps(*pair(tmp_path, edit), TOLS)
    assert result["verdict"] == "fail"
    lines = verdict_lines(result)
    failing = [line for line in lines if line.startswith("  fail [")]
    assert failing == [
        "  fail [init] enc.lin.weight: shape [4, 3] vs [3, 4] (layout: permute(1, 0))",
        "  fail [grads] enc.lin.bias: 1 of 4 elements outside atol=" + failing[1].split("atol=")[1],
        "  fail [grads] extra.weight: absent in the reference",
        "  fail [weights] dec.weight: dtype float32 vs float64 (max abs 0)",
    ]
    assert "; NaN 0/1, Inf 0/0" in failing[1]
    assert "  grads        3/5 matched" in lines
    # the failing gradient last in state_dict order (extra.weight is in no state_dict)
    assert "  first backward culprit: enc.lin (parameter gradient enc.lin.bias)" in lines
    assert "  init differs: 1 of 4 tensors, first enc.lin.weight (shape [4, 3] vs [3, 4] " in (
        "\n".join(lines)
    )
    (row,) = summary_rows([result])
    assert row["failing"] == (
        "init:enc.lin.weight (shape [4, 3] vs [3, 4] (layout: permute(1, 0))); "
        f"grads:enc.lin.bias ({failing[1].split(': ', 1)[1]}); "
        "grads:extra.weight (absent in the reference); ... and 1 more"
    )


def test_failing_items_beyond_ten_are_counted(tmp_path):
    def edit(c):
        c["grads"].update({f"extra.{i}": torch.ones(1) for i in range(13)})

    lines = verdict_lines(compare_steps(*pair(tmp_path, edit), TOLS))
    failing = [line for line in lines if line.startswith("  fail [grads]")]
    assert len(failing) == 10 and failing[0] == "  fail [grads] extra.0: absent in the reference"
    assert lines[lines.index(failing[-1]) + 1] == "  ... and 3 more"


def test_divergence_and_note_lines_follow_the_culprit_lines(tmp_path):
    result = compare_steps(*pair(tmp_path), TOLS)
    result = copy.deepcopy(result)
    result["divergence"]["forward"]["first"] = {"where": "enc.lin#0 (Linear)"}
    result["divergence"]["backward"]["first"] = {"where": "glue in enc before enc.lin#0"}
    result["divergences"] = [
        {"where": "enc.lin#0 (Linear)", "class": "code", "direction": "forward"},
        {"where": "glue in enc before enc.lin#0", "class": "glue", "direction": "backward"},
    ]
    result["notes"] = [
        {"category": "layers", "name": f"n{i}", "reason": "layout"} for i in range(12)
    ]
    lines = verdict_lines(result)
    i = lines.index("  first forward culprit: enc.lin#0 (Linear)")
    assert lines[i : i + 4] == [
        "  first forward culprit: enc.lin#0 (Linear)",
        "  first backward culprit: glue in enc before enc.lin#0",
        "  divergence: enc.lin#0 (Linear) (code)",
        "  divergence: glue in enc before enc.lin#0 (glue, backward)",
    ]
    assert lines[i + 4] == "  note: [layers] n0: layout"
    assert lines[-1] == "  ... and 2 more notes" and lines[-2] == "  note: [layers] n9: layout"


def test_only_parameter_gradients_fail_names_their_module(tmp_path):
    def edit(c):
        for name in ("enc.lin.weight", "dec.weight"):
            c["grads"][name] = c["grads"][name] * 1.01

    result = compare_steps(*pair(tmp_path, edit), TOLS)
    assert result["categories"]["layer_grads"]["failed"] == 0
    assert result["divergence"]["backward"]["first"] == {
        "name": "dec.weight",
        "kind": "culprit",
        "module": "dec",
        "where": "dec (parameter gradient dec.weight)",
    }
    assert "  first backward culprit: dec (parameter gradient dec.weight)" in verdict_lines(result)


def test_scaled_atol():
    assert scaled_atol(1e-5, 1e-3) == pytest.approx(1e-8)
    assert scaled_atol(1e-5, 0.0) == 1e-5 * TINY
    assert scaled_atol(None, 1.0) is None and scaled_atol(1e-5, None) == 1e-5


def _small_grad(c, shift: float = 0.0):
    g = c["grads"]["enc.lin.weight"] * 1e-3
    c["grads"]["enc.lin.weight"] = g + shift * g.abs().max()


def test_gradient_tolerance_scales_with_the_gradient(tmp_path):
    # the candidate's enc.lin.weight gradient (about 1e-3) differs by 2e-3 of its size: under a
    # fixed atol of 1e-5, far over an atol of 1e-5 relative to the gradient
    ref, cand = pair(tmp_path, lambda c: _small_grad(c, 2e-3), _small_grad)
    tols = load_tolerances("{atol: 1.0e-5, rtol: 1.0e-5}")
    grads = compare_steps(ref, cand, tols)["categories"]["grads"]
    assert [(r["name"], r["status"]) for r in grads["rows"] if r["status"] != "pass"] == [
        ("enc.lin.weight", "fail")
    ]
    row = grads["rows"][0]
    assert row["atol"] == pytest.approx(1e-5 * row["scale"], rel=1e-2)
    assert f"outside atol={row['atol']:g} rtol=1e-05" in row["reason"]
    tols = load_tolerances("{atol: 1.0e-5, rtol: 1.0e-5, grad_atol: absolute}")
    assert tols["grad_atol"] == "absolute"
    assert compare_steps(ref, cand, tols)["categories"]["grads"]["failed"] == 0
    with pytest.raises(ToleranceError, match="grad_atol must be one of scaled, absolute"):
        load_tolerances("{grad_atol: relative}")


def test_a_saved_result_loads_with_the_new_fields(tmp_path):
    result = compare_steps(*pair(tmp_path, _nan, _nan), TOLS)
    save_result(result, tmp_path / "r.pkl")
    loaded = load_result(tmp_path / "r.pkl")
    assert loaded["verdict"] == "nonfinite" and loaded["divergences"] == []
