"""Check a framework's config, data and disk before any capture (nestalign.validate).

    python scripts/validate.py --framework nest --capture-script scripts/capture_nest.py \
        --config-path config --config-name nest_fast-conformer --captures 6 \
        --origins '{"model_overrides": [...]}' --out results/validation/nest.json OVERRIDES...

Runs in the framework's env, with the overrides its capture jobs get. Prints each problem as one
line on stderr and exits 1; when nothing failed, writes what was checked to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nestalign.validate import validate  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", required=True, help="framework name (config frameworks)")
    parser.add_argument("--capture-script", type=Path, required=True, help="its capture script")
    parser.add_argument("--config-path", "-cp", default="config", help="config directory")
    parser.add_argument("--config-name", "-cn", default="nest_fast-conformer")
    parser.add_argument(
        "--origins",
        default="{}",
        help="JSON: config key -> its overrides (model_overrides, frameworks.X.overrides)",
    )
    parser.add_argument("--captures", type=int, default=1, help="seeds x steps of the sweep")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder")
    parser.add_argument("--out", type=Path, required=True, help="validation JSON to write")
    parser.add_argument("overrides", nargs="*", help="the capture's Hydra overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    found = validate(
        args.framework,
        args.capture_script,
        args.config_path,
        args.config_name,
        args.overrides,
        json.loads(args.origins),
        args.captures,
        args.results,
    )
    for line in found.problems:
        print(line, file=sys.stderr)
    if found.problems:
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found.checked, indent=1, sort_keys=True) + "\n")
    print(f"{args.framework}: config, data and disk checked: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
