"""
The campaign page's hourly chart: an inline SVG drawn on the server.

No script and no chart library: three polylines (deliveries, opens, clicks)
over one point per UTC hour of the period, with labelled axes. It is drawn
twice, for a wide box and a phone's, each in units close to the CSS pixels
it is shown at, so its type reads the same on both; the page's style sheet
shows the one that fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup, escape

HOUR = timedelta(hours=1)
# Tick spacings, in hours: the first that leaves at most ``max_labels`` labels is used. Ticks
# fall on multiples of it counted from the Unix epoch, so a day's tick is at 00:00 UTC.
_STEPS = (1, 2, 3, 6, 12, 24, 48, 96, 168, 336, 720, 1440, 2160)


@dataclass(frozen=True)
class Frame:
    """A drawing size: the SVG's units match the CSS pixels of the box it is shown in."""

    width: int
    height: int
    left: int  # room for the y axis's numbers and title
    bottom: int  # room for the x axis's labels and title
    font: int
    max_labels: int
    top: int = 12
    right: int = 14


WIDE = Frame(960, 360, 84, 62, 15, 8)  # a desktop's main column
NARROW = Frame(360, 260, 58, 52, 12, 3)  # a phone's


@dataclass(frozen=True)
class Series:
    name: str
    css_class: str  # its colour, in the page's style sheet
    values: Sequence[int]


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Every whole UTC hour from the one holding ``start`` to the one before ``end``."""
    first = start.replace(minute=0, second=0, microsecond=0)
    out = []
    at = first
    while at < end:
        out.append(at)
        at += HOUR
    return out or [first]


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _number(n: float) -> str:
    return f"{n:,.0f}"


def scale(value: int) -> tuple[int, int]:
    """The top of the y axis and its grid step: one to four steps of 1, 2 or 5 times a power of ten."""
    step = nice_ceiling(math.ceil(value / 4))
    return max(step, -(-value // step) * step), step


def _ticks(hours: Sequence[datetime], max_labels: int) -> tuple[list[int], int]:
    """The indexes of ``hours`` that get a label, and the spacing chosen (in hours)."""
    count = len(hours)
    step = next((s for s in _STEPS if count / s <= max_labels), _STEPS[-1])
    if step == 1:
        return list(range(count)), step
    return [i for i, h in enumerate(hours) if int(h.timestamp()) // 3600 % step == 0], step


def hourly_chart(hours: Sequence[datetime], series: Iterable[Series], title: str,
                 frame: Frame = WIDE) -> Markup:
    """The SVG of ``series`` (one value per hour of ``hours``), as markup safe to put in a page."""
    series = list(series)
    if any(len(s.values) != len(hours) for s in series):
        raise ValueError("every series needs one value per hour")
    f = frame
    count = len(hours)
    top_value, grid = scale(max((max(s.values, default=0) for s in series), default=0))
    plot_w, plot_h = f.width - f.left - f.right, f.height - f.top - f.bottom
    base = f.top + plot_h

    def x(i: int) -> float:
        return f.left + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)

    def y(v: float) -> float:
        return base - plot_h * v / top_value

    parts = [f'<svg class="chart" viewBox="0 0 {f.width} {f.height}" role="img" '
             f'aria-label="{escape(title)}" font-size="{f.font}">', f"<title>{escape(title)}</title>"]
    for v in range(0, top_value + 1, grid):  # horizontal grid lines and the y axis's numbers
        parts.append(f'<line class="grid" x1="{f.left}" x2="{f.width - f.right}" y1="{y(v):.1f}" '
                     f'y2="{y(v):.1f}"/>')
        parts.append(f'<text class="y-label" x="{f.left - 6}" y="{y(v) + f.font / 3:.1f}" '
                     f'text-anchor="end">{_number(v)}</text>')
    ticks, step = _ticks(hours, f.max_labels)
    daily = step >= 24
    for i in ticks:
        label = hours[i].strftime("%d %b") if daily else hours[i].strftime("%H:%M")
        parts.append(f'<line class="tick" x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{base}" y2="{base + 5}"/>')
        parts.append(f'<text class="x-label" x="{x(i):.1f}" y="{base + 5 + f.font}" '
                     f'text-anchor="middle">{escape(label)}</text>')
    parts.append(f'<line class="axis" x1="{f.left}" x2="{f.width - f.right}" y1="{base}" y2="{base}"/>')
    parts.append(f'<line class="axis" x1="{f.left}" x2="{f.left}" y1="{f.top}" y2="{base}"/>')
    axis_title = "day (UTC)" if daily else "hour (UTC)"
    parts.append(f'<text class="axis-title" x="{f.left + plot_w / 2:.1f}" y="{f.height - 6}" '
                 f'text-anchor="middle">{axis_title}</text>')
    parts.append(f'<text class="axis-title" transform="translate({f.font},{f.top + plot_h / 2:.1f}) '
                 f'rotate(-90)" text-anchor="middle">per hour</text>')
    for s in series:
        if count == 1:
            parts.append(f'<circle class="{s.css_class}" cx="{x(0):.1f}" cy="{y(s.values[0]):.1f}" r="4">'
                         f"<title>{escape(s.name)}</title></circle>")
            continue
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        parts.append(f'<polyline class="{s.css_class}" points="{points}"><title>{escape(s.name)}</title>'
                     "</polyline>")
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text in it is escaped above
