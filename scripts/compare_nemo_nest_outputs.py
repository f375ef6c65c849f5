"""Compare NeMo's and nest's captured outputs of one step (the original tool's command line).

python scripts/compare_nemo_nest_outputs.py --nemo_output_dir results/capture/nemo/seed_42 \
    --nest_output_dir results/capture/nest/seed_42 --step 0 --atol 1e-5 --rtol 1e-5 \
    --save_comparison comparison.pkl

Prints five sections (model structure, forward output, loss, parameter gradients, layer outputs)
with counts, match rates and the first 10 mismatches. Reads this project's layout and the
original tool's (run dir with model_structure.pkl and step_N/ holding layer_outputs.pkl and .pt
files).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from nestalign.compare import (  # noqa: E402
    ToleranceError,
    compare_steps,
    load_tolerances,
    save_result,
    seed_sections,
    verdict_lines,
)
from nestalign.namemap import NameMap, NameMapError  # noqa: E402


def step_dir(run_dir: Path, step: int | None) -> Path:
    """RUN_DIR/step_N; the lowest step_N when no step is given; RUN_DIR if it is a step dir."""
    if step is not None and (run_dir / f"step_{step}").is_dir():
        return run_dir / f"step_{step}"
    if step is None:
        steps = sorted(
            int(p.name[5:]) for p in run_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()
        )
        if steps:
            return run_dir / f"step_{steps[0]}"
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="--allow-pickle: the original tool stored model_structure.pkl, layer_outputs.pkl "
        "and metadata.pkl with pickle. Unpickling runs whatever code the file names, so such "
        "files are refused unless you pass --allow-pickle for files you made yourself or trust. "
        "This project's own captures never need it.",
    )
    parser.add_argument("--nemo_output_dir", required=True, help="NeMo run dir (holds step_N/)")
    parser.add_argument("--nest_output_dir", required=True, help="nest run dir (holds step_N/)")
    parser.add_argument("--step", type=int, default=None, help="step (default: lowest found)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (1e-5)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (1e-5)")
    parser.add_argument("--save_comparison", default=None, help="write the result pickle here")
    parser.add_argument("--tolerances", help="YAML with per-category tolerances")
    parser.add_argument("--name-map", help="YAML: nest -> NeMo name rules")
    parser.add_argument(
        "--force",
        action="store_true",
        help="compare even when metadata.json of the two sides disagree (seed, step, threads, "
        "device, deterministic flags, torch, config_sha256); the difference becomes a note",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load .pkl files of the original tool (runs code: trusted files only)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        tols = load_tolerances(args.tolerances, args.atol, args.rtol)
        name_map = NameMap.load(args.name_map) if args.name_map else None
    except (ToleranceError, NameMapError) as exc:
        parser.error(str(exc))
    ref = step_dir(Path(args.nemo_output_dir), args.step)
    cand = step_dir(Path(args.nest_output_dir), args.step)
    result = compare_steps(
        ref, cand, tols, name_map, allow_pickle=args.allow_pickle, force=args.force
    )
    print("\n".join(seed_sections(result)))
    print("\n" + "\n".join(verdict_lines(result)))
    if args.save_comparison:
        save_result(result, args.save_comparison)
        print(f"\ncomparison saved to {args.save_comparison}")
    return 0 if result["verdict"] != "error" else 2


if __name__ == "__main__":
    raise SystemExit(main())
