"""Localisation on ports we did not write: real captures of mutant nest ports (tests/mutants.py,
runtime patches of nest_ssl) against the plain port, through the capture library, the capture keys
init_from / force_from and the compare.

- each code mutant alone, starting from the reference's initial state: the first culprit is that
  mutation, by name, and nothing else is blamed;
- each code mutant alone, teacher-forced: the one divergence listed is that mutation, with its
  class; all code mutants together, forced: each listed once, in execution order, nothing else;
- init mutants without init_from: "init differs" names the first differing weight;
- the arithmetic-neutral mutants, alone and together: PASS, with notes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from captures import nest_capture
from mutants import MUTANTS, code_mutants, combined_name_map, neutral_mutants
from nestalign.compare import compare_steps, load_tolerances
from nestalign.namemap import NameMap

pytestmark = pytest.mark.slow

EXACT = {"atol": 0.0, "rtol": 0.0}  # forced runs: every own difference counts, fp noise too
DEFAULT = {"atol": 1e-5, "rtol": 1e-5}  # config/config.yaml's tolerance
INIT = {"init_skip_throwaway", "init_attention_before_conv"}
# the class a forced run gives each code mutant (where the mutant's own words differ: a glue
# region that draws random numbers the reference does not is "random algorithm"; sub-blocks in
# another order are glue of their parent)
CLASS = {
    "extra_dropout": "random algorithm",
    "conv_before_attention": "glue",
    "length_off_by_one": "glue",  # the length is computed in pre_encode's own code
}


def _capture(out: Path, data: Path, names: list[str], *keys: str) -> Path:
    """One tiny nest capture (seed 42, step 0) built under the mutants, in this process."""
    return nest_capture(out, data, names, *keys)


def _name_map(names: list[str], tmp: Path) -> tuple[NameMap | None, list[str]]:
    rules = combined_name_map(names)
    if not rules:
        return None, []
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "name_map.yaml"
    path.write_text(yaml.safe_dump(rules))
    return NameMap.load(path), [f"name_map={path}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    return _capture(tmp_path_factory.mktemp("ref"), data, [])


def _matches(entry: dict, mutant, merged: bool = False) -> bool:
    """Whether a divergence entry names the mutant's place (``merged``: or one of the other
    places of the same glue region, which one entry lists under ``also_at``)."""
    expected = mutant.expected
    places = [entry["where"], *(entry.get("also_at") or [])] if merged else [entry["where"]]
    return (
        any(w == expected or w.startswith(expected + " (") for w in places)
        or entry["module"] == expected
        or entry["name"] == expected
    )


def _run(tmp: Path, data: Path, reference: Path, names: list[str], forced: bool, tols: dict):
    nmap, keys = _name_map(names, tmp)
    keys.append(f"init_from={reference}")
    if forced:
        keys.append(f"force_from={reference}")
    cand = _capture(tmp / "cand", data, names, *keys)
    return compare_steps(reference, cand, load_tolerances(**tols), nmap)


FORCED_CODE = [n for n in code_mutants() if n not in INIT]
FP_NOISE = [n for n in FORCED_CODE if MUTANTS[n].expected_class == "fp noise"]


@pytest.mark.parametrize("name", [n for n in FORCED_CODE if n not in FP_NOISE])
def test_forced_run_names_each_code_mutant_alone(tmp_path, data, reference, name):
    mutant = MUTANTS[name]
    result = _run(tmp_path, data, reference, [name], forced=True, tols=EXACT)
    got = [(e["where"], e["class"]) for e in result["divergences"]]
    assert len(got) == 1 and _matches(result["divergences"][0], mutant), (name, got)
    assert got[0][1] == CLASS.get(name, mutant.expected_class), (name, got)


def test_forced_run_lists_every_code_mutant_once(tmp_path, data, reference):
    names = [n for n in FORCED_CODE if n not in FP_NOISE]
    result = _run(tmp_path, data, reference, names, forced=True, tols=EXACT)
    entries = [e for e in result["divergences"] if e["class"] != "fp noise"]
    found = []
    for e in entries:
        hits = [n for n in names if _matches(e, MUTANTS[n], merged=True)]
        assert hits, f"false entry {e['where']} ({e['class']})"
        found += hits
    assert sorted(found) == sorted(names), [e["where"] for e in entries]
    order = [e["name"] for e in entries]
    starts = {r["name"]: r.get("start") for r in result["categories"]["layers"]["rows"]}
    assert [starts[n] for n in order] == sorted(starts[n] for n in order)


@pytest.mark.parametrize("name", FP_NOISE)
def test_fp_noise_mutants_are_never_blamed_as_code(tmp_path, data, reference, name):
    """Same arithmetic in another order (a fused GEMM, an expanded broadcast, a matmul for a
    Linear): at exact tolerance every listed divergence is fp noise; at the default tolerance
    the step passes."""
    exact = _run(tmp_path / "exact", data, reference, [name], forced=True, tols=EXACT)
    assert exact["verdict"] == "fail"
    assert {e["class"] for e in exact["divergences"]} <= {"fp noise"}, exact["divergences"]
    default = _run(tmp_path / "default", data, reference, [name], forced=True, tols=DEFAULT)
    assert default["verdict"] == "pass", default["divergences"]


@pytest.mark.parametrize("name", [n for n in FORCED_CODE if n not in FP_NOISE])
def test_free_run_first_culprit_is_the_mutant(tmp_path, data, reference, name):
    mutant = MUTANTS[name]
    result = _run(
        tmp_path, data, reference, [name], forced=False, tols={"atol": 1e-5, "rtol": 1e-5}
    )
    assert result["verdict"] == "fail"
    first = result["divergence"]["forward"]["first"] or result["divergence"]["backward"]["first"]
    assert first is not None and _matches(first, mutant), (name, first)
    blamed = [e["where"] for e in result["divergences"] if not _matches(e, mutant)]
    assert not blamed, (name, blamed)  # everything after it is a victim, never a culprit


@pytest.mark.parametrize("name", sorted(INIT))
def test_init_mutant_is_reported_as_init(tmp_path, data, reference, name):
    cand = _capture(tmp_path / "cand", data, [name])
    result = compare_steps(reference, cand, load_tolerances(**DEFAULT))
    init = [e for e in result["divergences"] if e["class"] == "init"]
    assert init and MUTANTS[name].expected in init[0]["where"], result["divergences"][:3]
    forced = _run(tmp_path / "forced", data, reference, [name], forced=True, tols=EXACT)
    assert forced["verdict"] == "pass", forced["divergences"]


@pytest.mark.parametrize("names", [[n] for n in neutral_mutants()] + [neutral_mutants()])
def test_neutral_mutants_pass_with_notes(tmp_path, data, reference, names):
    result = _run(tmp_path, data, reference, names, forced=False, tols=DEFAULT)
    assert result["verdict"] == "pass", (names, result["divergences"], result.get("errors"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
