"""Console commands (pyproject.toml's [project.scripts]): each runs one of the workflow's scripts.

    nest-align-compare --ref D --cand D --out step.pkl    = python scripts/compare.py ...
    nest-train --config-path config ...                   = python -m nest_ssl.train ...

The scripts stay the single implementation: a command runs scripts/<name>.py of the source tree
this package was installed from (`pip install -e .`, which is how every env of the workflow
installs it), exactly as `python scripts/<name>.py` would, arguments included.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

COMMANDS = {
    "nest-align-capture-nemo": "capture_nemo.py",
    "nest-align-capture-nest": "capture_nest.py",
    "nest-align-compare": "compare.py",
    "nest-align-compare-outputs": "compare_nemo_nest_outputs.py",
    "nest-align-compare-fingerprints": "compare_fingerprints.py",
    "nest-align-summary": "summary.py",
    "nest-align-report": "report.py",
    "nest-align-make-data": "make_data.py",
}


def _run(command: str) -> int:
    script = SCRIPTS / COMMANDS[command]
    if not script.is_file():
        raise SystemExit(
            f"{command}: {script} not found; the commands run the scripts of a source checkout "
            "(install it with `pip install -e .`)"
        )
    sys.argv = [str(script), *sys.argv[1:]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) or code is None else _message(code)
    return 0


def _message(text: object) -> int:
    print(text, file=sys.stderr)
    return 1


def capture_nemo() -> int:
    return _run("nest-align-capture-nemo")


def capture_nest() -> int:
    return _run("nest-align-capture-nest")


def compare() -> int:
    return _run("nest-align-compare")


def compare_outputs() -> int:
    return _run("nest-align-compare-outputs")


def compare_fingerprints() -> int:
    return _run("nest-align-compare-fingerprints")


def summary() -> int:
    return _run("nest-align-summary")


def report() -> int:
    return _run("nest-align-report")


def make_data() -> int:
    return _run("nest-align-make-data")


def nest_train() -> int:
    """`python -m nest_ssl.train`, with its config errors as one line."""
    from nest_ssl.config import ConfigError
    from nest_ssl.train import main

    try:
        return main(sys.argv[1:])
    except ConfigError as exc:
        return _message(f"error: {exc}")
