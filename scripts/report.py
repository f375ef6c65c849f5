"""Write results/report.html and one rows TSV per step from the comparison pickles (no network).

python scripts/report.py results/compare --out results/report.html --rows-dir results/report/rows

Inputs are pickles or directories searched for *.pkl. The page holds the summary table (each row
links to its step's section), losses and drift over steps, and per (seed, step) the culprits,
the divergences, the error of every module call along the execution order and the call tree
with filters. ROWS_DIR/<section id>.tsv holds a step's rows (the table's columns).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nestalign import summary  # noqa: E402
from nestalign.compare import write_atomic  # noqa: E402
from nestalign.report import build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="comparison pickles or directories of them")
    summary.add_own_option(parser)
    summary.add_fingerprints_option(parser)
    parser.add_argument("--out", default="results/report.html", help="HTML file to write")
    parser.add_argument(
        "--rows-dir", help="folder of the per-step TSVs (default: report/rows beside --out)"
    )
    parser.add_argument("--reference", help="reference label (default: from the captures)")
    parser.add_argument("--candidate", help="candidate label (default: from the captures)")
    args = parser.parse_args(argv)
    files = summary.collect(args.inputs)
    if not files and not args.fingerprints:
        parser.exit(1, f"no comparison pickles in {' '.join(args.inputs) or '(no inputs)'}\n")
    try:
        results = summary.with_fingerprints(
            [summary.load_or_error(f) for f in files], args.fingerprints
        )
    except summary.SummaryError as exc:
        parser.exit(1, f"{exc}\n")
    rows_dir = Path(args.rows_dir) if args.rows_dir else Path(args.out).parent / "report" / "rows"
    href = Path(os.path.relpath(rows_dir, Path(args.out).parent)).as_posix()
    own = [summary.load_or_error(f) for f in summary.collect(args.own)]
    report = build(results, args.reference, args.candidate, href, own)
    rows_dir.mkdir(parents=True, exist_ok=True)
    for anchor, text in report.rows.items():
        write_atomic(rows_dir / f"{anchor}.tsv", text.encode())
    write_atomic(args.out, report.html.encode())
    print(f"report written to {args.out}, {len(report.rows)} row tables in {rows_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
