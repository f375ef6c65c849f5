"""Fingerprint captures (capture=fingerprint) and their compare (nestalign.fingerprints).

- the bounds are sound: pairs within tolerance elementwise, in any layout, never FAIL; pairs
  outside it by a margin do;
- a fingerprint capture holds no tensor bytes and describes the same run as a full capture;
- on ports we did not write (tests/mutants.py): every code mutant FAILs at step 0 with its first
  forward difference in the mutated block; fp-noise and neutral mutants, alone and together,
  never FAIL;
- the script writes the JSON, names the step to localise and refuses a full capture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from captures import nest_capture
from mutants import MUTANTS, code_mutants, combined_name_map, neutral_mutants
from nestalign import artifacts as art
from nestalign import fingerprints as fp
from nestalign.compare import load_tolerances
from nestalign.namemap import NameMap

ROOT = Path(__file__).resolve().parents[1]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _fp(t: torch.Tensor) -> dict:
    return {**art.tensor_fingerprint(t), "stats": art.tensor_stats(t)}


def _within(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool(((b - a).abs() <= atol + rtol * a.abs()).all())


def test_pairs_within_tolerance_never_fail():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        shape = [int(s) for s in torch.randint(1, 40, (2,), generator=gen)]
        a = torch.randn(shape, generator=gen) * 10 ** float(torch.randint(-6, 3, (1,)))
        atol, rtol = [(1e-5, 1e-5), (0.0, 1e-4), (1e-3, 0.0)][trial % 3]
        step = (atol + rtol * a.abs()) * torch.rand(shape, generator=gen)
        b = a + step * torch.sign(torch.randn(shape, generator=gen))
        if not _within(a, b, atol, rtol):  # float rounding of a + step
            continue
        cand = b.t().contiguous() if trial % 2 else b  # another layout of the same values
        status, reason = fp.judge(_fp(a), _fp(cand), atol, rtol)
        assert status in ("identical", "close"), (trial, reason)


def test_pairs_outside_tolerance_fail():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(64, 32, generator=gen)
    shifted = a + 1e-3  # every element outside 1e-5: the sum moves by 2 against a bound of 0.04
    assert fp.judge(_fp(a), _fp(shifted), 1e-5, 1e-5)[0] == "fail"
    spike = a.clone()
    spike[3, 4] = a.abs().max() * 2  # one element: the maximum moves
    assert fp.judge(_fp(a), _fp(spike), 1e-5, 1e-5)[0] == "fail"
    assert fp.judge(_fp(a), _fp(a.clone()), 0.0, 0.0) == ("identical", "")
    assert fp.judge(_fp(a), _fp(a.double()), 1e-5, 1e-5)[0] == "fail"  # dtype
    assert fp.judge(_fp(a[:1]), _fp(a[:2]), 1e-5, 1e-5)[0] == "unchecked"  # broadcast [1] vs [2]
    assert fp.judge(_fp(a[:3]), _fp(a[:2]), 1e-5, 1e-5)[0] == "fail"
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert fp.judge(_fp(a), _fp(nan), 1e-5, 1e-5)[0] == "fail"  # NaN counts differ
    assert fp.judge(_fp(nan), _fp(nan.clone()), 1e-5, 1e-5)[0] == "identical"


def test_integer_tensors_are_exact():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert fp.judge(_fp(a), _fp(a.t().contiguous()), 0.0, 0.0)[0] == "close"
    assert fp.judge(_fp(a), _fp(a + torch.tensor([[0, 0, 1], [0, 0, 0]])), 0.0, 0.0)[0] == "fail"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    return nest_capture(tmp_path_factory.mktemp("fp_ref"), data, [], "capture=fingerprint")


def test_fingerprint_capture_holds_no_tensors_and_matches_a_full_one(tmp_path, data, reference):
    assert sorted(p.name for p in reference.iterdir()) == sorted(
        [art.METADATA, art.STRUCTURE, art.INDEX, art.CONFIG]
    )
    index = json.loads((reference / art.INDEX).read_text())
    assert index["mode"] == "fingerprint" and set(index["skeletons"]) == set(index["files"])
    assert json.loads((reference / art.METADATA).read_text())["capture"] == "fingerprint"
    full = nest_capture(tmp_path / "full", data, [])
    full_index = json.loads((full / art.INDEX).read_text())["files"]
    for name, entries in index["files"].items():
        assert [art.digest(e) for e in entries] == [art.digest(e) for e in full_index[name]], name
    weights = art.load_tensors(full / art.WEIGHTS)
    skeleton = fp.load_step(reference)["files"][art.WEIGHTS]
    assert list(skeleton) == list(weights)
    name = "encoder.pre_encode.out.weight"
    assert skeleton[name]["stats"] == art.tensor_fingerprint(weights[name], stats=True)["stats"]


def _mutant_step(tmp: Path, data: Path, reference: Path, names: list[str]) -> dict:
    rules = combined_name_map(names)
    nmap = None
    if rules:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "name_map.yaml").write_text(yaml.safe_dump(rules))
        nmap = NameMap.load(tmp / "name_map.yaml")
    cand = nest_capture(tmp / "cand", data, names, "capture=fingerprint")
    return fp.compare_step(reference, cand, load_tolerances(**TOL), nmap)


NOISE = [n for n in code_mutants() if MUTANTS[n].expected_class == "fp noise"]
CODE = [n for n in code_mutants() if n not in NOISE]


@pytest.mark.slow
@pytest.mark.parametrize("name", CODE)
def test_code_mutants_fail_where_they_are(tmp_path, data, reference, name):
    result = _mutant_step(tmp_path, data, reference, [name])
    assert result["verdict"] == "fail", result["counts"]
    mutant = MUTANTS[name]
    if mutant.expected_class == "init":
        assert result["categories"]["init"]["fail"] > 0, result["categories"]["init"]
        return
    # the first call whose output differs lies in the mutated block (a glue region's parent)
    region = mutant.expected.removeprefix("glue in ").split(" ")[0].split("#")[0]
    block = ".".join(region.split(".")[:3])
    assert result["first"]["forward"].startswith(block), (name, result["first"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "names", [[n] for n in NOISE + neutral_mutants()] + [neutral_mutants()], ids=str
)
def test_noise_and_neutral_mutants_never_fail(tmp_path, data, reference, names):
    result = _mutant_step(tmp_path, data, reference, names)
    assert result["verdict"] in ("pass", "close"), (names, result["failing"])
    assert result["counts"]["fail"] == 0


def test_script_names_the_step_to_localise(tmp_path, data):
    ref = nest_capture(tmp_path / "ref", data, [], "capture=fingerprint", steps="0,1")
    fault = "fault=encoder.layers.1.feed_forward2.linear1*1.001@1"
    nest_capture(tmp_path / "cand", data, [], "capture=fingerprint", fault, steps="0,1")
    out = tmp_path / "seed.json"
    cmd = [sys.executable, str(ROOT / "scripts/compare_fingerprints.py")]
    cmd += ["--ref-run", str(ref.parent), "--cand-run", str(tmp_path / "cand")]
    cmd += ["--steps", "0,1", "--atol", "1e-5", "--rtol", "1e-5", "--out", str(out)]
    proc = subprocess.run([*cmd, "--strict"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("step 0: PASS (") and lines[-1] == "localise: step 1"
    assert "  first forward difference: encoder.layers.1.feed_forward2.linear1#0" in lines
    run = fp.load_run(out)
    assert [s["verdict"] for s in run["steps"]] == ["pass", "fail"] and run["localise"] == 1
    full = nest_capture(tmp_path / "full", data, [])
    bad = fp.compare_run(ref.parent, full.parent, [0])
    assert bad["steps"][0]["verdict"] == "error"
    assert "not a fingerprint capture" in bad["steps"][0]["errors"][0]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
