"""The summary's growth lines (per pair and seed, each drift category's worst max abs at the
first and last step and the growth per step between them), drift per pair, and the own errors
of state-isolated steps beside the free-running ones."""

from __future__ import annotations

from nestalign.summary import (
    DRIFT_CATEGORIES,
    collect,
    growth,
    load_or_error,
    markdown,
    rows,
    tsv,
)


def _row(seed: int, step: int, value: float | None, cand: str = "nest") -> dict:
    row = {"reference": "nemo", "candidate": cand, "seed": seed, "step": step}
    row.update({f"{cat}_max_abs": value for cat in DRIFT_CATEGORIES})
    return row


def test_growth_per_step_between_the_first_and_last_step():
    table = [_row(42, 0, 0.0), _row(42, 19, 1e-6), _row(42, 199, 4e-6), _row(43, 0, 0.0)]
    lines = growth(table)
    assert lines[:3] == ["", "Growth of the worst max abs over the steps:", ""]
    assert lines[3:] == [
        "- nemo vs nest seed 42, steps 0-199: "
        + "; ".join(f"{cat} 0 -> 4e-06 (2.01005e-08 per step)" for cat in DRIFT_CATEGORIES)
    ]  # seed 43 has one step: no line


def test_pairs_are_kept_apart_and_unknown_values_give_no_rate():
    table = [_row(1, 0, 0.0), _row(1, 2, None), _row(1, 0, 1.0, "other"), _row(1, 2, 3.0, "other")]
    lines = growth(table)
    assert lines[3].startswith("- nemo vs nest seed 1, steps 0-2: loss 0 -> - (- per step)")
    assert lines[4].startswith("- nemo vs other seed 1, steps 0-2: loss 1 -> 3 (1 per step)")


def test_no_growth_lines_for_single_steps():
    assert growth([_row(1, 0, 0.0)]) == []


def _result(cand: str, step: int, rel: float) -> dict:
    worst = {"worst": {"max_rel": rel, "max_abs": rel}, "rows": []}
    return {
        "seed": 1,
        "step": step,
        "reference": "nemo",
        "candidate": cand,
        "verdict": "pass",
        "losses": {"reference": 1.0, "candidate": 1.0},
        "categories": {cat: dict(worst) for cat in DRIFT_CATEGORIES},
        "divergence": {"forward": {"first": None}, "backward": {"first": None}},
    }


def test_drift_divides_by_the_previous_step_of_the_same_pair_only():
    table = rows([_result("a", 0, 1e-6), _result("b", 0, 1e-3), _result("a", 1, 2e-6)])
    by = {(r["candidate"], r["step"]): r for r in table}
    assert by[("a", 1)]["drift_loss"] == 2.0  # 2e-6 / 1e-6, not 2e-6 / 1e-3
    assert by[("b", 0)]["drift_loss"] is None  # its pair's first step


def test_own_errors_sit_beside_the_free_running_ones():
    """isolation: {state: reference}: each step's own comparison, matched by pair, seed and step;
    an own pickle that could not be read shows as ERROR, a step without one as '-'."""
    free = [_result("a", 0, 0.0), _result("a", 1, 1e-3), _result("a", 2, 2e-3)]
    own = [_result("a", 0, 0.0), {**_result("a", 1, 1e-3), "verdict": "fail"}]
    unreadable = load_or_error("results/compare/state/seed_1/step_2.pkl")
    table = rows(free, [*own, unreadable])
    assert [r["own_verdict"] for r in table] == ["PASS", "FAIL", "ERROR"]
    assert [r["own_grads_max_rel"] for r in table] == [0.0, 1e-3, None]
    assert rows(free)[0]["own_verdict"] is None
    text = tsv(table).splitlines()
    head = text[0].split("\t")
    assert head[head.index("drift_weights") + 1 : head.index("notes")] == [
        "own_verdict",
        "own_loss_max_rel",
        "own_grads_max_rel",
        "own_weights_max_rel",
        "own_failing",
    ]
    assert text[2].split("\t")[head.index("own_verdict")] == "FAIL"
    md = markdown(table).splitlines()
    assert "| own | own rel loss/grads/weights |" in md[0]
    assert "| FAIL | 0.001/0.001/0.001 |" in md[3]
    assert "| - |" in markdown(rows(free)).splitlines()[2]


def test_a_directory_of_comparisons_leaves_the_state_isolated_ones_to_own(tmp_path):
    for rel in ("seed_1/step_0.pkl", "state/seed_1/step_0.pkl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert collect([tmp_path]) == [str(tmp_path / "seed_1/step_0.pkl")]
    assert collect([tmp_path / "state"]) == [str(tmp_path / "state/seed_1/step_0.pkl")]
