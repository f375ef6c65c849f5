"""The whole workflow in a temporary copy: a real run, then what a config change reschedules."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, env_python

pytestmark = pytest.mark.slow

COPY = ["Snakefile", "rules", "scripts", "config", "envs", "src"]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=1800,
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


def write_config(path: Path, **changes) -> Path:
    cfg = {
        "seeds": [3],
        "steps": [0, 1],
        "data": {
            "seed": 5,
            "sample_rate": 16000,
            "train": {"count": 4, "min_duration": 1.0, "max_duration": 2.0},
            "val": {"count": 2, "min_duration": 1.0, "max_duration": 1.5},
            "noise": {"count": 2, "min_duration": 2.0, "max_duration": 3.0},
        },
        "interpreters": {env: str(env_python(env)) for env in ("nemo", "nest", "align")},
        **changes,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def fault_framework(fault: str) -> dict:
    """A `nest_fault` framework: the nest port with a capture key `fault=...` planted."""
    spec = {"script": "scripts/capture_nest.py", "env": "nest", "sources": ["src/nest_ssl"]}
    return {"nest_fault": {**spec, "overrides": [fault]}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / name)
    config = write_config(work / "tiny.yaml")
    snakemake(work, "-j2", "--configfile", str(config))
    return work


def test_full_run_compares_every_seed_and_step(workdir):
    for seed, step in [(3, 0), (3, 1)]:
        assert (workdir / f"results/compare/seed_{seed}/step_{step}.pkl").is_file()
        for fw in ("nemo", "nest"):
            step_dir = workdir / f"results/capture/{fw}/seed_{seed}/step_{step}"
            assert (step_dir / "layer_outputs.pt").is_file()
    with open(workdir / "results/summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [(r["seed"], r["step"]) for r in rows] == [("3", "0"), ("3", "1")]
    assert all(r["verdict"] == "PASS" for r in rows), rows
    html = (workdir / "results/report.html").read_text()
    assert "<table" in html and "<svg" in html and 'id="seed_3_step_1"' in html
    for step in (0, 1):  # the rows of every compared step, for pandas
        assert (workdir / f"results/report/rows/seed_3_step_{step}.tsv").is_file()


def test_no_change_schedules_nothing(workdir):
    proc = snakemake(workdir, "-n", "--configfile", "tiny.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_adding_a_seed_schedules_only_that_seed(workdir):
    config = write_config(workdir / "more_seeds.yaml", seeds=[3, 4])
    counts = job_counts(snakemake(workdir, "-n", "--configfile", str(config)).stdout)
    assert counts == {
        "all": 1,
        "capture_nemo": 1,  # one run per framework for the new seed
        "capture_nest": 1,
        "compare": 1,  # one process per seed
        "summary": 1,
        "report": 1,
    }


def test_adding_a_step_resumes_each_run_after_the_last_captured_step(workdir, tmp_path):
    """steps [0, 1] -> [0, 1, 2]: each framework's run resumes after step 1 and trains step 2
    only (counted in its metadata); the comparison of step 2 agrees. A config change instead
    reruns the seed from step 0."""
    work = tmp_path / "extend"
    shutil.copytree(workdir, work, symlinks=True)
    config = write_config(work / "more_steps.yaml", steps=[0, 1, 2])
    proc = snakemake(work, "-n", "--configfile", str(config))
    assert job_counts(proc.stdout) == {
        "all": 1,
        "capture_nemo_after_1": 1,
        "capture_nest_after_1": 1,
        "compare": 1,
        "summary": 1,
        "report": 1,
    }
    snakemake(work, "-j2", "--configfile", str(config))
    for fw in ("nemo", "nest"):
        meta = json.loads((work / f"results/capture/{fw}/seed_3/step_2/metadata.json").read_text())
        assert meta["run"] == {
            "resumed_from": f"results/capture/{fw}/seed_3/step_1",
            "optimizer_steps": 1,
        }
    with open(work / "results/summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [(r["step"], r["verdict"]) for r in rows] == [
        ("0", "PASS"),
        ("1", "PASS"),
        ("2", "PASS"),
    ]
    changed = write_config(work / "threads.yaml", steps=[0, 1, 2], threads=1)
    counts = job_counts(snakemake(work, "-n", "--configfile", str(changed)).stdout)
    assert counts["capture_nemo"] == counts["capture_nest"] == 1  # from step 0: no "_after_"
    assert counts["compare"] == 1  # the seed's three steps in one process


def test_a_config_typo_is_rejected_with_the_key_named(workdir):
    config = write_config(workdir / "typo.yaml", steeps=[1])
    proc = snakemake(workdir, "-n", "--configfile", str(config), check=False)
    assert proc.returncode != 0
    assert "steeps" in proc.stdout + proc.stderr


def test_an_unknown_framework_is_rejected(workdir):
    config = write_config(workdir / "bad_fw.yaml", candidate="nemoo")
    proc = snakemake(workdir, "-n", "--configfile", str(config), check=False)
    assert proc.returncode != 0
    assert "candidate 'nemoo' is not one of the frameworks" in proc.stdout + proc.stderr


def test_a_planted_fault_is_named_as_the_first_culprit(workdir, tmp_path):
    """A nest capture with one module's output scaled by 1.001, against the real NeMo capture."""
    work = tmp_path / "fault"
    shutil.copytree(workdir, work, symlinks=True)  # keeps the NeMo captures up to date
    faulty = "encoder.layers.1.feed_forward2.linear1"
    frameworks = fault_framework(f"fault={faulty}*1.001")
    config = write_config(
        work / "fault.yaml", steps=[0], candidate="nest_fault", frameworks=frameworks
    )
    proc = snakemake(work, "-j2", "--configfile", str(config))
    assert "capture_nemo" not in proc.stdout + proc.stderr  # the reference is reused
    with open(work / "results/summary.tsv") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    assert row["verdict"] == "FAIL"
    assert row["first_forward"].startswith(faulty), row["first_forward"]
    assert faulty in row["first_backward"], row["first_backward"]
    assert faulty in (work / "results/summary.md").read_text()


def test_fingerprint_mode_localises_the_first_failing_step_in_full(workdir, tmp_path):
    """capture: {mode: fingerprint} against real NeMo, a fault planted at step 1 only: steps 0-2
    keep fingerprints only, step 1 alone is captured again in full and compared."""
    work = tmp_path / "fingerprint"
    shutil.copytree(workdir, work, symlinks=True)
    faulty = "encoder.layers.1.feed_forward2.linear1"
    frameworks = fault_framework(f"fault={faulty}*1.001@1")
    config = write_config(
        work / "fp.yaml",
        steps=[0, 1, 2],
        candidate="nest_fault",
        frameworks=frameworks,
        capture={"mode": "fingerprint"},
    )
    proc = snakemake(work, "-j2", "--configfile", str(config))
    log = proc.stdout + proc.stderr
    assert "localise_nemo" in log and "localise_nest_fault" in log
    assert "localise: step 1" in (work / "results/logs/fingerprints/seed_3.log").read_text()
    with open(work / "results/summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    got = [(r["step"], r["verdict"], r["evidence"]) for r in rows]
    expected = [("0", "PASS", "fingerprint"), ("1", "FAIL", "full"), ("2", "FAIL", "fingerprint")]
    assert got == expected
    assert rows[1]["first_forward"].startswith(faulty), rows[1]["first_forward"]
    captured = {p.name for p in (work / "results/capture/nest_fault/seed_3/step_2").iterdir()}
    assert not any(name.endswith(".pt") for name in captured), captured
    assert sorted(p.name for p in (work / "results/full/nemo/seed_3").iterdir()) == ["step_1"]
    assert (work / "results/report/rows/seed_3_step_1.tsv").is_file()
    again = snakemake(work, "-n", "--configfile", str(config))
    assert "Nothing to be done" in again.stdout + again.stderr


def test_fingerprint_mode_refuses_isolation(workdir, tmp_path):
    config = write_config(
        tmp_path / "bad.yaml", capture={"mode": "fingerprint"}, isolation={"init": "reference"}
    )
    proc = snakemake(workdir, "-n", "--configfile", str(config), check=False)
    assert proc.returncode != 0
    assert "capture.mode fingerprint does not combine with isolation" in proc.stdout + proc.stderr


def test_fastconformer_small_matches_exactly(workdir, tmp_path):
    """The medium size (d_model 176, 16 layers) through the workflow: every value equal."""
    work = tmp_path / "small"
    shutil.copytree(workdir, work, symlinks=True)
    sweep = yaml.safe_load((ROOT / "config/sweeps/small.yaml").read_text())
    config = write_config(work / "small.yaml", model_overrides=sweep["model_overrides"])
    snakemake(work, "-j2", "--configfile", str(config))
    with open(work / "results/summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["verdict"] for r in rows] == ["PASS", "PASS"]
    assert rows[0]["grads_matched"] == "606/606"
    for row in rows:
        worst = [row[f"{cat}_max_abs"] for cat in ("forward", "loss", "grads", "weights", "layers")]
        assert all(float(w) == 0.0 for w in worst), row


def test_nan_loss_when_nothing_is_masked_is_reported_on_both_sides(workdir, tmp_path):
    """mask_prob 0: no frame is masked, NeMo's loss is NaN; nest must do the same."""
    work = tmp_path / "nan"
    shutil.copytree(workdir, work, symlinks=True)
    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())["model_overrides"]
    config = write_config(
        work / "nan.yaml", steps=[0], model_overrides=[*base, "model.masking.mask_prob=0.0"]
    )
    snakemake(work, "-j2", "--configfile", str(config))
    with open(work / "results/summary.tsv") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    assert (row["loss_ref"], row["loss_cand"]) == ("nan", "nan")
    # NaN at the same places on both sides agrees, but such a step is never a plain PASS
    assert row["verdict"] == "NONFINITE", row


def test_isolation_forces_nest_with_real_nemo_captures(workdir, tmp_path):
    """isolation: the nest capture starts from NeMo's initial state and is teacher-forced by
    NeMo's recorded step: the port agrees exactly and nothing is listed; with a planted fault
    the one divergence listed is that module, with NeMo as the reference."""
    work = tmp_path / "isolation"
    shutil.copytree(workdir, work, symlinks=True)
    faulty = "encoder.layers.1.feed_forward2.linear1"
    frameworks = fault_framework(f"fault={faulty}*1.001")
    isolation = {"init": "reference", "forcing": True}
    config = write_config(work / "iso.yaml", steps=[0, 1], isolation=isolation)
    proc = snakemake(work, "-j2", "--configfile", str(config))
    assert "capture_nemo" not in proc.stdout + proc.stderr  # the reference is reused
    with open(work / "results/summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["verdict"] for r in rows] == ["PASS", "PASS"], rows
    assert all(r["divergences"] == "-" for r in rows), rows
    config = write_config(
        work / "iso_fault.yaml",
        steps=[0],
        isolation=isolation,
        candidate="nest_fault",
        frameworks=frameworks,
    )
    snakemake(work, "-j2", "--configfile", str(config))
    with open(work / "results/summary.tsv") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    assert row["verdict"] == "FAIL"
    assert row["divergences"] == f"{faulty}#0 (Linear) (code)", row["divergences"]
    assert (
        "divergence: " + f"{faulty}#0 (Linear) (code)"
        in (work / "results/logs/compare/seed_3.log").read_text()
    )


def test_state_isolation_fails_only_the_step_with_a_fault(workdir, tmp_path):
    """isolation: {state: reference} against real NeMo captures, with a fault planted in step 1
    only: free-running, steps 1 and 2 fail; each step started from NeMo's complete state after
    the step before, step 1 fails alone and the own error of steps 0 and 2 is exactly zero."""
    work = tmp_path / "state"
    shutil.copytree(workdir, work, symlinks=True)
    faulty = "encoder.layers.1.feed_forward2.linear1"
    frameworks = fault_framework(f"fault={faulty}*1.001@1")
    config = write_config(
        work / "state.yaml",
        steps=[0, 1, 2],
        candidate="nest_fault",
        frameworks=frameworks,
        isolation={"state": "reference"},
    )
    proc = snakemake(work, "-j2", "--configfile", str(config))
    assert "capture_nemo_after_1" in proc.stdout + proc.stderr  # NeMo trains only step 2
    with open(work / "results/summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["verdict"] for r in rows] == ["PASS", "FAIL", "FAIL"], rows
    assert [r["own_verdict"] for r in rows] == ["PASS", "FAIL", "PASS"], rows
    assert rows[1]["first_forward"].startswith(faulty)
    for row in (rows[0], rows[2]):
        own = [row[f"own_{cat}_max_rel"] for cat in ("loss", "grads", "weights")]
        assert all(float(x) == 0.0 for x in own), row
    assert float(rows[2]["weights_max_rel"]) > 0  # the free run carries step 1's error on
    meta = json.loads((work / "results/state/nest_fault/seed_3/step_2/metadata.json").read_text())
    assert meta["state_from"] == "results/capture/nemo/seed_3/step_1"
    assert "(own)" in (work / "results/report.html").read_text()


def test_a_changed_pin_rebuilds_only_that_env_and_its_captures(workdir, tmp_path):
    """venv mode (no `interpreters`): the env marker is an input of that framework's jobs only."""
    work = tmp_path / "venvs"
    shutil.copytree(workdir, work, symlinks=True)
    old = 946684800  # 2000-01-01: older than every capture, as after a real build
    for env in ("nemo", "nest", "align"):
        marker = work / ".venvs" / env / ".built"
        marker.parent.mkdir(parents=True)
        marker.write_text("built\n")
        os.utime(marker, (old, old))
        os.utime(work / "envs" / f"{env}.yaml", (old - 1, old - 1))
    for lock in (work / "envs" / "locks").glob("*.txt"):  # inputs of the venv rules too
        os.utime(lock, (old - 1, old - 1))
    os.utime(work / "scripts/build_venv.py", (old - 1, old - 1))
    config = write_config(work / "venv_mode.yaml", interpreters={})
    # Leaving `interpreters` changes the python param of every job: judge by file times only.
    dry_run = ["-n", "--rerun-triggers", "mtime", "--configfile", str(config)]
    assert "Nothing to be done" in snakemake(work, *dry_run).stdout
    with open(work / "envs/nest.yaml", "a") as fh:
        fh.write("# a changed pin\n")
    counts = job_counts(snakemake(work, *dry_run).stdout)
    assert counts == {
        "all": 1,
        "venv_nest": 1,
        "validate_nest": 1,
        "capture_nest": 1,
        "compare": 1,
        "summary": 1,
        "report": 1,
    }
