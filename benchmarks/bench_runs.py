"""What a sweep of steps costs: one process per step (the former layout) against one run per
(framework, seed), and a run extended by resuming, side by side in one invocation.

    python benchmarks/bench_runs.py [--steps 6] [--frameworks nemo nest] [--seeds 20]

For each framework, in its own env (.venvs/<env>/bin/python), on the tiny config and real
captures of the workflow's dummy data, one seed:

- per step: steps 0..N-1 each captured by its own process training from step 0 (N start-ups,
  N(N+1)/2 training steps), as the workflow did before runs;
- one run: one process capturing all N steps (1 start-up, N training steps);
- resumed: steps 0..N/2-1, then the rest resumed after them (2 start-ups, N training steps): what
  extending ``steps`` costs.

Each line gives wall and CPU seconds (children included) and the optimizer steps executed
(counted in the captures' metadata), then the ratios. Finally ``snakemake -n`` of a sweep of
``--seeds`` seeds x ``--seeds`` steps is timed (parse and DAG only, no captures on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from captures import TINY as CONFIG  # noqa: E402
from captures import capture_argv  # noqa: E402


def capture_cmd(fw: str, data: Path, out: Path, steps: list[int], *keys: str) -> list[str]:
    """The tests' tiny capture command line (seed 42, one thread) in the framework's env."""
    python = str(ROOT / ".venvs" / fw / "bin" / "python")
    argv = capture_argv(out, data, ",".join(map(str, steps)), *keys)
    return [python, str(ROOT / "scripts" / f"capture_{fw}.py"), *argv]


def timed(cmds: list[list[str]]) -> tuple[float, float]:
    """(wall, CPU of the children) seconds of running the commands one after the other."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    for cmd in cmds:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def optimizer_steps(runs: list[Path]) -> int:
    """Optimizer steps executed by the processes that wrote these runs (from their metadata)."""
    total = 0
    for run in runs:
        by_process: dict[str, int] = {}
        for meta_path in run.glob("step_*/metadata.json"):
            meta = json.loads(meta_path.read_text())
            key = str(meta["run"]["resumed_from"])
            by_process[key] = max(by_process.get(key, 0), meta["run"]["optimizer_steps"])
        total += sum(by_process.values())
    return total


def bench_framework(fw: str, data: Path, tmp: Path, n: int) -> dict[str, tuple]:
    steps = list(range(n))
    per_step = [tmp / fw / f"per_step_{s}" for s in steps]
    one, resumed = tmp / fw / "one_run", tmp / fw / "resumed"
    half = n // 2
    rows = {
        "per step": (
            timed([capture_cmd(fw, data, per_step[s], [s]) for s in steps]),
            optimizer_steps(per_step),
            n,
        ),
        "one run": (timed([capture_cmd(fw, data, one, steps)]), optimizer_steps([one]), 1),
        "resumed": (
            timed(
                [
                    capture_cmd(fw, data, resumed, steps[:half]),
                    capture_cmd(
                        fw, data, resumed, steps[half:], f"resume_from={resumed}/step_{half - 1}"
                    ),
                ]
            ),
            n,  # each process counts its own steps; together they trained every step once
            2,
        ),
    }
    same = all(
        (one / f"step_{s}" / name).read_bytes() == (resumed / f"step_{s}" / name).read_bytes()
        for s in steps
        for name in ("parameter_weights.pt", "training_state.pt", "layer_outputs.pt")
    )
    print(f"{fw}: resumed artifacts bitwise equal to the one run: {same}")
    return rows


def bench_dry_run(seeds: int, tmp: Path) -> float:
    work = tmp / "dag"
    work.mkdir()
    for name in ("Snakefile", "rules", "scripts", "config", "envs", "src", "profiles"):
        src = ROOT / name
        copy = shutil.copytree if src.is_dir() else shutil.copy2
        copy(src, work / name)
    sweep = {"seeds": list(range(seeds)), "steps": list(range(seeds)), "interpreters": {}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", "sweep.yaml", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps 0..N-1 of one seed")
    parser.add_argument("--frameworks", nargs="+", default=["nemo", "nest"])
    parser.add_argument("--seeds", type=int, default=20, help="S for the S x S dry run")
    args = parser.parse_args()
    from nestalign.dummy_data import make_data

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_data(CONFIG["data"], tmp / "data")
        print(f"one seed, steps 0..{args.steps - 1}, tiny config, one torch thread")
        print(f"{'':14}{'layout':10}{'processes':>10}{'opt steps':>10}{'wall s':>9}{'CPU s':>9}")
        for fw in args.frameworks:
            rows = bench_framework(fw, tmp / "data", tmp, args.steps)
            for name, ((wall, cpu), opt, procs) in rows.items():
                print(f"{fw:14}{name:10}{procs:>10}{opt:>10}{wall:>9.1f}{cpu:>9.1f}")
            (w0, c0), _, _ = rows["per step"]
            (w1, c1), _, _ = rows["one run"]
            print(f"{fw:14}per step / one run: {w0 / w1:.2f}x wall, {c0 / c1:.2f}x CPU")
        dag = bench_dry_run(args.seeds, tmp)
        print(f"snakemake -n, {args.seeds} seeds x {args.seeds} steps: {dag:.1f} s (target < 5 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
