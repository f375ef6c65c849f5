"""The project installs as a package: README's commands run as written, without PYTHONPATH."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT, env_python

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README = (ROOT / "README.md").read_text()

# (env, command) as the README's "Installing and running elsewhere" section lists them.
COMMANDS = [
    ("nest", "python -m nest_ssl.train --help"),
    ("nest", "python scripts/capture_nest.py --help"),
    ("nemo", "python scripts/capture_nemo.py --help"),
    ("align", "python scripts/compare.py --help"),
    ("align", "python scripts/compare_nemo_nest_outputs.py --help"),
    ("align", "python scripts/summary.py --help"),
    ("align", "python scripts/report.py --help"),
    ("align", "python scripts/make_data.py --help"),
    ("nest", "nest-train --help"),
    ("align", "nest-align-compare --help"),
]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.parametrize(("env", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_readme_command_runs_in_its_env_without_pythonpath(env, command, tmp_path):
    assert f".venvs/{env}/bin/{command}" in README, "README and this list disagree"
    program, *args = command.split()
    exe = env_python(env).parent / program
    args = [a if not a.startswith("scripts/") else str(ROOT / a) for a in args]
    proc = subprocess.run(
        [str(exe), *args], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_capture_callback_imports_outside_the_tree(tmp_path):
    code = "from nestalign.callback import CaptureCallback; import nest_ssl.train"
    proc = subprocess.run(
        [str(env_python("nest")), "-c", code],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_console_command_names_a_function_of_the_cli():
    from nestalign import cli

    for name, target in PYPROJECT["project"]["scripts"].items():
        module, func = target.split(":")
        assert module == "nestalign.cli" and callable(getattr(cli, func)), name
        script = cli.COMMANDS.get(name)
        assert script is None or (cli.SCRIPTS / script).is_file(), name


def test_extras_cover_what_each_side_imports():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {k: {re.split(r"[<>=\[]", r)[0] for r in v} for k, v in extras.items()}
    assert {"torch", "lightning", "omegaconf", "hydra-core", "numpy", "soundfile", "pyyaml"} <= (
        names["capture"]
    )
    assert {"torch", "numpy", "pyyaml"} <= names["compare"]
    assert "matplotlib" not in names["compare"]  # the report draws its own SVG
    assert {"torch", "lightning", "hydra-core", "omegaconf", "numpy", "soundfile"} <= names["port"]
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_snakemake_dry_run_of_a_fresh_clone(tmp_path):
    """A clone of the committed tree plans the whole workflow (venv builds included)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "venv_nemo" in proc.stdout and "capture_nest" in proc.stdout
