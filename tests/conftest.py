"""Shared fixtures: where the framework environments are, how to run code in them, and the tiny
config's dummy data (``data``, made once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def env_python(env: str) -> Path:
    """Interpreter of a framework env: $NEST_ALIGN_<ENV>_PYTHON, else .venvs/<env>/bin/python."""
    override = os.environ.get(f"NEST_ALIGN_{env.upper()}_PYTHON")
    path = Path(override) if override else ROOT / ".venvs" / env / "bin" / "python"
    if not path.exists():
        pytest.fail(f"{env} env missing at {path}: run `make envs` first")
    return path


def run_python(env: str, args: list[str], cwd: Path = ROOT, timeout: int = 1800):
    """Run ``python ARGS`` in a framework env with src/ importable; fail with its output."""
    cmd = [str(env_python(env)), *args]
    envvars = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        cmd, cwd=cwd, env=envvars, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def driver_python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """config/config.yaml's dummy data (wavs and manifests), made once."""
    import yaml

    from nestalign.dummy_data import make_data

    out = tmp_path_factory.mktemp("data")
    make_data(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["data"], out)
    return out
