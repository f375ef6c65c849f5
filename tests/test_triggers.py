"""Rerun triggers: what each kind of change reschedules, by dry runs in a temporary copy.

The copy holds a finished run made of stand-in files: every output is created empty and
`snakemake --touch --forceall` records it as made by the current rules, so Snakemake's
metadata (code, params, inputs, software env) is exactly as after a real run. Dry runs then
show what a change would rerun, and why. Nothing here runs a capture.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

COPY = ["Snakefile", "rules", "scripts", "config", "envs", "src"]
DRIVER_BIN = Path(sys.executable).parent


def snakemake(work: Path, *args: str, python: str = sys.executable, check: bool = True):
    proc = subprocess.run(
        [python, "-m", "snakemake", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    counts = {}
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def reasons(output: str) -> dict[str, set[str]]:
    """Rule -> the reasons printed for its jobs in a dry run."""
    found: dict[str, set[str]] = {}
    rule = None
    for line in output.splitlines():
        if match := re.match(r"(?:local)?rule (\S+):$", line.strip()):
            rule = match.group(1)
        elif rule and line.strip().startswith("reason:"):
            found.setdefault(rule, set()).add(line.split("reason:", 1)[1].strip())
    return found


def rule_inputs(output: str) -> dict[str, set[str]]:
    """Rule -> the input files of its jobs, from a dry run."""
    found: dict[str, set[str]] = {}
    rule = None
    for line in output.splitlines():
        if match := re.match(r"(?:local)?rule (\S+):$", line.strip()):
            rule = match.group(1)
        elif rule and line.strip().startswith("input:"):
            files = line.split("input:", 1)[1].split(",")
            found.setdefault(rule, set()).update(f.strip() for f in files if f.strip())
    return found


SWEEP = {
    "seeds": [3],
    "steps": [0, 1],
    "data": {
        "seed": 5,
        "sample_rate": 16000,
        "train": {"count": 4, "min_duration": 1.0, "max_duration": 2.0},
        "val": {"count": 2, "min_duration": 1.0, "max_duration": 1.5},
        "noise": {"count": 2, "min_duration": 2.0, "max_duration": 3.0},
    },
    "interpreters": {},  # venv mode: the env builds are jobs of the workflow too
}


def write_config(path: Path, **changes) -> str:
    path.write_text(yaml.safe_dump({**SWEEP, **changes}))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A copy of the workflow whose every output is present and recorded as up to date."""
    work = tmp_path_factory.mktemp("triggers")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / name)
    config = write_config(work / "sweep.yaml")
    listing = snakemake(work, "--summary", "--configfile", config).stdout
    for line in listing.splitlines()[1:]:
        path = work / line.split("\t", 1)[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    snakemake(work, "-j1", "--touch", "--forceall", "--configfile", config)
    return work


@pytest.fixture
def work(finished, tmp_path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def dry_run(work: Path, *args: str, **changes) -> subprocess.CompletedProcess:
    config = write_config(work / "changed.yaml", **changes) if changes else "sweep.yaml"
    return snakemake(work, "-n", "--configfile", config, *args)


def append(path: Path, text: str = "\n# an edit\n") -> None:
    with open(path, "a") as fh:
        fh.write(text)


DOWNSTREAM = {"compare": 1, "summary": 1, "report": 1, "all": 1}  # one compare per seed
RUNS = {"capture_nemo": 1, "capture_nest": 1}  # one run per framework and seed: steps 0 and 1
VALIDATIONS = {"validate_nemo": 1, "validate_nest": 1}


@pytest.mark.parametrize(
    "invocation",
    [
        [str(DRIVER_BIN / "python"), "-m", "snakemake"],
        [str(DRIVER_BIN / "python3"), "-m", "snakemake"],
        [str(DRIVER_BIN / "snakemake")],
    ],
    ids=["python -m snakemake", "python3 -m snakemake", "snakemake"],
)
def test_the_way_snakemake_is_started_reruns_nothing(finished, invocation):
    proc = subprocess.run(
        [*invocation, "-n", "--configfile", "sweep.yaml"],
        cwd=finished,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout


def test_a_compare_side_edit_reruns_no_capture(work):
    append(work / "src/nestalign/metrics.py")
    proc = dry_run(work)
    assert job_counts(proc.stdout) == DOWNSTREAM
    assert reasons(proc.stdout)["compare"] == {"Updated input files: src/nestalign/metrics.py"}


def test_a_report_edit_reruns_only_the_report(work):
    append(work / "src/nestalign/report.py")
    assert job_counts(dry_run(work).stdout) == {"report": 1, "all": 1}


def test_a_capture_side_edit_reruns_both_frameworks_captures(work):
    append(work / "src/nestalign/runner.py")
    proc = dry_run(work)
    assert job_counts(proc.stdout) == {**VALIDATIONS, **RUNS, **DOWNSTREAM}
    why = reasons(proc.stdout)
    assert why["validate_nemo"] == {"Updated input files: src/nestalign/runner.py"}
    assert why["capture_nemo"] == {
        "Input files updated by another job: results/validation/nemo.json"
    }


def test_a_port_edit_reruns_only_the_ports_captures(work):
    append(work / "src/nest_ssl/model.py")
    counts = job_counts(dry_run(work).stdout)
    assert counts == {"validate_nest": 1, "capture_nest": 1, **DOWNSTREAM}


def test_a_dummy_data_edit_reruns_the_data_and_all_after_it(work):
    append(work / "src/nestalign/dummy_data.py")
    counts = job_counts(dry_run(work).stdout)
    assert counts == {"make_data": 1, **VALIDATIONS, **RUNS, **DOWNSTREAM}


@pytest.mark.parametrize("change", [{"threads": 1}, {"deterministic": False}])
def test_capture_numerics_are_params_of_the_captures(work, change):
    proc = dry_run(work, **change)
    assert job_counts(proc.stdout) == {**RUNS, **DOWNSTREAM}
    for rule in ("capture_nemo", "capture_nest"):
        assert all(r.startswith("Params have changed") for r in reasons(proc.stdout)[rule])


def test_the_device_reruns_captures_and_rebuilds_envs_in_the_gpu_build(work):
    proc = dry_run(work, device="gpu")
    counts = job_counts(proc.stdout)
    assert counts == {
        "venv_align": 1,
        "venv_nemo": 1,
        "venv_nest": 1,
        "make_data": 1,
        **VALIDATIONS,
        **RUNS,
        **DOWNSTREAM,
    }
    # the torch build is a param; with committed CPU locks the lock input changes too
    why = reasons(proc.stdout)["venv_nemo"]
    assert why and all(
        r.startswith(("Params have changed", "Set of input files has changed")) for r in why
    ), why


def test_fewer_cores_than_threads_keep_the_configured_threads(work):
    proc = dry_run(work, "-j1", "--forceall", "--printshellcmds")
    commands = [line for line in proc.stdout.splitlines() if " save_steps=" in line]
    assert len(commands) == 2, proc.stdout  # one run per framework
    assert all(" threads=2 " in line for line in commands), commands


def test_state_isolation_adds_only_the_state_captures_and_their_compares(work):
    """The free runs stay; each state-isolated step starts from the reference's step before
    (step 0: from its initial state), declared as inputs."""
    proc = dry_run(work, "-p", isolation={"state": "reference"})
    assert job_counts(proc.stdout) == {
        "capture_state": 2,
        "compare_state": 1,  # both steps in one process
        "summary": 1,
        "report": 1,
        "all": 1,
    }
    inputs = rule_inputs(proc.stdout)["capture_state"]
    assert "results/capture/nemo/seed_3/step_0/training_state.pt" in inputs
    assert "results/capture/nemo/seed_3/step_0/initial_rng.pt" in inputs
    assert not any("step_1" in f for f in inputs)
    assert "state_from=results/capture/nemo/seed_3/step_0" in proc.stdout


def test_state_isolation_captures_the_reference_step_before_each_captured_step(work):
    proc = dry_run(work, "-p", steps=[0, 2], isolation={"state": "reference"})
    counts = job_counts(proc.stdout)
    assert counts["capture_nemo"] == 1 and counts["capture_state"] == 2
    assert "save_steps=0,1,2" in proc.stdout  # the reference's run; nest's captures 0 and 2
    assert "save_steps=0,2" in proc.stdout


def test_a_tolerance_change_reruns_only_the_compares(work):
    proc = dry_run(work, tolerance={"atol": 1.0e-6, "rtol": 1.0e-6})
    assert job_counts(proc.stdout) == DOWNSTREAM


# -- the code inputs match what each side imports ------------------------------------------


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _module_file(name: str) -> Path | None:
    base = ROOT / "src" / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def library_closure(*scripts: str) -> set[str]:
    """Every src/nestalign file the scripts import, directly or through each other."""
    todo = [ROOT / s for s in scripts]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            if name.split(".")[0] != "nestalign":
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a package's __init__ runs first
                found = _module_file(".".join(parts[:i]))
                if found:
                    todo.append(found)
    return {str(p.relative_to(ROOT)) for p in seen if "src/nestalign" in str(p)}


def test_code_inputs_are_exactly_what_each_side_imports(finished):
    proc = snakemake(finished, "-n", "--forceall", "--configfile", "sweep.yaml")
    inputs = {
        rule: {f for f in files if f.startswith("src/nestalign/")}
        for rule, files in rule_inputs(proc.stdout).items()
    }
    capture = library_closure("scripts/capture_nemo.py", "scripts/capture_nest.py")
    assert inputs["capture_nemo"] == inputs["capture_nest"] == capture
    for rule in ("compare", "summary", "report"):
        assert inputs[rule] == library_closure(f"scripts/{rule}.py"), rule
    assert inputs["make_data"] == library_closure("scripts/make_data.py") - {
        "src/nestalign/__init__.py"  # a docstring only
    }
