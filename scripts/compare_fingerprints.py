"""Compare every step of one seed's fingerprint captures (capture=fingerprint); write JSON.

python scripts/compare_fingerprints.py --ref-run results/capture/nemo/seed_42 \
    --cand-run results/capture/nest/seed_42 --steps 0,1,2 --atol 1e-5 --rtol 1e-5 \
    --out results/fingerprints/seed_42.json

Per step: PASS (every tensor bitwise identical), FAIL (the loss, or a statistic that proves a
tensor outside tolerance) or CLOSE (statistics within their bounds: not a proof); the last line
names the step to capture again in full (docs/compare.md, fingerprint compare).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nestalign import fingerprints  # noqa: E402
from nestalign.compare import (  # noqa: E402
    add_tolerance_options,
    parse_steps,
    tolerance_settings,
    write_atomic,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status 0 whatever the verdicts (they are in the JSON), unless --strict.",
    )
    parser.add_argument("--ref-run", required=True, help="reference run dir (holds step_N/)")
    parser.add_argument("--cand-run", required=True, help="candidate run dir (holds step_N/)")
    parser.add_argument("--steps", required=True, help="steps to compare, e.g. 0,1,2")
    add_tolerance_options(parser)
    parser.add_argument("--out", required=True, help="JSON result to write")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every step passes")
    args = parser.parse_args(argv)
    steps = parse_steps(parser, args.steps)
    tols, name_map = tolerance_settings(parser, args)
    run = fingerprints.compare_run(args.ref_run, args.cand_run, steps, tols, name_map)
    write_atomic(args.out, (json.dumps(run, indent=1) + "\n").encode())
    print("\n".join(fingerprints.run_lines(run)))
    return 1 if args.strict and run["localise"] is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
