"""scripts/gpu_check.py on the CPU: its plan, its wheel install, and real tiny runs of its cases.

The CUDA run itself needs a GPU machine (README, "Installing and running elsewhere")."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, env_python

SCRIPT = ROOT / "scripts" / "gpu_check.py"
SHARED_LIST = ROOT.parent / "shared" / "gpu" / "nemo-wheels-py312.txt"
LINE = re.compile(
    r"^(?P<case>tiny \S+ .+? step [01]) +(?P<verdict>PASS|FAIL|NONFINITE|ERROR) +"
    r"(?P<figures>(?:\w+=\S+ )+)s=(?P<s>[\d.]+\+[\d.]+\+[\d.]+)$"
)


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def gpu_check(python: Path | str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_plans_every_case_deterministic_with_isolation_keys(tmp_path):
    proc = gpu_check(sys.executable, "--dry-run", "--work", str(tmp_path), "--wheels", "none")
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc.stdout)
    captures = [c for c in cmds if "capture_" in c[1]]
    compares = [c for c in cmds if c[1].endswith("compare.py")]
    opts = [
        dict(a.split("=", 1) for a in c if "=" in a and not a.startswith("-")) for c in captures
    ]
    # tiny: nemo a, nest a, nemo b, nest b, cpu refs and forced steps 0 and 1 of both; full: a, b
    assert len(captures) == 4 + 2 * 3 + 4
    assert all(o["deterministic"] == "true" and o["seed"] == "42" for o in opts)
    for o in opts:
        run = Path(o["output_dir"]).name
        assert o["trainer.accelerator"] == ("cpu" if run.endswith("cpu-ref") else "gpu"), run
        if "forced" in run:
            step = run.rsplit("-", 1)[1]
            ref = tmp_path / "capture" / "tiny" / f"{run.split('-')[0]}-cpu-ref" / f"step_{step}"
            assert o["init_from"] == o["force_from"] == str(ref)
            assert o["save_steps"] == step
        else:
            assert "init_from" not in o and "force_from" not in o
            assert o["save_steps"] == "0,1"
    full = [o for o in opts if "/full/" in o["output_dir"]]
    assert len(full) == 4 and all("model.encoder.d_model" not in o for o in full)
    assert all(o["model.encoder.d_model"] == "64" for o in opts if o not in full)
    cases = re.findall(r"^# case (.+)$", proc.stdout, re.M)
    assert len(cases) == len(compares) == 10 + 6
    assert sum("--force" in c for c in compares) == 4  # cross-device only (metadata: device)
    assert all(("--force" in c) == ("cpu-ref" in " ".join(c)) for c in compares)


def test_bad_selection_is_refused():
    proc = gpu_check(sys.executable, "--sizes", "huge", "--dry-run")
    assert proc.returncode == 2 and "--sizes: a comma-separated subset of tiny,full" in proc.stderr


def test_cuda_on_a_machine_without_gpu_says_so(tmp_path):
    args = ["--sizes", "tiny", "--frameworks", "nest", "--work", str(tmp_path), "--wheels", "none"]
    proc = gpu_check(sys.executable, *args)
    assert proc.returncode == 1 and "--device cuda, but torch sees no GPU" in proc.stderr


def fake_wheel(folder: Path, name: str) -> Path:
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "VALUE = 7\n")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_carried_wheels_install_into_the_target_once(tmp_path, capsys):
    gc = load_module()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "carriedpkg")
    site = tmp_path / "site"
    assert gc.install_wheels(wheels, site, dry_run=False) == ["carriedpkg-1.0-py3-none-any.whl"]
    assert (site / "carriedpkg" / "__init__.py").read_text() == "VALUE = 7\n"
    capsys.readouterr()
    gc.install_wheels(wheels, site, dry_run=False)
    assert "1 wheels already in" in capsys.readouterr().out
    env = gc.child_env(site, "cpu")
    assert env["PYTHONPATH"].split(":")[:2] == [str(ROOT / "src"), str(site)]
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert gc.install_wheels(tmp_path / "none", site, dry_run=False) == []


@pytest.mark.skipif(not SHARED_LIST.is_file(), reason="no shared wheel list beside the checkout")
def test_wheel_list_covers_the_verified_nemo_list():
    gc = load_module()
    verified = [
        line.strip()
        for line in SHARED_LIST.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(gc.GPU_WHEELS) == sorted(verified)


def case_lines(stdout: str) -> dict[str, dict]:
    out = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            figures = dict(f.split("=") for f in m["figures"].split())
            out[m["case"]] = {"verdict": m["verdict"], "figures": figures, "s": m["s"]}
    return out


def test_cpu_run_of_the_nest_cases_passes_with_zero_differences(tmp_path):
    """Repeat (two runs) and cross (a forced run from a reference run's initial state) on CPU."""
    args = ["--device", "cpu", "--sizes", "tiny", "--frameworks", "nest", "--cases", "repeat,cross"]
    proc = gpu_check(sys.executable, *args, "--work", str(tmp_path), "--wheels", "none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = case_lines(proc.stdout)
    assert sorted(lines) == [
        "tiny cross nest cpu/cpu step 0",
        "tiny cross nest cpu/cpu step 1",
        "tiny repeat nest cpu a/b step 0",
        "tiny repeat nest cpu a/b step 1",
    ], proc.stdout
    for case, line in lines.items():
        assert line["verdict"] == "PASS", (case, line)
        assert tuple(line["figures"]) == load_module().CATEGORIES
        assert set(line["figures"].values()) == {"0"}, (case, line)
    assert "4 cases, 4 pass" in proc.stdout
    assert not (tmp_path / "capture" / "tiny").exists()  # captures removed unless --keep


def test_cpu_parity_nemo_vs_nest_in_the_nemo_env(tmp_path):
    """The NeMo env holds both sides' packages, as the GPU machine's python will."""
    args = ["--device", "cpu", "--sizes", "tiny", "--cases", "parity", "--work", str(tmp_path)]
    proc = gpu_check(env_python("nemo"), *args, "--wheels", "none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = case_lines(proc.stdout)
    assert sorted(lines) == [f"tiny parity nemo/nest cpu step {s}" for s in (0, 1)], proc.stdout
    assert all(line["verdict"] == "PASS" for line in lines.values()), lines
    assert "nemo_toolkit 3.0.0" in proc.stdout
