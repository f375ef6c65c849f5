"""Self-contained HTML report: the summary table and plots inlined as base64 PNGs (no network).

Plots: both frameworks' losses over steps, the worst relative error of loss/grads/weights over
steps, and for each (seed, step) the relative error of every module call along the reference's
execution order (outputs and gradients) with the first culprits marked.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nestalign import summary  # noqa: E402

FLOOR = 1e-16  # zero errors are drawn here on the log axis

CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #eee; }
td.PASS { background: #d6f5d6; } td.FAIL { background: #f8d0d0; } td.ERROR { background: #f5e0a0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _clip(v: Any) -> float:
    return max(float(v), FLOOR) if isinstance(v, (int, float)) and not math.isnan(v) else math.nan


def execution_plot(result: dict[str, Any]) -> str:
    """Relative error of each call's outputs and output gradients along the execution order."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    cats = result["categories"]
    for cat, label, style in (("layers", "outputs", "-"), ("layer_grads", "gradients", "--")):
        rows = [r for r in (cats.get(cat) or {}).get("rows", []) if r.get("start") is not None]
        rows.sort(key=lambda r: r["start"])
        ax.plot(
            [r["start"] for r in rows],
            [_clip(r.get("max_rel")) for r in rows],
            style,
            marker=".",
            label=f"{label} max rel",
        )
    starts = {r["name"]: r.get("start") for r in (cats.get("layers") or {}).get("rows", [])}
    for direction, color in (("forward", "red"), ("backward", "purple")):
        first = result["divergence"][direction]["first"]
        if first and starts.get(first["name"]) is not None:
            x = starts[first["name"]]
            label = f"first {direction}: {first['where'][:70]}"
            ax.axvline(x, color=color, linestyle=":", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("module call (reference execution order)")
    ax.set_ylabel("max relative error (0 at 1e-16)")
    ax.set_title(f"seed {result.get('seed')} step {result.get('step')}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=8)
    fig.tight_layout()
    return _png(fig)


def steps_plots(table: list[dict[str, Any]]) -> tuple[str, str]:
    """(losses of both frameworks over steps, worst relative errors over steps) per seed."""
    seeds: dict[Any, list[dict[str, Any]]] = {}
    for row in table:
        seeds.setdefault(row["seed"], []).append(row)
    fig1, ax1 = plt.subplots(figsize=(7, 3.2))
    fig2, ax2 = plt.subplots(figsize=(7, 3.2))
    for seed, rows in seeds.items():
        steps = [r["step"] for r in rows]
        ref = rows[0]["reference"] or "reference"
        cand = rows[0]["candidate"] or "candidate"
        ax1.plot(steps, [_nan(r["loss_ref"]) for r in rows], "-o", label=f"{ref} seed {seed}")
        ax1.plot(steps, [_nan(r["loss_cand"]) for r in rows], "--x", label=f"{cand} seed {seed}")
        for cat in summary.DRIFT_CATEGORIES:
            ax2.plot(
                steps, [_clip(r[f"{cat}_max_rel"]) for r in rows], "-o", label=f"{cat} seed {seed}"
            )
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("worst max relative error (0 at 1e-16)")
    ax2.legend(fontsize=8)
    for fig, ax in ((fig1, ax1), (fig2, ax2)):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
    return _png(fig1), _png(fig2)


def _nan(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _table(table: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in summary.MD_COLUMNS)
    body = []
    for row in table:
        cells = []
        for key, _ in summary.MD_COLUMNS:
            if key == "drift":
                value = "/".join(summary._fmt(row[f"drift_{c}"]) for c in summary.DRIFT_CATEGORIES)
            else:
                value = summary._fmt(row[key]) or "-"
            cls = f' class="{value}"' if key == "verdict" else ""
            cells.append(f"<td{cls}>{html.escape(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="summary"><tr>{head}</tr>\n' + "\n".join(body) + "</table>"


def _divergences(result: dict[str, Any]) -> str:
    """Every localised divergence of a step, in execution order, with class and size."""
    entries = result.get("divergences") or []
    if not entries:
        return ""
    forced = (
        " (teacher-forced: each is that place's own error)"
        if (result.get("divergence") or {}).get("forced")
        else ""
    )
    rows = []
    for e in entries:
        direction = e["direction"] + (" and backward" if e.get("also") == "backward" else "")
        size = summary._fmt(e.get("max_abs"))
        rows.append(
            f"<tr><td>{html.escape(e['where'])}</td><td>{html.escape(e['class'])}</td>"
            f"<td>{html.escape(direction)}</td><td>{html.escape(size)}</td></tr>"
        )
    return (
        f'<p>Divergences{forced}:</p><table class="divergences"><tr><th>where</th>'
        "<th>class</th><th>direction</th><th>max abs</th></tr>" + "".join(rows) + "</table>"
    )


def render(results: list[dict[str, Any]]) -> str:
    """The whole report as one HTML string."""
    results = sorted(results, key=summary._key)
    table = summary.rows(results)
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>nest-align report</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>nest-align report</h1>",
        "<h2>Summary</h2>",
        _table(table),
    ]
    errors = [(r, e) for r in table for e in r["errors"]]
    if errors:
        parts.append("<h3>Errors</h3><ul>")
        parts += [
            f"<li>seed {html.escape(str(r['seed']))} step {html.escape(str(r['step']))}: "
            f"{html.escape(e)}</li>"
            for r, e in errors
        ]
        parts.append("</ul>")
    losses, drift = steps_plots(table)
    parts += ["<h2>Loss</h2>", _img(losses, "losses of both frameworks over steps")]
    parts += ["<h2>Error over steps</h2>", _img(drift, "worst relative error over steps")]
    parts.append("<h2>Error along the execution order</h2>")
    for r in results:
        parts.append(
            f"<h3>seed {html.escape(str(r.get('seed')))} step "
            f"{html.escape(str(r.get('step')))}: {html.escape(r['verdict'].upper())}</h3>"
        )
        if r["categories"].get("layers"):
            parts.append(
                _img(
                    execution_plot(r),
                    f"error along execution, seed {r.get('seed')} step {r.get('step')}",
                )
            )
        items = []
        for direction in ("forward", "backward"):
            first = r["divergence"][direction]["first"]
            if first:
                items.append(f"<li>first {direction} culprit: {html.escape(first['where'])}</li>")
        if items:
            parts.append("<ul>" + "".join(items) + "</ul>")
        parts.append(_divergences(r))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
