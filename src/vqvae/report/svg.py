"""Charts as inline SVG text: line charts of logs, a usage histogram and grid heatmaps.

Hovering shows values through SVG ``<title>`` elements (no script). Long logs are thinned to a
few hundred points a line and a few dozen hover marks, so a long run's page stays small.
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
WIDTH, HEIGHT, PAD = 420, 220, (50, 12, 16, 30)  # left, right, top, bottom
MAX_POINTS, MAX_MARKS = 400, 40

Point = tuple[float, float]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def thin(points: Sequence[Point], limit: int) -> list[Point]:
    """At most ``limit`` of ``points``, evenly spaced, the first and last kept."""
    if len(points) <= limit:
        return list(points)
    idx = {round(i * (len(points) - 1) / (limit - 1)) for i in range(limit)}
    return [points[i] for i in sorted(idx)]


def _finite(points: Sequence[Point], log: bool) -> list[Point]:
    return [(x, y) for x, y in points
            if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log)]


def line_chart(title: str, series: dict[str, Sequence[Point]], log: bool = False,
               xlabel: str = "step") -> str:
    """One panel: a line per series (name -> (x, y) points), the y axis log-scaled with ``log``;
    empty series are left out, and a panel with none says so."""
    series = {name: _finite(pts, log) for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img"><title>{escape(title)}</title>'
            f'<text x="{WIDTH / 2}" y="11" class="ct">{escape(title)}</text>')
    if not series:
        return head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="ct">no data</text></svg>'
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [math.log10(y) if log else y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05
    left, right, top, bottom = PAD
    w, h = WIDTH - left - right, HEIGHT - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        y = math.log10(y) if log else y
        return left + (x - x0) / (x1 - x0) * w, top + (1 - (y - y0) / (y1 - y0)) * h

    def label(v: float) -> str:
        return _fmt(10 ** v if log else v)

    parts = [head,
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="frame"/>',
             f'<text x="{left - 3}" y="{top + 8}" class="yl">{label(y1)}</text>',
             f'<text x="{left - 3}" y="{top + h}" class="yl">{label(y0)}</text>',
             f'<text x="{left}" y="{HEIGHT - 14}" class="xl">{_fmt(x0)}</text>',
             f'<text x="{left + w}" y="{HEIGHT - 14}" class="xl" text-anchor="end">'
             f'{_fmt(x1)}</text>',
             f'<text x="{left + w / 2}" y="{HEIGHT - 3}" class="ct">{escape(xlabel)}'
             f'{" (log y)" if log else ""}</text>']
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y in thin(pts,
                                                                                  MAX_POINTS)))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                     f'stroke-width="1.3"><title>{escape(name)}</title></polyline>')
        for x, y in thin(pts, MAX_MARKS):
            a, b = at(x, y)
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}">'
                         f'<title>{escape(name)} at {xlabel} {_fmt(x)}: {_fmt(y)}</title>'
                         f'</circle>')
        parts.append(f'<text x="{left + 6}" y="{top + 12 + 11 * i}" fill="{colour}" '
                     f'class="lg">{escape(name)}</text>')
    return "".join(parts) + "</svg>"


def usage_histogram(counts: Sequence[int], bars: int = 256) -> str:
    """Held-out assignments per code, most used first, on a log scale: at most ``bars`` bars
    (each the mean over its codes, its range and counts on hover); dead codes in red."""
    ordered = sorted((int(c) for c in counts), reverse=True)
    k, used = len(ordered), sum(c > 0 for c in ordered)
    per = max(1, -(-k // bars))
    left, right, top, bottom = PAD
    width = 2 * WIDTH
    w, h = width - left - right, HEIGHT - top - bottom
    top_count = math.log10(max(ordered[0], 1) + 1) if ordered else 1.0
    parts = [f'<svg class="chart" viewBox="0 0 {width} {HEIGHT}" width="{width}" '
             f'height="{HEIGHT}" role="img"><text x="{width / 2}" y="11" class="ct">held-out '
             f'assignments per code, most used first: {used} of {k} used</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="frame"/>',
             f'<text x="{left - 3}" y="{top + 8}" class="yl">{ordered[0] if ordered else 0}'
             f'</text><text x="{left - 3}" y="{top + h}" class="yl">0</text>',
             f'<text x="{left + w / 2}" y="{HEIGHT - 3}" class="ct">codes by usage rank '
             f'(log count)</text>']
    slots = -(-k // per)
    for i in range(slots):
        chunk = ordered[i * per:(i + 1) * per]
        mean = sum(chunk) / len(chunk)
        bar = math.log10(mean + 1) / top_count * h
        x = left + i / slots * w
        dead = chunk[0] == 0
        ranks = f"rank {i * per + 1}" + (f"-{i * per + len(chunk)}" if len(chunk) > 1 else "")
        what = "dead" if dead else (f"{chunk[0]}" if len(chunk) == 1
                                    else f"{chunk[-1]}-{chunk[0]}, mean {mean:.1f}")
        bar = max(bar, 2 if dead else 0)  # a dead stretch still shows, as a red floor
        parts.append(f'<rect x="{x:.1f}" y="{top + h - bar:.1f}" '
                     f'width="{max(w / slots - 0.3, 0.5):.1f}" height="{bar:.1f}" '
                     f'fill="{"#d62728" if dead else "#1f77b4"}"><title>{ranks}: {what}'
                     f'</title></rect>')
    return "".join(parts) + "</svg>"


def heatmap(values: Sequence[Sequence[float]], title: str, unit: str, cell: int = 28) -> str:
    """A grid of values (rows of columns), darker = higher, each cell's value on hover."""
    rows, cols = len(values), len(values[0]) if values else 0
    flat = [v for row in values for v in row]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    span = (hi - lo) or 1.0
    width, height = max(cols * cell, 220), rows * cell + 34
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img"><text x="{width / 2}" y="11" class="ct">'
             f'{escape(title)}</text>']
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            shade = 0.1 + 0.9 * (v - lo) / span
            parts.append(f'<rect x="{c * cell}" y="{16 + r * cell}" width="{cell - 1}" '
                         f'height="{cell - 1}" fill="rgba(31,119,180,{shade:.3f})">'
                         f'<title>row {r}, column {c}: {_fmt(v)} {escape(unit)}</title></rect>')
    parts.append(f'<text x="0" y="{height - 4}" class="xl">{_fmt(lo)}-{_fmt(hi)} '
                 f'{escape(unit)}</text>')
    return "".join(parts) + "</svg>"
