"""The rows of one compared step for the report: the module-call tree, marks, and the TSV.

Module calls (categories ``layers`` and ``layer_grads``) form a tree in the reference's
execution order; each call is placed at its completion index (a parent after its children).
Culprits and divergences are located by the call their ``where`` names, so a mark sits where
its label says. Other categories (batch, forward, loss, grads, weights, init, ...) are flat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from nestalign.summary import _fmt

CALL_CATEGORIES = ("layers", "layer_grads")
# The table's and the TSV's columns, in order.
COLUMNS = (
    "order",
    "category",
    "name",
    "class",
    "status",
    "mark",
    "walk",
    "max_abs",
    "max_rel",
    "cosine",
    "forced",
    "reason",
    "parent",
)
FAILING = ("fail", "only_ref", "only_cand")
_CALL = re.compile(r"[^\s()]+#\d+")


@dataclass(eq=False)
class Call:
    """One reference call (or a candidate-only note) with its rows per category."""

    key: str
    row: dict[str, Any]
    order: int | None
    parent: Call | None = None
    children: list[Call] = field(default_factory=list)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def call_tree(result: dict[str, Any]) -> tuple[list[Call], dict[str, Call]]:
    """Root calls (in start order, candidate-only calls last) and every call by key."""
    cats = result.get("categories") or {}
    calls: dict[str, Call] = {}
    for cat in CALL_CATEGORIES:
        for row in (cats.get(cat) or {}).get("rows", []):
            call = calls.get(row["name"])
            if call is None:
                call = calls[row["name"]] = Call(row["name"], row, row.get("end"))
            call.rows[cat] = row
    placed = sorted(
        (c for c in calls.values() if c.row.get("start") is not None),
        key=lambda c: c.row["start"],
    )
    roots: list[Call] = []
    stack: list[Call] = []
    for call in placed:
        end = call.row.get("end")
        while stack and end is not None and (stack[-1].order is None or stack[-1].order < end):
            stack.pop()
        if stack:
            call.parent = stack[-1]
            stack[-1].children.append(call)
        else:
            roots.append(call)
        stack.append(call)
    roots += [c for c in calls.values() if c.row.get("start") is None]
    return roots, calls


def locate(entry: dict[str, Any], calls: dict[str, Call]) -> str | None:
    """The call a culprit or divergence entry names: the first call key in its ``where``, else
    the first call of its module."""
    for key in _CALL.findall(entry.get("where") or ""):
        if key in calls:
            return key
    module = entry.get("module")
    return f"{module}#0" if module and f"{module}#0" in calls else None


def marks(result: dict[str, Any], calls: dict[str, Call]) -> dict[tuple[str, str], list[str]]:
    """(category, name) -> the culprit and divergence labels of that row."""
    cats = result.get("categories") or {}
    out: dict[tuple[str, str], list[str]] = {}

    def target(entry: dict[str, Any], backward: bool) -> tuple[str, str] | None:
        key = locate(entry, calls)
        if key is not None:
            cat = "layer_grads" if backward and "layer_grads" in calls[key].rows else "layers"
            return cat, key
        for cat in ("grads", "init", "weights") if backward else ("init", "weights", "grads"):
            if any(
                r.get("name") == entry.get("name") for r in (cats.get(cat) or {}).get("rows", [])
            ):
                return cat, entry["name"]
        return None

    for direction in ("forward", "backward"):
        first = ((result.get("divergence") or {}).get(direction) or {}).get("first")
        place = first and target(first, direction == "backward")
        if place:
            out.setdefault(place, []).append(f"first {direction} culprit")
    for e in result.get("divergences") or []:
        place = target(e, e.get("direction") == "backward")
        if place:
            also = " (also backward)" if e.get("also") == "backward" else ""
            label = f"divergence: {e.get('class')}"
            label += ", backward" if e.get("direction") == "backward" else also
            out.setdefault(place, []).append(label)
    return out


def _walk(result: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(category, call) -> its class in the divergence walk (victim, culprit, glue, ...)."""
    div = result.get("divergence") or {}
    out = {}
    for direction, cat in (("forward", "layers"), ("backward", "layer_grads")):
        for c in (div.get(direction) or {}).get("calls") or []:
            out[(cat, c["name"])] = c.get("class") or c.get("kind") or ""
    return out


def _cells(
    cat: str, row: dict[str, Any], order: int | None, parent: str, mark: list[str], walk: str
) -> dict[str, str]:
    forced = row.get("forced")
    return {
        "order": "" if order is None else str(order),
        "category": cat,
        "name": str(row.get("name", "")),
        "class": str(row.get("type") or ""),
        "status": str(row.get("status", "")),
        "mark": "; ".join(mark),
        "walk": walk,
        "max_abs": _fmt(row.get("max_abs")),
        "max_rel": _fmt(row.get("max_rel")),
        "cosine": _fmt(row.get("cosine")),
        "forced": "" if forced is None else "own error" if forced else "no",
        "reason": str(row.get("reason") or ""),
        "parent": parent,
    }


@dataclass
class Line:
    """One row of the table (and of the TSV), with its depth in the call tree."""

    cells: dict[str, str]
    depth: int

    @property
    def failing(self) -> bool:
        return self.cells["status"] in FAILING

    @property
    def marked(self) -> bool:
        return bool(self.cells["mark"])


def step_lines(
    result: dict[str, Any],
) -> tuple[list[Call], dict[Call, list[Line]], list[Line]]:
    """Call roots, each call's lines (outputs, then gradients), and the flat categories' lines."""
    roots, calls = call_tree(result)
    mark = marks(result, calls)
    walk = _walk(result)
    forced = {k: c.rows["layers"].get("forced") for k, c in calls.items() if "layers" in c.rows}
    per_call: dict[Call, list[Line]] = {}

    def visit(call: Call, depth: int) -> None:
        parent = call.parent.key if call.parent else str(call.row.get("parent") or "")
        for cat in CALL_CATEGORIES:
            row = call.rows.get(cat)
            if row is None:
                continue
            row = {**row, "forced": forced.get(call.key)} if cat == "layer_grads" else row
            cells = _cells(
                cat,
                row,
                call.order,
                parent,
                mark.get((cat, call.key), []),
                walk.get((cat, call.key), ""),
            )
            per_call.setdefault(call, []).append(Line(cells, depth))
        for child in call.children:
            visit(child, depth + 1)

    for root in roots:
        visit(root, 0)
    flat = []
    for cat, c in (result.get("categories") or {}).items():
        if cat in CALL_CATEGORIES:
            continue
        for row in c.get("rows") or []:
            name = str(row.get("name", ""))
            flat.append(Line(_cells(cat, row, None, "", mark.get((cat, name), []), ""), 0))
    return roots, per_call, flat


def ordered(roots: list[Call], per_call: dict[Call, list[Line]], flat: list[Line]) -> list[Line]:
    """Every line in table order: calls depth first in start order, then the flat categories."""
    out: list[Line] = []

    def visit(call: Call) -> None:
        out.extend(per_call.get(call, []))
        for child in call.children:
            visit(child)

    for root in roots:
        visit(root)
    return out + flat


def tsv(lines: list[Line]) -> str:
    """The lines as a TSV with a header (``-`` for an empty cell)."""
    body = ["\t".join(COLUMNS)]
    body += ["\t".join(_fmt(line.cells[c]) for c in COLUMNS) for line in lines]
    return "\n".join(body) + "\n"
