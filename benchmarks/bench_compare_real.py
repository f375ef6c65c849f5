"""The compare on real captures, in this format and the older ones, side by side.

    python benchmarks/bench_compare_real.py [--size tiny full] [--dir DIR] [--threads 1]

For each size (tiny: config/config.yaml's model; small, full: config/sweeps/) it captures step 0
of seed 42 with real NeMo and the nest port, each in its own env (.venvs/<env>), on the
workflow's dummy data, plus two nest variants: one torch thread instead of two (rounding
differences) and seed 43 (every value differs). Three compares against NeMo's capture:

- identical: nest, bitwise equal to NeMo;
- fp noise: nest with one thread (the batch and initial state equal, the rest differs by
  rounding);
- every value differs: nest with seed 43.

Each runs in a fresh process three times (FORMATS): on the captures as written (their
tensor_index.json lets the compare skip tensors whose fingerprints agree and map the rest through
nestalign.flat), on hard-linked copies whose index lacks the flat reader's spans (the rest read by
torch.load, as the format before), and on copies without the index (as a capture made before the
index: every tensor read). A line gives the tensor bytes of both
sides, the time of compare_steps in the process and its throughput, the whole process
(interpreter and imports included), and the peak RSS over the process's RSS after its imports
against the largest artifact. Then the fingerprints' cost at capture time
(tensor_fingerprint over one capture's tensors) and the disk per step. Captures are kept in
--dir (reused when present).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from bench_compare import child  # noqa: E402

from captures import TINY, capture_argv  # noqa: E402
from nestalign import artifacts as art  # noqa: E402

SIZES = {
    "tiny": TINY["model_overrides"],
    "small": yaml.safe_load((ROOT / "config/sweeps/small.yaml").read_text())["model_overrides"],
    "full": yaml.safe_load((ROOT / "config/sweeps/full.yaml").read_text())["model_overrides"],
}
# name: (framework, seed, threads)
CAPTURES = {
    "nemo": ("nemo", 42, 2),
    "nest": ("nest", 42, 2),
    "nest_1_thread": ("nest", 42, 1),
    "nest_seed_43": ("nest", 43, 2),
}
# flat: this capture format (tensor_index.json with spans: mapped, never unpickled); torch.load:
# the same index without spans (fingerprints skip identical tensors, the rest is unpickled);
# without index: every tensor unpickled and compared
FORMATS = ("flat", "torch.load", "without index")
CASES = (
    ("identical", "nest"),
    ("fp noise", "nest_1_thread"),
    ("every value differs", "nest_seed_43"),
)


def capture(size: str, name: str, data: Path, out: Path) -> Path:
    """Step 0 of one capture (made once; reused from --dir)."""
    step = out / "step_0"
    if (step / art.INDEX).is_file():
        return step
    framework, seed, threads = CAPTURES[name]
    keys = (f"seed={seed}", f"threads={threads}")
    argv = capture_argv(out, data, "0", *keys, model_overrides=SIZES[size])
    python = ROOT / ".venvs" / framework / "bin" / "python"
    t0 = time.perf_counter()
    subprocess.run(
        [str(python), str(ROOT / f"scripts/capture_{framework}.py"), *argv],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    print(f"  captured {size} {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return step


def older(step: Path, root: Path, fmt: str) -> Path:
    """A hard-linked copy of a step directory as an older capture has it: ``torch.load`` (an
    index without the flat reader's spans and skeletons) or ``without index`` (no index)."""
    copy = root / fmt.replace(" ", "_").replace(".", "_") / step.parent.name / step.name
    if not copy.exists():
        copy.mkdir(parents=True)
        for f in step.iterdir():
            if f.name != art.INDEX:
                os.link(f, copy / f.name)
        if fmt == "torch.load":
            index = art.load_json(step / art.INDEX)
            art.save_json(copy / art.INDEX, {k: index[k] for k in ("format", "files", "stamps")})
    return copy


def run_compare(ref: Path, cand: Path, threads: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), "--child", str(ref), str(cand)],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process"] = time.perf_counter() - t0
    return out


def tensor_bytes(*steps: Path) -> tuple[int, int]:
    files = [s / f for s in steps for f in art.TENSOR_FILES if (s / f).is_file()]
    return sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)


def fingerprint_cost(step: Path) -> str:
    loaded = [art.load_tensors(step / name) for name in art.TENSOR_FILES]
    t0 = time.perf_counter()
    count = sum(len(art.index_of(obj)) for obj in loaded)
    seconds = time.perf_counter() - t0
    size, _ = tensor_bytes(step)
    return (
        f"{count} tensors, {size / 1e6:.0f} MB in {seconds:.2f} s ({size / seconds / 1e9:.2f} GB/s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["tiny", "full"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the compare")
    parser.add_argument("--dir", help="where the captures are kept (default: a temp dir)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # force: the variants' seed and threads differ from the reference's on purpose
        child(*args.child, args.threads, force=True)
        return 0
    from nestalign.dummy_data import make_data

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_real_"))
    data = root / "data"
    if not (data / "train_manifest.json").is_file():
        make_data(TINY["data"], data)
    try:
        for size in args.size:
            print(f"{size}:", flush=True)
            steps = {n: capture(size, n, data, root / size / n) for n in CAPTURES}
            for label, name in CASES:
                figures = {}
                for fmt in FORMATS:
                    ref, cand = steps["nemo"], steps[name]
                    if fmt != "flat":
                        ref, cand = older(ref, root / size, fmt), older(cand, root / size, fmt)
                    total, largest = tensor_bytes(ref, cand)
                    r = run_compare(ref, cand, args.threads)
                    figures[fmt] = r
                    over = r["over"] = r["peak"] - r["base"]
                    print(
                        f"  {label}, {fmt}: {total / 1e9:.3f} GB; compare_steps {r['seconds']:.2f}"
                        f" s = {total / r['seconds'] / 1e9:.2f} GB/s; process {r['process']:.2f}"
                        f" s = {total / r['process'] / 1e9:.2f} GB/s ({r['verdict']}); peak RSS "
                        f"{over / 1e6:.0f} MB over imports, {over / largest:.2f}x the largest "
                        f"artifact ({largest / 1e6:.0f} MB)",
                        flush=True,
                    )
                new = figures["flat"]
                for fmt in FORMATS[1:]:
                    prev = figures[fmt]
                    print(
                        f"  {label}: flat against {fmt}: {prev['seconds'] / new['seconds']:.2f}x"
                        f" faster in compare_steps, {prev['process'] / new['process']:.2f}x as a"
                        f" process, peak {new['over'] / prev['over']:.2f}x",
                        flush=True,
                    )
            size_bytes, _ = tensor_bytes(steps["nest"])
            index = (steps["nest"] / art.INDEX).stat().st_size
            print(
                f"  disk per step and side: {size_bytes / 1e6:.0f} MB of tensors, index "
                f"{index / 1e3:.0f} kB; fingerprints at capture: {fingerprint_cost(steps['nest'])}",
                flush=True,
            )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
