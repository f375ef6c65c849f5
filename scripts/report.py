"""Write results/report.html from the per-step comparison pickles (self-contained, no network).

python scripts/report.py results/compare --out results/report.html

Inputs are pickles or directories searched for *.pkl. The page holds the summary table, both
frameworks' losses over steps, the worst relative error over steps, and for each (seed, step)
the error along the reference's execution order with the first culprits marked.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nestalign import summary  # noqa: E402
from nestalign.compare import write_atomic  # noqa: E402
from nestalign.report import render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="comparison pickles or directories of them")
    parser.add_argument("--out", default="results/report.html", help="HTML file to write")
    args = parser.parse_args(argv)
    files = summary.collect(args.inputs)
    if not files:
        parser.exit(1, f"no comparison pickles in {' '.join(args.inputs)}\n")
    write_atomic(args.out, render([summary.load_or_error(f) for f in files]).encode())
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
