"""Self-contained HTML report: summary table, drift plots and one drill-down section per step.

One file, no network: inline CSS, a little inline JavaScript (filters) and inline SVG plots.
Each summary row links to its step's section (``#seed_S_step_T``; with several (reference,
candidate) pairs ``_REF_vs_CAND`` is appended, repeats get ``_2``, ``_3``...). A section holds
the culprits, the divergences, the error of every module call along the execution order (each
call at its completion, tolerance lines, culprit markers), the call tree with every row, and
filters (failing only, by category). ``build`` also returns each section's rows as a TSV.
Frameworks are labelled by their configured names: given ones, else the capture directory's
framework (``.../capture/NAME/seed_S/step_T``), else the name in the metadata.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from typing import Any

from nestalign import report_rows as rr
from nestalign import report_svg as svg
from nestalign import summary
from nestalign.compare import CATEGORIES
from nestalign.compare.tolerances import _tol, grads_scaled

FLOAT32_DEFAULT = {"atol": 1e-5, "rtol": 1.3e-6}  # torch.testing.assert_close's float32 values
MODULES_PLOTTED = 10
_NAME_KEYS = ("reference", "candidate", "ref_dir", "cand_dir")
_RUN_DIR = re.compile(r"(?:^|/)capture/([^/]+)/seed_[^/]+/step_[^/]+/?$")
COLORS = {
    "layers": "#1f77b4",
    "layer_grads": "#ff7f0e",
    "forward": "#d62728",
    "backward": "#9467bd",
}
CAT_LABELS = {"layers": "layers (outputs)", "layer_grads": "layer_grads (gradients)"}

CSS = """
[hidden] { display: none !important; }
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1800px; }
h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
.wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 5px; text-align: right; vertical-align: top; }
td.text, th.text { text-align: left; overflow-wrap: anywhere; min-width: 8em; max-width: 28em; }
td.failing { min-width: 18em; max-width: 40em; }
th { background: #eee; }
.PASS { background: #d6f5d6; } .FAIL { background: #f8d0d0; }
.ERROR { background: #f5e0a0; } .NONFINITE { background: #e0d8f5; }
svg.chart { max-width: 100%; height: auto; border: 1px solid #ddd; margin: 0.4em 0; }
svg .grid { stroke: #eee; } svg .tick { font-size: 10px; fill: #555; }
svg .axis { font-size: 11px; fill: #333; } svg .ctitle { font-size: 13px; font-weight: bold; }
svg circle.pt:hover { r: 6; }
section.step { border-top: 3px solid #999; margin-top: 2em; padding-top: 0.3em; }
section.step:target { border-top-color: #d62728; }
.filters { margin: 0.5em 0; font-size: 13px; }
.rows { font-size: 12px; min-width: 1100px; }
.line { display: grid; grid-template-columns: 3.5em 7.5em minmax(14em, 3fr) minmax(7em, 1.2fr) 4.5em
  minmax(8em, 1.3fr) 7em 6.8em 6.8em 6.8em 4.5em minmax(10em, 2.5fr) minmax(8em, 1.2fr);
  border-bottom: 1px solid #eee; }
.line > span { padding: 2px 4px; overflow-wrap: anywhere; word-break: break-word; }
.line.head { font-weight: bold; background: #eee; position: sticky; top: 0; }
.line.fail { background: #fbe3e3; } .line.marked { background: #f6b8b8; font-weight: bold; }
.line.ctx { opacity: 0.55; }
.group-head { font-weight: bold; padding: 4px; background: #f4f4f4; border-bottom: 1px solid #ddd; }
details.group > summary .group-head::before { content: "\\25B8 "; color: #888; }
details.group[open] > summary .group-head::before { content: "\\25BE "; }
.c-max_abs, .c-max_rel, .c-cosine, .c-order { text-align: right; }
details.node > summary { list-style: none; cursor: pointer; }
details.node > summary::-webkit-details-marker { display: none; }
details.node > summary .c-name::before { content: "\\25B8 "; color: #888; }
details.node[open] > summary .c-name::before { content: "\\25BE "; }
"""

JS = """
function applyFilters(sec) {
  const failing = sec.querySelector('.f-fail').checked;
  const cat = sec.querySelector('.f-cat').value;
  sec.querySelectorAll('.line[data-cat]').forEach(function (l) {
    l.classList.remove('ctx');
    l.hidden = !((cat === '' || l.dataset.cat === cat)
      && (!failing || l.dataset.fail === '1' || l.dataset.mark === '1'));
  });
  Array.from(sec.querySelectorAll('.node')).reverse().forEach(function (n) {
    const own = n.querySelectorAll(
      ':scope > .line:not([hidden]), :scope > summary > .line:not([hidden])');
    const kids = n.querySelectorAll(':scope > .kids > .node:not([hidden])').length;
    n.hidden = !(own.length || kids);
    if (kids && !own.length) {
      const first = n.querySelector(':scope > summary > .line');
      if (first) { first.hidden = false; first.classList.add('ctx'); }
    }
    if (kids && (failing || cat) && n.tagName === 'DETAILS') n.open = true;
  });
}
document.addEventListener('DOMContentLoaded', function () {
  const params = new URLSearchParams(location.search);
  document.querySelectorAll('section.step').forEach(function (sec) {
    if (params.get('failing') === '1') sec.querySelector('.f-fail').checked = true;
    const cat = sec.querySelector('.f-cat');
    if (params.has('category')) cat.value = params.get('category');
    sec.querySelectorAll('.f-fail, .f-cat').forEach(function (el) {
      el.addEventListener('change', function () { applyFilters(sec); });
    });
    applyFilters(sec);
  });
  document.body.dataset.ready = '1';
});
"""


@dataclass
class Entry:
    """One compared step: its result, configured labels, summary row and section id."""

    result: dict[str, Any]
    pair: tuple[str, str]
    row: dict[str, Any]
    anchor: str = ""


@dataclass
class Report:
    html: str
    rows: dict[str, str]  # section id -> TSV of its rows


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(value))


def labels(
    result: dict[str, Any], reference: str | None = None, candidate: str | None = None
) -> tuple[str, str]:
    """(reference, candidate) names: given, else the capture directory's, else the metadata's."""
    out = []
    for side, given, key in (
        ("reference", reference, "ref_dir"),
        ("candidate", candidate, "cand_dir"),
    ):
        found = _RUN_DIR.search(str(result.get(key) or "").replace("\\", "/"))
        out.append(given or (found.group(1) if found else None) or result.get(side) or side)
    return out[0], out[1]


def entries(
    results: list[dict[str, Any]],
    reference: str | None = None,
    candidate: str | None = None,
    own: list[dict[str, Any]] | None = None,
) -> list[Entry]:
    """Summary rows per (reference, candidate) pair, so drift only compares steps of one pair.
    A result that names no framework (an unreadable pickle) joins the pair when there is one.
    ``own``: the state-isolated comparisons (summary.rows)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    unnamed = []
    for r in results:
        named = reference or candidate or any(r.get(k) for k in _NAME_KEYS)
        if named:
            groups.setdefault(labels(r, reference, candidate), []).append(r)
        else:
            unnamed.append(r)
    if unnamed:
        pair = next(iter(groups)) if len(groups) == 1 else ("?", "?")
        groups.setdefault(pair, []).extend(unnamed)
    out = []
    for pair, group in groups.items():
        ordered = sorted(group, key=summary._key)
        for r, row in zip(ordered, summary.rows(group, own), strict=True):
            row["reference"], row["candidate"] = pair
            out.append(Entry(r, pair, row))
    out.sort(key=lambda e: (summary._key(e.result), e.pair))
    seen: dict[str, int] = {}
    for e in out:
        base = f"seed_{_slug(e.row['seed'])}_step_{_slug(e.row['step'])}"
        if len(groups) > 1:
            base += f"_{_slug(e.pair[0])}_vs_{_slug(e.pair[1])}"
        seen[base] = seen.get(base, 0) + 1
        e.anchor = base if seen[base] == 1 else f"{base}_{seen[base]}"
    return out


def _summary_table(items: list[Entry]) -> str:
    """The summary rows, each linked to its step's section, with the pair's configured names."""
    columns = [(k, t) for k, t in summary.MD_COLUMNS if k not in ("seed", "step")]
    head = ["step (section)", "reference vs candidate"] + [t for _, t in columns]
    body = []
    for e in items:
        row = e.row
        meta = f"metadata: {e.result.get('reference')} vs {e.result.get('candidate')}"
        label = f"seed {_esc(row['seed'])} step {_esc(row['step'])}"
        linked = row.get("evidence", "full") == "full"  # a fingerprint row has no section
        cells = [
            f'<td class="text"><a href="#{_esc(e.anchor)}">{label}</a></td>'
            if linked
            else f'<td class="text">{label}</td>',
            f'<td class="text pair" title="{_esc(meta)}">{_esc(e.pair[0])} vs '
            f"{_esc(e.pair[1])}</td>",
        ]
        for key, _ in columns:
            value = summary.md_cell(row, key) or "-"
            cls = {"verdict": value, "own_verdict": value, "failing": "text failing"}.get(key, "")
            cls = "text" if key.startswith("first_") else cls
            cells.append(
                f'<td class="{cls}">{_esc(value)}</td>' if cls else f"<td>{_esc(value)}</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    head_html = "".join(f"<th>{_esc(t)}</th>" for t in head)
    return (
        f'<div class="wrap"><table id="summary"><tr>{head_html}</tr>\n'
        + "\n".join(body)
        + "</table></div>"
    )


def _tolerance(tols: dict[str, Any], cat: str, key: str) -> tuple[float, str]:
    atol, rtol = _tol(tols, cat)
    value = atol if key == "atol" else rtol
    if value is None:
        return FLOAT32_DEFAULT[key], f"{key} {cat} (float32 default {FLOAT32_DEFAULT[key]:g})"
    return float(value), f"{key} {cat} {value:g}"


def execution_charts(result: dict[str, Any], calls: dict[str, rr.Call]) -> str:
    """Max rel and max abs of every call's outputs and gradients at its completion index."""
    tols = result.get("tolerances") or {}
    placed = sorted((c for c in calls.values() if c.order is not None), key=lambda c: c.order)
    charts = []
    for metric in ("max_rel", "max_abs"):
        series, hlines = [], []
        for cat in rr.CALL_CATEGORIES:
            points = [
                svg.Point(
                    c.order,
                    c.rows[cat].get(metric),
                    f"{c.key} ({c.row.get('type')}), {CAT_LABELS[cat]}: {metric.replace('_', ' ')} "
                    f"{summary._fmt(c.rows[cat].get(metric))}, {c.rows[cat].get('status')}",
                    c.key,
                )
                for c in placed
                if cat in c.rows
            ]
            if not points:
                continue
            series.append(
                svg.Series(
                    CAT_LABELS[cat], points, COLORS[cat], "" if cat == "layers" else "5 3", cat
                )
            )
            if metric == "max_abs" and cat == "layer_grads" and grads_scaled(tols):
                continue  # each gradient's atol scales with its size: no single line
            value, label = _tolerance(tols, cat, "rtol" if metric == "max_rel" else "atol")
            same = [h for h in hlines if h.at == value]
            if same:  # one line for equal tolerances
                same[0].label = label.replace(f" {cat}", f" {same[0].kind}, {cat}", 1)
                same[0].kind += f" {cat}"
            else:
                hlines.append(svg.Line(value, label, COLORS[cat], cat))
        if not series:
            return ""
        vlines = _markers(result, calls)
        note = (
            ", gradient atol scales with each tensor"
            if metric == "max_abs" and grads_scaled(tols)
            else ""
        )
        charts.append(
            svg.render(
                svg.Chart(
                    f"seed {result.get('seed')} step {result.get('step')}: "
                    f"{metric.replace('_', ' ')} "
                    f"of every module call{note}",
                    "module call, at its completion (reference execution order; "
                    "a parent after its children)",
                    f"{metric.replace('_', ' ')} (log; 0 on the bottom line)",
                    series,
                    hlines=hlines,
                    vlines=vlines,
                    integer_x=True,
                )
            )
        )
    return "\n".join(charts)


def _markers(result: dict[str, Any], calls: dict[str, rr.Call]) -> list[svg.Line]:
    """Culprit and divergence markers, each at the call its ``where`` names."""
    out = []
    for direction in ("forward", "backward"):
        first = ((result.get("divergence") or {}).get(direction) or {}).get("first")
        key = first and rr.locate(first, calls)
        if key and calls[key].order is not None:
            label = f"first {direction} culprit: {first['where']}"
            out.append(
                svg.Line(calls[key].order, label, COLORS[direction], f"first {direction}", key)
            )
    for e in result.get("divergences") or []:
        key = rr.locate(e, calls)
        if key and calls[key].order is not None:
            label = f"divergence ({e.get('class')}, {e.get('direction')}): {e.get('where')}"
            out.append(svg.Line(calls[key].order, label, "#555", "divergence", key))
    return out


def _pair_charts(pair: tuple[str, str], items: list[Entry]) -> str:
    """Losses, worst max rel per category and per failing module, over steps, per seed."""
    ref, cand = pair
    seeds: dict[Any, list[Entry]] = {}
    for e in items:
        seeds.setdefault(e.row["seed"], []).append(e)
    losses = []
    for i, (seed, rows) in enumerate(seeds.items()):
        color = svg.PALETTE[i % len(svg.PALETTE)]
        for side, key, dash in ((ref, "loss_ref", ""), (cand, "loss_cand", "5 3")):
            points = [_step_point(e, e.row[key], f"{side} seed {seed}") for e in rows]
            losses.append(svg.Series(f"{side} seed {seed}", points, color, dash, side))
    out = [
        svg.render(
            svg.Chart(
                f"loss over steps: {ref} vs {cand}",
                "step",
                "loss",
                losses,
                log=False,
                integer_x=True,
            )
        )
    ]
    cats = [c for c in CATEGORIES[1:] if any(c in e.result.get("categories", {}) for e in items)]
    for seed, rows in seeds.items():
        series = [
            svg.Series(
                cat,
                [_step_point(e, e.row.get(f"{cat}_max_rel"), f"{cat}, seed {seed}") for e in rows],
                svg.PALETTE[j % len(svg.PALETTE)],
                kind=cat,
            )
            for j, cat in enumerate(cats)
        ]
        series += [
            svg.Series(
                f"{cat} (own)",
                [
                    _step_point(e, e.row.get(f"own_{cat}_max_rel"), f"{cat} own, seed {seed}")
                    for e in rows
                ],
                svg.PALETTE[cats.index(cat) % len(svg.PALETTE)],
                "5 3",
                kind=cat,
            )
            for cat in summary.DRIFT_CATEGORIES
            if cat in cats and any(e.row.get("own_verdict") for e in rows)
        ]
        out.append(
            svg.render(
                svg.Chart(
                    f"drift, seed {seed}: worst max rel per category ({ref} vs {cand}; "
                    "dashed: each step's own error, started from the reference's state)"
                    if any(e.row.get("own_verdict") for e in rows)
                    else f"drift, seed {seed}: worst max rel per category ({ref} vs {cand})",
                    "step",
                    "worst max rel (log; 0 on the bottom line)",
                    series,
                    integer_x=True,
                )
            )
        )
        module = _module_drift(seed, rows, pair)
        if module:
            out.append(module)
    return "\n".join(out)


def _step_point(e: Entry, value: Any, what: str) -> svg.Point:
    y = value if isinstance(value, (int, float)) else None
    return svg.Point(
        e.row["step"], y, f"{what}, step {e.row['step']}: {summary._fmt(value)}", e.anchor
    )


def _module_drift(seed: Any, rows: list[Entry], pair: tuple[str, str]) -> str:
    """Max rel of each module call's outputs over steps, for the calls that fail in some step."""
    failing: dict[str, tuple[int, int]] = {}
    per_step: list[tuple[Entry, dict[str, dict[str, Any]]]] = []
    for i, e in enumerate(rows):
        calls = {
            r["name"]: r
            for r in ((e.result.get("categories") or {}).get("layers") or {}).get("rows", [])
        }
        per_step.append((e, calls))
        for name, r in calls.items():
            if r.get("status") in rr.FAILING and name not in failing:
                failing[name] = (i, r.get("end") if isinstance(r.get("end"), int) else math.inf)
    if not failing:
        return ""
    names = sorted(failing, key=failing.__getitem__)
    series = [
        svg.Series(
            name,
            [
                svg.Point(
                    e.row["step"],
                    calls[name].get("max_rel"),
                    f"{name} ({calls[name].get('type')}), step {e.row['step']}: max rel "
                    f"{summary._fmt(calls[name].get('max_rel'))}",
                    name,
                )
                for e, calls in per_step
                if name in calls
            ],
            svg.PALETTE[j % len(svg.PALETTE)],
            kind="layers",
        )
        for j, name in enumerate(names[:MODULES_PLOTTED])
    ]
    more = f", the first {MODULES_PLOTTED} of {len(names)}" if len(names) > MODULES_PLOTTED else ""
    return svg.render(
        svg.Chart(
            f"drift per failing module call, seed {seed} ({pair[0]} vs {pair[1]}{more})",
            "step",
            "outputs max rel (log; 0 on the bottom line)",
            series,
            integer_x=True,
        )
    )


def _line(line: rr.Line) -> str:
    cls = "line" + (" fail" if line.failing else "") + (" marked" if line.marked else "")
    cells = []
    for col in rr.COLUMNS:
        value = line.cells[col]
        pad = f' style="padding-left:{4 + 14 * line.depth}px"' if col == "name" else ""
        cells.append(f'<span class="c-{col}"{pad}>{_esc(value)}</span>')
    return (
        f'<div class="{cls}" data-cat="{_esc(line.cells["category"])}" '
        f'data-fail="{int(line.failing)}" data-mark="{int(line.marked)}" '
        f'data-name="{_esc(line.cells["name"])}">' + "".join(cells) + "</div>"
    )


def _node(call: rr.Call, per_call: dict, opened: set[str]) -> str:
    lines = "".join(_line(line) for line in per_call.get(call, []))
    if not call.children:
        return f'<div class="node leaf">{lines}</div>'
    kids = "".join(_node(c, per_call, opened) for c in call.children)
    attr = " open" if call.key in opened else ""
    return (
        f'<details class="node"{attr}><summary>{lines}</summary>'
        f'<div class="kids">{kids}</div></details>'
    )


def _flat_groups(flat: list[rr.Line]) -> str:
    """One folded group per flat category (open when it holds a marked row), structure last."""
    groups: dict[str, list[rr.Line]] = {}
    for line in flat:
        groups.setdefault(line.cells["category"], []).append(line)
    out = []
    for cat in sorted(groups, key=lambda c: c == "structure"):
        lines = groups[cat]
        failing = sum(line.failing for line in lines)
        attr = " open" if any(line.marked for line in lines) else ""
        kids = "".join(f'<div class="node leaf">{_line(x)}</div>' for x in lines)
        out.append(
            f'<details class="node group"{attr}><summary><div class="group-head">{_esc(cat)}: '
            f"{len(lines)} rows, {failing} failing</div></summary>"
            f'<div class="kids">{kids}</div></details>'
        )
    return "".join(out)


def _opened(roots: list[rr.Call], per_call: dict) -> set[str]:
    """Calls shown unfolded: the roots and every ancestor of a marked call."""
    out = {r.key for r in roots}
    for call, lines in per_call.items():
        if any(line.marked for line in lines):
            p = call.parent
            while p is not None:
                out.add(p.key)
                p = p.parent
    return out


def _step_section(e: Entry, rows_href: str) -> tuple[str, str]:
    """The section of one step and its rows as a TSV."""
    r = e.result
    verdict = e.row["verdict"]
    parts = [
        f'<section class="step" id="{_esc(e.anchor)}">',
        f"<h3>seed {_esc(e.row['seed'])} step {_esc(e.row['step'])}: {_esc(e.pair[0])} vs "
        f'{_esc(e.pair[1])}: <span class="{_esc(verdict)}">{_esc(verdict)}</span></h3>',
        f'<p class="pair">reference <b class="ref-label">{_esc(e.pair[0])}</b> '
        f'({_esc(r.get("ref_dir") or "-")}), candidate <b class="cand-label">{_esc(e.pair[1])}</b> '
        f"({_esc(r.get('cand_dir') or '-')}); "
        f"{_esc(_tolerance_text(r.get('tolerances') or {}))}</p>",
    ]
    if (r.get("divergence") or {}).get("forced"):
        parts.append(
            "<p><b>Teacher-forced</b>: each call's numbers are its own error "
            "(it ran on the reference's inputs).</p>"
        )
    items = []
    for direction in ("forward", "backward"):
        first = ((r.get("divergence") or {}).get(direction) or {}).get("first")
        if first:
            items.append(
                f'<li class="culprit {direction}">first {direction} culprit: '
                f"{_esc(first['where'])}</li>"
            )
    items += [f"<li>error: {_esc(x)}</li>" for x in e.row["errors"]]
    if items:
        parts.append("<ul>" + "".join(items) + "</ul>")
    parts.append(_divergences(r))
    roots, per_call, flat = rr.step_lines(r)
    calls = {c.key: c for c in per_call}
    parts.append(execution_charts(r, calls))
    cats = [c for c in (r.get("categories") or {}) if (r["categories"][c] or {}).get("rows")]
    options = '<option value="">all categories</option>' + "".join(
        f'<option value="{_esc(c)}">{_esc(CAT_LABELS.get(c, c))}</option>' for c in cats
    )
    parts.append(
        f'<div class="filters"><label><input type="checkbox" class="f-fail"> failing only</label> '
        f'<label>category <select class="f-cat">{options}</select></label> '
        f'<a href="{_esc(rows_href)}/{_esc(e.anchor)}.tsv">rows as TSV</a></div>'
    )
    head = "".join(f'<span class="c-{c}">{_esc(c)}</span>' for c in rr.COLUMNS)
    opened = _opened(roots, per_call)
    tree = "".join(_node(c, per_call, opened) for c in roots)
    parts.append(
        f'<div class="wrap"><div class="rows"><div class="line head">{head}</div>{tree}'
        + _flat_groups(flat)
        + "</div></div></section>"
    )
    return "\n".join(parts), rr.tsv(rr.ordered(roots, per_call, flat))


def _tolerance_text(tols: dict[str, Any]) -> str:
    if not tols:
        return "tolerances: -"
    text = (
        f"tolerances: atol {summary._fmt(tols.get('atol'))}, rtol {summary._fmt(tols.get('rtol'))}"
    )
    for cat, t in (tols.get("categories") or {}).items():
        text += f"; {cat} atol {summary._fmt(t.get('atol'))} rtol {summary._fmt(t.get('rtol'))}"
    return text + ("" if tols.get("atol") is not None else " (none: per-dtype defaults)")


def _divergences(result: dict[str, Any]) -> str:
    """Every localised divergence of a step, in execution order, with class and size."""
    rows = []
    for e in result.get("divergences") or []:
        direction = e["direction"] + (" and backward" if e.get("also") == "backward" else "")
        rows.append(
            f'<tr><td class="text">{_esc(e["where"])}</td><td class="text">{_esc(e["class"])}</td>'
            f'<td class="text">{_esc(direction)}</td>'
            f"<td>{_esc(summary._fmt(e.get('max_abs')))}</td>"
            f"<td>{_esc(summary._fmt(e.get('max_rel')))}</td></tr>"
        )
    if not rows:
        return ""
    return (
        '<div class="wrap"><table class="divergences"><tr><th class="text">divergence (where)</th>'
        '<th class="text">class</th><th class="text">direction</th>'
        "<th>max abs</th><th>max rel</th></tr>" + "".join(rows) + "</table></div>"
    )


def build(
    results: list[dict[str, Any]],
    reference: str | None = None,
    candidate: str | None = None,
    rows_href: str = "report/rows",
    own: list[dict[str, Any]] | None = None,
) -> Report:
    """The whole report as one HTML string, and each step's rows as a TSV (by section id);
    ``rows_href`` is the TSVs' folder relative to the HTML file, for the links; ``own``: the
    state-isolated comparisons, plotted beside the free-running error."""
    items = entries(results, reference, candidate, own)
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>nest-align report</title>',
        f"<style>{CSS}</style><script>{JS}</script></head><body>",
        "<h1>nest-align report</h1>",
        "<h2>Summary</h2>",
        _summary_table(items),
    ]
    pairs: dict[tuple[str, str], list[Entry]] = {}
    full = [e for e in items if e.result.get("evidence", "full") == "full"]  # not fingerprints
    for e in full:
        pairs.setdefault(e.pair, []).append(e)
    parts.append("<h2>Loss and drift over steps</h2>")
    for pair, group in pairs.items():
        parts.append(_pair_charts(pair, sorted(group, key=lambda e: summary._key(e.result))))
    parts.append("<h2>Steps</h2>")
    tables = {}
    for e in full:
        section, tables[e.anchor] = _step_section(e, rows_href)
        parts.append(section)
    parts.append("</body></html>")
    return Report("\n".join(parts) + "\n", tables)
