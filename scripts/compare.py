"""Compare captured steps of the reference with the candidate's; write each result as a pickle.

One step:
python scripts/compare.py --ref results/capture/nemo/seed_42/step_0 \
    --cand results/capture/nest/seed_42/step_0 --atol 1e-5 --rtol 1e-5 \
    --out results/compare/seed_42/step_0.pkl

Several steps of one seed in one process (the workflow's form; results/compare/seed_42/step_N.pkl):
python scripts/compare.py --ref-run results/capture/nemo/seed_42 \
    --cand-run results/capture/nest/seed_42 --steps 0,1 --atol 1e-5 --rtol 1e-5 \
    --out-dir results/compare/seed_42

Without --atol/--rtol (and no tolerance file), each dtype gets torch.testing.assert_close's
defaults. The pickle is a plain dict (see docs/compare.md); each step's verdict is printed.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from nestalign.compare import (  # noqa: E402
    add_tolerance_options,
    compare_runs,
    compare_steps,
    parse_steps,
    save_result,
    tolerance_settings,
    verdict_lines,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Give --ref/--cand/--out (one step) or --ref-run/--cand-run/--steps/--out-dir. "
        "Exit status 0 whatever the verdicts (they are in the pickles), unless --strict.",
    )
    parser.add_argument("--ref", help="reference step directory (step_N)")
    parser.add_argument("--cand", help="candidate step directory (step_N)")
    parser.add_argument("--out", help="result pickle to write")
    parser.add_argument("--ref-run", help="reference run directory (holds step_N/)")
    parser.add_argument("--cand-run", help="candidate run directory (holds step_N/)")
    parser.add_argument("--steps", help="steps to compare in one process, e.g. 0,1,2")
    parser.add_argument("--out-dir", help="where step_N.pkl of each step is written")
    add_tolerance_options(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of torch and of the fused pass (default 1; the figures are the same for any)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="compare even when metadata.json of the two sides disagree (seed, step, threads, "
        "device, deterministic flags, torch, config_sha256); the difference becomes a note",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every verdict is pass")
    parser.add_argument(
        "--no-index",
        action="store_true",
        help="read every tensor through torch.load, also those whose tensor_index.json "
        "fingerprints agree",
    )
    args = parser.parse_args(argv)
    one = [args.ref, args.cand, args.out]
    run = [args.ref_run, args.cand_run, args.steps, args.out_dir]
    if not (all(one) and not any(run)) and not (all(run) and not any(one)):
        parser.error(
            "give either --ref, --cand and --out, or --ref-run, --cand-run, --steps and --out-dir"
        )
    torch.set_num_threads(args.threads)
    tols, name_map = tolerance_settings(parser, args)
    options = {"force": args.force, "use_index": not args.no_index}
    if args.ref:
        result = compare_steps(args.ref, args.cand, tols, name_map, **options)
        save_result(result, args.out)
        results = [result]
        print("\n".join(verdict_lines(result)))
    else:
        steps = parse_steps(parser, args.steps)
        results = []
        for result in compare_runs(
            args.ref_run,
            args.cand_run,
            steps,
            args.out_dir,
            tolerances=tols,
            name_map=name_map,
            **options,
        ):
            results.append({"verdict": result["verdict"]})
            print("\n".join(verdict_lines(result)), flush=True)
    return 1 if args.strict and any(r["verdict"] != "pass" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
