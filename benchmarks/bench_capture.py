"""What capturing a step costs over training it, and the disk per step, for this checkout and
optionally another one (an earlier version) side by side in one run.

    python benchmarks/bench_capture.py [--size tiny small] [--captured 3] [--runs 2]
        [--modes full fingerprint] [--baseline DIR]

For each size (tiny: config/config.yaml's model; small: config/sweeps/small.yaml) and each
checkout, nest captures of seed 42 (the nest env, one torch thread, one process per run:
benchmarks/timed_capture.py) time every training step in the process, from one batch's start to
the next (the last one to the end of training, which commits it). A run trains step 0 (warm-up,
left out), P = 3 plain steps (nothing being written: the plain step's time), K = --captured
steps each followed by a plain one, then K captured steps in a row. The files are written on a
background thread while training goes on, so a captured step's cost is what the pair adds over
two plain steps ("alternating"), and in a row a step's whole time ("in a row"); each against the
plain step gives the capture overhead. Medians over all runs; the disk per captured step counts
distinct files (a hard link once). ``--baseline`` runs another checkout's library on the same
data, e.g. a ``git worktree`` of an earlier commit, in each of ``--modes`` (this checkout's
capture modes, side by side). Last, per size, the fingerprints a fingerprint capture computes,
over the tensors of this checkout's last full step, with the compiled scan
(nestalign.tensor_scan) and with torch alone, side by side in this process.
"""

from __future__ import annotations

import argparse
import json
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


PLAIN = 3  # plain steps after the warm-up, before anything is captured


def step_times(checkout: Path, size: str, data: Path, out: Path, k: int, keys: list[str]):
    """(plain step times, alternating pair costs, in-a-row step times) of one run."""
    pairs = [1 + PLAIN + 2 * i for i in range(k)]
    row = [1 + PLAIN + 2 * k + i for i in range(k)]
    argv = capture_argv(
        out, data, ",".join(map(str, pairs + row)), *keys, model_overrides=SIZES[size]
    )
    python = ROOT / ".venvs" / "nest" / "bin" / "python"
    proc = subprocess.run(
        [str(python), str(ROOT / "benchmarks/timed_capture.py"), str(checkout), *argv],
        check=True,
        capture_output=True,
        text=True,
        cwd=checkout,
    )
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    plain = t[1 : 1 + PLAIN]
    return plain, [t[s] + t[s + 1] for s in pairs], [t[s] for s in row]


def disk_per_step(run: Path) -> tuple[float, int]:
    """Distinct bytes over the run's step directories per step, and how many steps."""
    seen: dict[tuple[int, int], int] = {}
    steps = sorted(run.glob("step_*"))
    for f in (f for d in steps for f in d.iterdir() if f.is_file()):
        st = f.stat()
        seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values()) / len(steps), len(steps)


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace(",", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument("--captured", type=int, default=3, help="K (see above)")
    parser.add_argument("--runs", type=int, default=2, help="processes per checkout and size")
    parser.add_argument(
        "--modes", nargs="+", choices=["full", "fingerprint"], default=["full", "fingerprint"]
    )
    parser.add_argument("--baseline", help="another checkout to measure side by side")
    args = parser.parse_args()
    from nestalign.dummy_data import make_data

    checkouts = {f"this checkout, {m}": (ROOT, [f"capture={m}"]) for m in args.modes}
    if args.baseline:  # in the same modes
        for m in args.modes:
            checkouts[f"baseline, {m}"] = (Path(args.baseline).resolve(), [f"capture={m}"])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_data(TINY["data"], data)
        for size in args.size:
            times = {label: ([], [], []) for label in checkouts}
            for i in range(args.runs):  # interleaved, so that the machine's drift hits all
                for label, (checkout, keys) in checkouts.items():
                    out = Path(tmp) / f"{size}_{_slug(label)}_{i}"
                    got = step_times(checkout, size, data, out, args.captured, keys)
                    for into, values in zip(times[label], got, strict=True):
                        into.extend(values)
            for label, (plain, pairs, row) in times.items():
                pla = statistics.median(plain)
                alternating = statistics.median(pairs) - pla  # the pair over two plain steps
                in_row = statistics.median(row)
                disk, n = disk_per_step(Path(tmp) / f"{size}_{_slug(label)}_0")
                print(
                    f"{size}, {label}: plain step {pla:.3f} s; a captured step costs "
                    f"{alternating:.3f} s alternating ({alternating / pla:.2f}x), {in_row:.3f} s "
                    f"in a row ({in_row / pla:.2f}x) (medians over {args.runs} processes); "
                    f"disk per step {disk / 1e6:.0f} MB ({n} steps)",
                    flush=True,
                )
            full = Path(tmp) / f"{size}_{_slug('this checkout, full')}_0"
            if full.is_dir():
                print(f"{size}, {fingerprint_ways(sorted(full.glob('step_*'))[-1])}", flush=True)
    return 0


def fingerprint_ways(step: Path) -> str:
    """What a fingerprint capture's writer computes for one step (every tensor's fingerprint and
    statistics, ``index_of(stats=True)``), with the compiled scan and with torch alone (as
    without numba), best of 3 each, in this process (one torch thread)."""
    import torch

    from nestalign import artifacts as art

    torch.set_num_threads(1)
    loaded = [art.load_tensors(step / name) for name in art.TENSOR_FILES]
    scanner = art._scanner
    best = {}
    for way, scan in (("scan", scanner), ("torch", lambda: None)):
        art._scanner = scan
        art.index_of(loaded[0], stats=True)  # the scan's compiled code loaded once
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            count = sum(len(art.index_of(obj, stats=True)) for obj in loaded)
            times.append(time.perf_counter() - t0)
        best[way] = min(times)
    art._scanner = scanner
    size = sum((step / name).stat().st_size for name in art.TENSOR_FILES)
    return (
        f"fingerprints with statistics of one step's {count} tensors ({size / 1e6:.0f} MB): "
        f"{best['scan']:.3f} s with the scan, {best['torch']:.3f} s with torch "
        f"({best['torch'] / best['scan']:.2f}x)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
