"""Fan in per-step comparison pickles into one table: results/summary.tsv and summary.md.

python scripts/summary.py results/compare --tsv results/summary.tsv --md results/summary.md

Inputs are pickles or directories searched for *.pkl. One row per (seed, step): verdict, both
losses, worst differences and matched/total per category, first culprits, drift of the worst
relative error against the previous step. Prints the Markdown table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nestalign import summary  # noqa: E402
from nestalign.compare import write_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status 1 when no pickle is found; verdicts never change the status.",
    )
    parser.add_argument("inputs", nargs="*", help="comparison pickles or directories of them")
    summary.add_own_option(parser)
    summary.add_fingerprints_option(parser)
    parser.add_argument("--tsv", default="results/summary.tsv", help="TSV table to write")
    parser.add_argument("--md", default="results/summary.md", help="Markdown table to write")
    args = parser.parse_args(argv)
    files = summary.collect(args.inputs)
    if not files and not args.fingerprints:
        parser.exit(1, f"no comparison pickles in {' '.join(args.inputs) or '(no inputs)'}\n")
    own = [summary.load_or_error(f) for f in summary.collect(args.own)]
    try:
        results = summary.with_fingerprints(
            [summary.load_or_error(f) for f in files], args.fingerprints
        )
    except summary.SummaryError as exc:
        parser.exit(1, f"{exc}\n")
    table = summary.rows(results, own)
    md = summary.markdown(table)
    write_atomic(args.tsv, summary.tsv(table).encode())
    write_atomic(args.md, md.encode())
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
