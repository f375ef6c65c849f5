"""Inline SVG line charts for the report: points with hover titles, tolerance and marker lines.

No plotting library: each chart is a string of SVG elements. Points carry ``data-call`` (the
call or item they stand for) and markers ``data-call`` too, so a test can check that a marker
sits at the x of the call its label names.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

WIDTH, HEIGHT = 1000, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 62, 40
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass
class Point:
    x: float
    y: float | None  # None or NaN: not drawn; 0 on a log axis: drawn on the "0" line
    title: str
    key: str = ""


@dataclass
class Series:
    label: str
    points: list[Point]
    color: str = PALETTE[0]
    dash: str = ""
    kind: str = ""  # data-cat of its points


@dataclass
class Line:
    """A horizontal (tolerance) or vertical (marker) line."""

    at: float
    label: str
    color: str
    kind: str = ""
    key: str = ""


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    log: bool = True
    hlines: list[Line] = field(default_factory=list)
    vlines: list[Line] = field(default_factory=list)
    integer_x: bool = False


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _finite(v: float | None) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


class _Scale:
    """Data to pixel coordinates; a log y axis keeps a decade below the data for zeros."""

    def __init__(self, chart: Chart):
        xs = [p.x for s in chart.series for p in s.points] + [v.at for v in chart.vlines]
        self.x0, self.x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        ys = [p.y for s in chart.series for p in s.points if _finite(p.y)]
        ys += [h.at for h in chart.hlines if _finite(h.at)]
        self.log = chart.log
        if self.log:
            pos = [y for y in ys if y > 0]
            lo = math.floor(math.log10(min(pos))) if pos else -8
            hi = math.ceil(math.log10(max(pos))) if pos else 0
            self.zero = lo - 1  # zeros are drawn a decade below the smallest value
            self.y0, self.y1 = float(self.zero), float(max(hi, lo + 1))
        else:
            lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
            pad = (hi - lo) * 0.05 or 1.0
            self.y0, self.y1 = lo - pad, hi + pad

    def px(self, x: float) -> float:
        return round(LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT), 2)

    def py(self, y: float) -> float:
        if self.log:
            y = self.zero if y <= 0 else math.log10(y) if math.isfinite(y) else self.y1
            y = min(max(y, self.y0), self.y1)
        return round(
            HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM), 2
        )

    def y_ticks(self) -> list[tuple[float, str]]:
        if self.log:
            step = max(1, math.ceil((self.y1 - self.y0) / 8))
            ticks = [(0.0, "0")]
            e = self.zero + step
            while e <= self.y1:
                ticks.append((10.0**e, f"1e{e}"))
                e += step
            return ticks
        step = (self.y1 - self.y0) / 5
        digits = max(0, 1 - math.floor(math.log10(step)))
        return [(self.y0 + step * i, f"{self.y0 + step * i:.{digits}f}") for i in range(6)]

    def x_ticks(self, integer: bool) -> list[float]:
        span = self.x1 - self.x0
        step = 10 ** math.floor(math.log10(span / 4)) if span > 0 else 1
        for m in (1, 2, 5, 10):
            if span / (step * m) <= 10:
                step *= m
                break
        step = max(step, 1) if integer else step
        start = math.ceil(self.x0 / step) * step
        return [start + i * step for i in range(int((self.x1 - start) / step) + 1)]


def render(chart: Chart) -> str:
    """The chart as one ``<svg>`` element."""
    s = _Scale(chart)
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img"><title>{_esc(chart.title)}</title>',
        f'<text x="{LEFT}" y="16" class="ctitle">{_esc(chart.title)}</text>',
    ]
    plot_bottom, plot_top = HEIGHT - BOTTOM, TOP
    for y, label in s.y_ticks():
        yy = s.py(y)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{yy}" y2="{yy}"/>')
        out.append(
            f'<text class="tick" x="{LEFT - 4}" y="{yy + 3}" text-anchor="end">{label}</text>'
        )
    for x in s.x_ticks(chart.integer_x):
        xx = s.px(x)
        out.append(f'<line class="grid" x1="{xx}" x2="{xx}" y1="{plot_top}" y2="{plot_bottom}"/>')
        label = f"{x:.0f}" if chart.integer_x or float(x).is_integer() else f"{x:.3g}"
        out.append(
            f'<text class="tick" x="{xx}" y="{plot_bottom + 13}" '
            f'text-anchor="middle">{label}</text>'
        )
    out.append(
        f'<text class="axis" x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{_esc(chart.x_label)}</text>'
        f'<text class="axis" transform="translate(14 {(plot_top + plot_bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{_esc(chart.y_label)}</text>'
    )
    for h in chart.hlines:
        if not _finite(h.at):
            continue
        yy = s.py(h.at)
        out.append(
            f'<line class="tol {_esc(h.kind)}" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
            f'y1="{yy}" y2="{yy}" '
            f'stroke="{h.color}" stroke-dasharray="6 3"><title>{_esc(h.label)}</title></line>'
            f'<text class="tick" x="{WIDTH - RIGHT - 2}" y="{yy - 3}" text-anchor="end" '
            f'fill="{h.color}">{_esc(h.label)}</text>'
        )
    for v in chart.vlines:
        xx = s.px(v.at)
        out.append(
            f'<line class="marker {_esc(v.kind)}" data-call="{_esc(v.key)}" x1="{xx}" x2="{xx}" '
            f'y1="{plot_top}" y2="{plot_bottom}" stroke="{v.color}" stroke-width="2" '
            f'stroke-dasharray="2 2"><title>{_esc(v.label)}</title></line>'
        )
    for series in chart.series:
        drawn = [p for p in series.points if isinstance(p.y, (int, float)) and not math.isnan(p.y)]
        if len(drawn) > 1:
            pts = " ".join(f"{s.px(p.x)},{s.py(p.y)}" for p in drawn)
            dash = f' stroke-dasharray="{series.dash}"' if series.dash else ""
            out.append(
                f'<polyline fill="none" stroke="{series.color}" stroke-width="1.2"{dash} '
                f'points="{pts}"/>'
            )
        for p in drawn:
            out.append(
                f'<circle class="pt" data-cat="{_esc(series.kind)}" data-call="{_esc(p.key)}" '
                f'cx="{s.px(p.x)}" cy="{s.py(p.y)}" r="3" fill="{series.color}">'
                f"<title>{_esc(p.title)}</title></circle>"
            )
    out += _legend(chart)
    out.append("</svg>")
    return "".join(out)


def _legend(chart: Chart) -> list[str]:
    """Legend entries above the plot area, in up to two rows (the rest is in the hover titles)."""
    items = [(x.label, x.color, x.dash) for x in chart.series]
    items += [(v.label, v.color, "2 2") for v in chart.vlines if v.kind.startswith("first")]
    out, x, y = [], LEFT, 30
    for label, color, dash in items:
        text = label if len(label) <= 60 else label[:57] + "..."
        width = 36 + 6.2 * len(text)
        if x + width > WIDTH:
            if y > 30:
                break
            x, y = LEFT, y + 16
        d = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{x}" x2="{x + 20}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"{d}/>'
            f'<text class="tick" x="{x + 24}" y="{y + 3}">{_esc(text)}</text>'
        )
        x += width
    return out
