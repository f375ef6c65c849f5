"""Several steps of two runs in one process: the imports are paid once per seed, not per step."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nestalign import artifacts as art
from nestalign.compare.step import compare_steps
from nestalign.compare.verdict import save_result


def compare_runs(
    ref_run: str | os.PathLike,
    cand_run: str | os.PathLike,
    steps: list[int],
    out_dir: str | os.PathLike,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """Compare ``step_N`` of both run directories for each step, in order; each result is
    written to ``out_dir/step_N.pkl`` before it is yielded (``options``: compare_steps's)."""
    for step in steps:
        result = compare_steps(art.step_dir(ref_run, step), art.step_dir(cand_run, step), **options)
        save_result(result, Path(out_dir) / f"step_{step}.pkl")
        yield result
