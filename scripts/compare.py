"""Compare one captured step of the reference with the candidate's; write the result as a pickle.

python scripts/compare.py --ref results/capture/nemo/seed_42/step_0 \
    --cand results/capture/nest/seed_42/step_0 --atol 1e-5 --rtol 1e-5 \
    --out results/compare/seed_42/step_0.pkl

Without --atol/--rtol (and no tolerance file), each dtype gets torch.testing.assert_close's
defaults. The pickle is a plain dict (see docs/compare.md); the verdict is printed.
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
    verdict_lines,
)
from nestalign.namemap import NameMap, NameMapError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status 0 whatever the verdict (it is in the pickle), unless --strict.",
    )
    parser.add_argument("--ref", required=True, help="reference step directory (step_N)")
    parser.add_argument("--cand", required=True, help="candidate step directory (step_N)")
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance")
    parser.add_argument(
        "--tolerances",
        help="YAML file or inline mapping: atol, rtol, noise_factor, categories",
    )
    parser.add_argument("--name-map", help="YAML: candidate -> reference name rules")
    parser.add_argument("--out", required=True, help="result pickle to write")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="compare even when metadata.json of the two sides disagree (seed, step, threads, "
        "device, deterministic flags, torch, config_sha256); the difference becomes a note",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 unless the verdict is pass")
    parser.add_argument(
        "--no-index",
        action="store_true",
        help="read every tensor, also those whose tensor_index.json fingerprints agree",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        tols = load_tolerances(args.tolerances, args.atol, args.rtol)
        name_map = NameMap.load(args.name_map) if args.name_map else None
    except (ToleranceError, NameMapError) as exc:
        parser.error(str(exc))
    result = compare_steps(
        args.ref, args.cand, tols, name_map, force=args.force, use_index=not args.no_index
    )
    save_result(result, args.out)
    print("\n".join(verdict_lines(result)))
    return 1 if args.strict and result["verdict"] != "pass" else 0


if __name__ == "__main__":
    raise SystemExit(main())
