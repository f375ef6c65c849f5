"""The original comparison tool's five sections, printed from a result."""

from __future__ import annotations

import math
from typing import Any

from nestalign.compare.rows import FAILED


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _num(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; "-" when there is none (shapes differ, say)."""
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def seed_sections(result: dict[str, Any], limit: int = 10) -> list[str]:
    """The five sections of the original comparison tool: counts, match rates, mismatches."""
    cats = result["categories"]
    lines: list[str] = []

    def head(title: str) -> None:
        lines.extend(["", "=" * 80, title, "=" * 80])

    def counts(cat: str) -> None:
        c = cats.get(cat) or {}
        if c.get("error"):
            lines.append(f"  ERROR: {c['error']}")
            return
        total, matched = c.get("total", 0), c.get("matched", 0)
        rate = 100.0 * matched / total if total else 0.0
        lines.append(f"  items: {total}  matched: {matched} ({rate:.2f}%)")
        lines.append(
            f"  only in {result['reference']}: {len(c.get('only_ref', []))}  "
            f"only in {result['candidate']}: {len(c.get('only_cand', []))}"
        )
        if c.get("noise"):
            lines.append(f"  at noise level: {len(c['noise'])}")
        bad = [r for r in c.get("rows", []) if r["status"] in FAILED]
        for r in bad[:limit]:
            lines.append(f"  Mismatch: {r['name']}: {r.get('reason', '')}")
            if _finite(r.get("max_abs")):
                lines.append(
                    f"    max abs {_num(r.get('max_abs'), '.3e')}"
                    f"  max rel {_num(r.get('max_rel'), '.3e')}"
                    f"  cosine {_num(r.get('cosine'), '.8f')}"
                )
        if len(bad) > limit:
            lines.append(f"  ... and {len(bad) - limit} more")

    head("1. Model structure")
    counts("structure")
    s = cats.get("structure") or {}
    if s.get("first_order_difference"):
        d = s["first_order_difference"]
        lines.append(f"  order differs from position {d['index']}: {d['ref']} vs {d['cand']}")
    head("2. Forward output")
    counts("forward")
    head("3. Loss")
    loss = result["losses"]
    lines.append(
        f"  {result['reference']}: {loss['reference']}  {result['candidate']}: {loss['candidate']}"
    )
    counts("loss")
    head("4. Parameter gradients")
    counts("grads")
    head("5. Layer outputs")
    counts("layers")
    for direction in ("forward", "backward"):
        first = result["divergence"][direction]["first"]
        if first:
            lines.append(f"  first {direction} culprit: {first['where']}")
    return lines
