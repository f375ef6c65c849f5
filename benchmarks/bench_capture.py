"""What capturing a step costs over training it, and the disk per step, for this checkout and
optionally another one (an earlier version) side by side in one run.

    python benchmarks/bench_capture.py [--size tiny small] [--steps 6] [--runs 3]
        [--modes full fingerprint] [--baseline DIR]

For each size (tiny: config/config.yaml's model; small: config/sweeps/small.yaml) and each
checkout, three nest captures of seed 42 (the nest env, one process each, median of --runs):
steps 0..N-1 all captured (A), the same N steps with only the last captured (B), and step 0 alone
(C). A - C is N-1 captured steps, B - C is N-1 plain ones: the line gives both per step and
their ratio, the capture overhead. ``--baseline`` runs another checkout's capture script (its
own library) on the same data, e.g. a ``git worktree`` of an earlier commit (in full mode);
``--modes`` measures this checkout's capture modes side by side (capture=full|fingerprint).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from bench_compare_real import SIZES as REAL_SIZES  # noqa: E402

from captures import TINY, capture_argv  # noqa: E402

SIZES = {k: v for k, v in REAL_SIZES.items() if k != "full"}  # full: about 5 GB per capture


def run(checkout: Path, size: str, data: Path, out: Path, steps: str, keys: list[str]) -> float:
    argv = capture_argv(out, data, steps, *keys, model_overrides=SIZES[size])
    python = ROOT / ".venvs" / "nest" / "bin" / "python"
    t0 = time.perf_counter()
    subprocess.run(
        [str(python), str(checkout / "scripts/capture_nest.py"), *argv],
        check=True,
        capture_output=True,
        cwd=checkout,
    )
    return time.perf_counter() - t0


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace(",", "")


def step_bytes(step: Path) -> int:
    return sum(f.stat().st_size for f in step.iterdir() if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=6, help="N: steps trained")
    parser.add_argument("--runs", type=int, default=3, help="runs per command (the median)")
    parser.add_argument(
        "--modes", nargs="+", choices=["full", "fingerprint"], default=["full", "fingerprint"]
    )
    parser.add_argument("--baseline", help="another checkout to measure side by side")
    args = parser.parse_args()
    from nestalign.dummy_data import make_data

    checkouts = {f"this checkout, {m}": (ROOT, [f"capture={m}"]) for m in args.modes}
    if args.baseline:
        checkouts["baseline"] = (Path(args.baseline).resolve(), [])
    n = args.steps
    plans = {
        "all": ",".join(map(str, range(n))),
        "last": str(n - 1),
        "first": "0",
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_data(TINY["data"], data)
        for size in args.size:
            times = {label: {k: [] for k in plans} for label in checkouts}
            for i in range(args.runs):  # interleaved, so that the machine's drift hits all
                for plan, steps in plans.items():
                    for label, (checkout, keys) in checkouts.items():
                        out = Path(tmp) / f"{size}_{_slug(label)}_{plan}_{i}"
                        times[label][plan].append(run(checkout, size, data, out, steps, keys))
            for label in checkouts:
                med = {k: statistics.median(v) for k, v in times[label].items()}
                captured = (med["all"] - med["first"]) / (n - 1)
                plain = (med["last"] - med["first"]) / (n - 1)
                disk = step_bytes(Path(tmp) / f"{size}_{_slug(label)}_all_0" / "step_1")
                print(
                    f"{size}, {label}: {n} steps all captured {med['all']:.1f} s, last only "
                    f"{med['last']:.1f} s, step 0 alone {med['first']:.1f} s (medians of "
                    f"{args.runs}); per step captured {captured:.2f} s, plain {plain:.2f} s: "
                    f"overhead {captured / plain:.2f}x; disk per step {disk / 1e6:.0f} MB",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
