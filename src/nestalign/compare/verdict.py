"""The terminal lines of a result and the result pickle."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from nestalign.compare.step import CATEGORIES


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: verdict, per-category counts, first culprits."""
    lines = [
        f"{result['reference']} vs {result['candidate']} seed={result['seed']} "
        f"step={result['step']}: {result['verdict'].upper()}"
    ]
    for err in result["errors"]:
        lines.append(f"  error [{err['category']}]: {err['error']}")
    for cat in CATEGORIES:
        c = result["categories"].get(cat)
        if not c or c.get("error"):
            continue
        w = c["worst"]
        lines.append(
            f"  {cat:<12} {c['matched']}/{c['total']} matched"
            + (f", worst max_rel {w['max_rel']:.3g} ({w['item']})" if w.get("max_rel") else "")
            + (f", {len(c['noise'])} at noise level" if c["noise"] else "")
        )
    for direction in ("forward", "backward"):
        first = result["divergence"][direction]["first"]
        if first:
            lines.append(f"  first {direction} culprit: {first['where']}")
    return lines


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` through a temporary file beside ``path`` and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_result(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Pickle the result (plain builtins only) atomically."""
    write_atomic(path, pickle.dumps(result, protocol=4))
