"""Build a plain venv from a conda env file's `pip:` list (the workflow's fallback without conda).

    python scripts/build_venv.py envs/nemo.yaml .venvs/nemo [--variant cpu|cuda] [--lock LOCK]

The venv is rebuilt from scratch: torch first, in the requested build, then the rest, then this
project itself (editable, without dependencies), so that `python -m nest_ssl.train` and
`import nestalign` work in it without PYTHONPATH. A `.built` marker holding the spec's hash and
`pip freeze` is written last: a failed build leaves no marker, so the next run tries again.

pip's output (and the commands) go to stdout, which the venv rules write to the env's log; one
short line per step (`venv nemo: installing 145 packages ...`, `venv nemo: done in 212 s`) goes
to stderr, which the workflow shows on the console.

Torch builds: `cpu` installs `torch==X+cpu` from PyTorch's CPU index (TORCH_CPU_INDEX, given to
pip as an extra index), `cuda` installs `torch==X` from PyPI, which is the CUDA build (the
nvidia-* wheels come with it).

With --lock (envs/locks/<env>-<variant>.txt, written by `--freeze`), every package is installed
at the locked version with `--no-deps`: the same venv on every machine. Without it, pip resolves
the spec's pins and whatever they leave open.

    python scripts/build_venv.py --freeze .venvs/nemo envs/locks/nemo-cpu.txt \
        --from-spec envs/nemo.yaml

`make locks` does this for every env, each built afresh from its env file in a temporary folder.
A lock records the hash of the pip list it came from: after a pin changes, a build from the old
lock is refused (run `make locks`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TORCH_CPU_INDEX = os.environ.get("TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")
PROJECT = "nest-align"


def pip_requirements(spec: Path) -> list[str]:
    doc = yaml.safe_load(spec.read_text())
    for dep in doc.get("dependencies", []):
        if isinstance(dep, dict) and "pip" in dep:
            return [str(r) for r in dep["pip"]]
    raise SystemExit(f"{spec}: no `pip:` list under dependencies")


def lock_requirements(lock: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in lock.read_text().splitlines()]
    return [line for line in lines if line]


def req_name(req: str) -> str:
    return re.split(r"[=<>!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def torch_requirement(req: str, variant: str) -> tuple[str, list[str]]:
    """The torch pin in the requested build, and the pip options that find it."""
    base = req.split("+", 1)[0]
    if variant == "cpu":
        if "==" not in base:
            raise SystemExit(f"{req}: the cpu variant needs an exact torch pin (torch==X)")
        return f"{base}+cpu", ["--extra-index-url", TORCH_CPU_INDEX]
    return base, []


def progress(target: Path, message: str) -> None:
    """One line on stderr for the console; the log gets it too (see rules/common.smk)."""
    print(f"venv {target.name}: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str]) -> None:
    """A command with its output (stderr too) on stdout: the env's log, not the console."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stderr=subprocess.STDOUT)


def freeze(python: Path, everything: bool = False) -> str:
    """pip freeze; `everything` keeps setuptools and wheel (torch requires setuptools>=77)."""
    return subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "freeze",
            "--exclude-editable",
            *(["--all"] if everything else []),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


SPEC_HASH = "# pip list sha256 "


def spec_hash(spec: Path) -> str:
    """Hash of the env file's pip list (comments and the conda part do not count)."""
    return hashlib.sha256("\n".join(pip_requirements(spec)).encode()).hexdigest()


def write_lock(venv_dir: Path, lock: Path, spec: Path | None = None) -> None:
    """Every package of a built venv at its exact version, this project left out; with SPEC,
    the hash of its pip list, so that a build from a stale lock is refused."""
    python = venv_dir / "bin" / "python"
    lines = [
        line
        for line in freeze(python, everything=True).splitlines()
        if line and not line.startswith("-e ") and req_name(line) not in (PROJECT, "pip")
    ]
    lock.parent.mkdir(parents=True, exist_ok=True)
    header = "# Full lock (pip freeze of a fresh build): `make locks` rewrites it, never by hand.\n"
    if spec is not None:
        header += f"# from {spec}\n{SPEC_HASH}{spec_hash(spec)}\n"
    lock.write_text(header + "\n".join(sorted(lines, key=str.lower)) + "\n")
    print(f"wrote {lock} ({len(lines)} packages)", file=sys.stderr)


def check_lock(spec: Path, lock: Path) -> None:
    """A lock made from another pip list than the spec's now is stale: refuse it."""
    recorded = [line for line in lock.read_text().splitlines() if line.startswith(SPEC_HASH)]
    if recorded and recorded[0].removeprefix(SPEC_HASH).strip() != spec_hash(spec):
        raise SystemExit(
            f"{lock} was made from another pip list than {spec} has now: run `make locks` "
            f"(or delete {lock} to build from {spec})"
        )


def build(spec: Path, target: Path, variant: str, lock: Path | None) -> None:
    start = time.monotonic()
    if lock:
        check_lock(spec, lock)
    reqs = lock_requirements(lock) if lock else pip_requirements(spec)
    source = f"{spec} + {lock}" if lock else str(spec)
    progress(target, f"creating the venv {target} ({variant}, from {source})")
    if target.exists():
        shutil.rmtree(target)
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    python = target / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--no-input"]
    torch = [r for r in reqs if req_name(r) == "torch"]
    rest = [r for r in reqs if req_name(r) != "torch"]
    if torch:  # first and alone (its index for torch only), so that nothing else picks the build
        pin, options = torch_requirement(torch[0], variant)
        progress(target, f"installing {pin}")
        run(pip + ["--no-deps"] + options + [pin])
        rest = [pin, *rest]  # installed: pip resolves torch's own dependencies from PyPI
    how = "locked, --no-deps" if lock else "resolved by pip"
    progress(target, f"installing {len(rest) - len(torch)} packages ({how})")
    run(pip + (["--no-deps"] if lock else []) + rest)
    progress(target, f"installing {PROJECT} (editable)")
    run(pip + ["--no-deps", "--editable", str(ROOT)])
    digest = hashlib.sha256(spec.read_bytes() + (lock.read_bytes() if lock else b"")).hexdigest()
    (target / ".built").write_text(f"# {source} ({variant}) sha256 {digest}\n{freeze(python)}")
    progress(target, f"done in {time.monotonic() - start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", type=Path, help="conda env file (envs/<name>.yaml)")
    parser.add_argument("target", type=Path, help="venv folder to (re)create")
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu", help="torch build")
    parser.add_argument("--lock", type=Path, help="install exactly this lock (envs/locks/...)")
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="instead of building: write the lock TARGET from the built venv SPEC",
    )
    parser.add_argument(
        "--from-spec", type=Path, help="with --freeze: the env file it was built from"
    )
    args = parser.parse_args(argv)
    if args.freeze:
        write_lock(args.spec, args.target, args.from_spec)
        return 0
    try:
        build(args.spec, args.target, args.variant, args.lock)
    except subprocess.CalledProcessError as exc:
        command = " ".join(str(c) for c in exc.cmd[1:4])
        progress(args.target, f"failed: `{command} ...` exited {exc.returncode} (see its output)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
