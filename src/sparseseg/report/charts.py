"""Small inline SVG charts: learning curves and horizontal bars. No script, no external file.

Colours are given exactly (`#rrggbb`), so a screenshot of the page can be checked for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

# matplotlib's tab10, the colours of compare's curves.png
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf")


@dataclass
class Series:
    """One line: y values (None = no value) at x values, with an optional ±band."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    colour: str
    band: Sequence[float | None] | None = None  # half-width at each x (a std), or None
    dashed: bool = False


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    width: int = 560
    height: int = 300


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    first = math.floor(low / step) * step
    ticks, t = [], first
    while not ticks or ticks[-1] < high - 1e-9 * step:  # the last tick at or above `high`
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.3g}"


def line_chart(chart: Chart) -> str:
    """The chart as an <svg> element: axes with ticks, one polyline (and band) per series, a legend."""
    values = [y for s in chart.series for y in s.ys if y is not None and not math.isnan(y)]
    bands = [y + sign * b for s in chart.series if s.band for y, b in zip(s.ys, s.band, strict=True)
             if y is not None and b is not None and not math.isnan(y) for sign in (1, -1)]
    xs = [x for s in chart.series for x in s.xs]
    left, right, top, bottom = 56, 16, 28, 44
    legend_h = 16 * len(chart.series)
    w, h = chart.width, chart.height + legend_h
    plot_w, plot_h = w - left - right, chart.height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(chart.title)}">',
           f'<rect width="{w}" height="{h}" fill="#ffffff"/>',
           f'<text x="{w / 2}" y="17" text-anchor="middle" class="chart-title">{escape(chart.title)}</text>']
    if not values or not xs:
        out.append(f'<text x="{w / 2}" y="{chart.height / 2}" text-anchor="middle">no values yet</text></svg>')
        return "".join(out)
    y_ticks = _ticks(min(values + bands + [0.0]), max(values + bands))
    x_low, x_high = min(xs), max(xs)
    x_high = x_high if x_high > x_low else x_low + 1
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    for t in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    x_ticks = sorted(set(xs)) if len(set(xs)) <= 12 else _ticks(x_low, x_high)
    for t in x_ticks:
        if x_low <= t <= x_high:
            out.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">{_fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888888"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" text-anchor="middle">{escape(chart.x_label)}</text>')
    out.append(f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(chart.y_label)}</text>')
    for s in chart.series:
        pts = [(x, y) for x, y in zip(s.xs, s.ys, strict=True) if y is not None and not math.isnan(y)]
        if s.band:
            upper = [(x, y + b) for x, y, b in zip(s.xs, s.ys, s.band, strict=True) if y is not None and b]
            lower = [(x, y - b) for x, y, b in zip(s.xs, s.ys, s.band, strict=True) if y is not None and b]
            if upper:
                poly = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in upper + lower[::-1])
                out.append(f'<polygon points="{poly}" fill="{s.colour}" fill-opacity="0.15" stroke="none"/>')
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        if len(pts) > 1:
            line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{line}" fill="none" stroke="{s.colour}" stroke-width="2.5"{dash}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{s.colour}">'
                       f'<title>{escape(s.name)}: {_fmt(x)}, {y:.2f}</title></circle>')
    for i, s in enumerate(chart.series):
        y = chart.height + 12 + 16 * i - 6
        out.append(f'<line x1="{left}" x2="{left + 24}" y1="{y}" y2="{y}" stroke="{s.colour}" stroke-width="3"/>')
        out.append(f'<text x="{left + 30}" y="{y + 4}">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(title: str, bars: Sequence[tuple[str, float, str]], unit: str = "", width: int = 560) -> str:
    """Horizontal bars (label, value, colour) as an <svg>; values are shown beside the bars."""
    row, left, top = 20, 130, 26
    h = top + row * max(1, len(bars)) + 10
    peak = max([v for _, v, _ in bars] + [1e-12])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{h}" '
           f'viewBox="0 0 {width} {h}" role="img" aria-label="{escape(title)}">',
           f'<rect width="{width}" height="{h}" fill="#ffffff"/>',
           f'<text x="{width / 2}" y="17" text-anchor="middle" class="chart-title">{escape(title)}</text>']
    span = width - left - 70
    for i, (label, value, colour) in enumerate(bars):
        y = top + i * row
        length = span * value / peak
        out.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y + 2}" width="{length:.1f}" height="{row - 6}" fill="{colour}" '
                   'stroke="#555555" stroke-width="0.5"/>')
        out.append(f'<text x="{left + length + 5:.1f}" y="{y + 13}">{_fmt(value)}{escape(unit)}</text>')
    out.append("</svg>")
    return "".join(out)
