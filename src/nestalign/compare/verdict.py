"""The terminal lines of a result and the result pickle."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

from nestalign.compare.rows import FAILED
from nestalign.compare.step import CATEGORIES, NUMERIC

FAILING_LISTED = 10  # failing items printed per category
NOTES_LISTED = 10


def failing_items(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(category, name, reason) of every failing item of the numeric categories, in order."""
    out = []
    for cat in NUMERIC:
        c = result["categories"].get(cat) or {}
        for r in c.get("rows", []):
            if r["status"] in FAILED:
                out.append((cat, r["name"], row_reason(r)))
    return out


def row_reason(row: dict[str, Any]) -> str:
    """The row's reason, with its largest absolute difference when it has one."""
    reason = row.get("reason") or row["status"]
    max_abs = row.get("max_abs")
    if isinstance(max_abs, float) and not math.isnan(max_abs) and "max abs" not in reason:
        reason += f" (max abs {max_abs:.3g})"
    return reason


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """Lines for the terminal: verdict, per-category counts and failing items, first culprits,
    divergences, notes."""
    notes = result.get("notes") or []
    lines = [
        f"{result['reference']} vs {result['candidate']} seed={result['seed']} "
        f"step={result['step']}: {result['verdict'].upper()}"
        + (f" ({len(notes)} notes)" if notes else "")
    ]
    for err in result["errors"]:
        lines.append(f"  error [{err['category']}]: {err['error']}")
    init = result.get("init")
    if init and init.get("differs"):
        lines.append(
            f"  init differs: {init['differs']} of {init['total']} tensors, first "
            f"{init['first']} ({init.get('reason') or 'differs'})"
        )
    if result.get("nonfinite"):
        lines.append(f"  non-finite on both sides: {', '.join(result['nonfinite'])}")
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
    for cat in NUMERIC:
        c = result["categories"].get(cat) or {}
        bad = [r for r in c.get("rows", []) if r["status"] in FAILED]
        for r in bad[:FAILING_LISTED]:
            lines.append(f"  fail [{cat}] {r['name']}: {row_reason(r)}")
        if len(bad) > FAILING_LISTED:
            lines.append(f"  ... and {len(bad) - FAILING_LISTED} more")
    for direction in ("forward", "backward"):
        first = result["divergence"][direction]["first"]
        if first:
            lines.append(f"  first {direction} culprit: {first['where']}")
    for d in result.get("divergences") or []:
        extra = ", backward" if d.get("direction") == "backward" else ""
        lines.append(f"  divergence: {d['where']} ({d['class']}{extra})")
    for n in notes[:NOTES_LISTED]:
        lines.append(f"  note: [{n.get('category', '-')}] {n['name']}: {n['reason']}")
    if len(notes) > NOTES_LISTED:
        lines.append(f"  ... and {len(notes) - NOTES_LISTED} more notes")
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
