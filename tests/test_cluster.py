"""Cluster set-up: the slurm profile, per-job resources from the model size, temporary captures."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

COPY = ["rules", "scripts", "config", "envs", "src", "profiles"]
SWEEP = {"seeds": [3], "steps": [0, 1], "interpreters": {}}
FULL = [o for o in yaml.safe_load((ROOT / "config/config.yaml").read_text())["model_overrides"]]
FULL = [o for o in FULL if not o.startswith(("model.encoder.d_model", "model.encoder.n_layers"))]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cluster")
    for name in COPY:
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "Snakefile", work / "Snakefile")
    return work


def dry_run(work: Path, *args: str, **changes) -> str:
    config = work / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP, **changes}))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(config), *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def job_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job of a dry run."""
    jobs, rule = [], None
    for line in output.splitlines():
        if match := re.match(r"(?:local)?rule (\S+):$", line.strip()):
            rule = match.group(1)
        elif rule and line.strip().startswith("resources:"):
            items = line.split("resources:", 1)[1].split(",")
            jobs.append((rule, dict(i.strip().split("=", 1) for i in items if "=" in i)))
    return jobs


def resources_of(output: str, rule: str) -> list[dict[str, str]]:
    return [res for name, res in job_resources(output) if name == rule]


slurm = pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="snakemake-executor-plugin-slurm is not installed (envs/driver.txt has it)",
)


@slurm
def test_slurm_profile_dry_run_asks_each_job_for_its_resources(work):
    out = dry_run(work, "--workflow-profile", "profiles/slurm")
    captures = resources_of(out, "capture_nemo") + resources_of(out, "capture_nest")
    assert len(captures) == 2  # one run per framework and seed
    assert {(r["mem_mb"], r["runtime"], r["gpu"]) for r in captures} == {("3500", "15", "0")}
    compares = resources_of(out, "compare")
    assert len(compares) == 1  # one per seed, its steps in one process
    assert {(r["mem_mb"], r["runtime"]) for r in compares} == {("2500", "10")}
    for rule in ("venv_nemo", "make_data", "summary", "report"):  # the profile's defaults
        assert resources_of(out, rule) and resources_of(out, rule)[0]["mem_mb"] == "2000"


@slurm
def test_full_size_gpu_captures_ask_for_more_memory_time_and_a_gpu(work):
    out = dry_run(work, "--workflow-profile", "profiles/slurm", device="gpu", model_overrides=FULL)
    runs = {
        (res["runtime"], res["mem_mb"], res["gpu"])
        for rule in ("capture_nemo", "capture_nest")
        for res in resources_of(out, rule)
    }
    # 17 layers x d 512: about 102 M parameters by the rules' estimate; a run trains 2 steps
    assert runs == {("25", "7000", "1")}
    assert {r["mem_mb"] for r in resources_of(out, "compare")} == {"4500"}


def test_resources_follow_the_model_size_without_a_profile(work):
    small = yaml.safe_load((ROOT / "config/sweeps/small.yaml").read_text())["model_overrides"]
    out = dry_run(work, model_overrides=small)
    assert {r["mem_mb"] for r in resources_of(out, "capture_nest")} == {"3500"}
    assert {r["runtime"] for r in resources_of(out, "capture_nest")} == {"15"}


def test_light_jobs_are_local_rules():
    text = "\n".join(p.read_text() for p in [ROOT / "Snakefile", *sorted(ROOT.glob("rules/*.smk"))])
    local = set(re.findall(r"rule (\w+):(?:(?!\nrule ).)*?localrule: True", text, re.S))
    local |= {"all"} if re.search(r"localrules:\s*\n\s+all,", text) else set()
    local |= (
        {"venv_*"}
        if re.search(r'f"venv_\{_env\}"(?:(?!\n    rule).)*localrule: True', text, re.S)
        else set()
    )
    assert {"all", "envs", "make_data", "summary", "report", "venv_*"} <= local, local
    assert not re.search(r"rule (capture|compare)\w*:(?:(?!\nrule ).)*?localrule", text, re.S)


def test_keep_captures_false_makes_captures_temporary(work):
    out = dry_run(work, keep_captures=False)
    removed = re.findall(r"Would remove temporary output (\S+)", out)
    assert len(removed) == 2 * 2 * 13  # both frameworks, both steps, every capture file
    assert all(p.startswith("results/capture/") for p in removed)
    kept = dry_run(work)
    assert "Would remove temporary output" not in kept


def test_default_profile_is_what_make_run_uses():
    profile = yaml.safe_load((ROOT / "profiles/default/config.yaml").read_text())
    assert profile["cores"] == 2 and profile["show-failed-logs"] is True
    assert "snakemake-executor-plugin-slurm" in (ROOT / "envs/driver.txt").read_text()
