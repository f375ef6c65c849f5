"""Build a plain venv from a conda env file's `pip:` list (the workflow's fallback without conda).

    python scripts/build_venv.py envs/nemo.yaml .venvs/nemo

The venv is rebuilt from scratch, torch first (its pinned CPU wheel), then the rest, and a
`.built` marker holding the spec's hash and `pip freeze` is written last: a failed build leaves
no marker, so the next run tries again.
"""

import argparse
import hashlib
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import yaml


def pip_requirements(spec: Path) -> list[str]:
    doc = yaml.safe_load(spec.read_text())
    for dep in doc.get("dependencies", []):
        if isinstance(dep, dict) and "pip" in dep:
            return [str(r) for r in dep["pip"]]
    raise SystemExit(f"{spec}: no `pip:` list under dependencies")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="conda env file (envs/<name>.yaml)")
    parser.add_argument("target", type=Path, help="venv folder to (re)create")
    args = parser.parse_args()
    reqs = pip_requirements(args.spec)
    if args.target.exists():
        shutil.rmtree(args.target)
    venv.EnvBuilder(with_pip=True, clear=True).create(args.target)
    pip = [str(args.target / "bin" / "python"), "-m", "pip", "install", "--no-input"]
    first = [r for r in reqs if r.split("==")[0].strip() == "torch"]
    if first:  # the pinned CPU build first, so that nothing pulls a CUDA build
        run(pip + first)
    run(pip + [r for r in reqs if r not in first])
    freeze = subprocess.run(
        [str(args.target / "bin" / "python"), "-m", "pip", "freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    digest = hashlib.sha256(args.spec.read_bytes()).hexdigest()
    (args.target / ".built").write_text(f"# {args.spec} sha256 {digest}\n{freeze}")
    print(f"built {args.target} from {args.spec}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
