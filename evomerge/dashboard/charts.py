"""Progress charts as inline SVG, drawn on the server: no chart library, no CDN.

Every trial is a dot and the best-so-far is a step line. A study of any size draws at most
two dots per pixel column (the lowest and the highest there), so the page stays small and
the envelope of the cloud stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 34


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


def thin(points: Sequence[tuple[float, float]], columns: int) -> list[tuple[float, float]]:
    """Keep the lowest and highest point of each of `columns` x-buckets."""
    if len(points) <= 2 * columns:
        return list(points)
    x0 = min(p[0] for p in points)
    scale = (columns - 1) / ((max(p[0] for p in points) - x0) or 1.0)
    low: dict[int, tuple[float, float]] = {}
    high: dict[int, tuple[float, float]] = {}
    for p in points:
        b = int((p[0] - x0) * scale)
        if b not in low or p[1] < low[b][1]:
            low[b] = p
        if b not in high or p[1] > high[b][1]:
            high[b] = p
    return sorted({*low.values(), *high.values()})


def best_so_far(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The running maximum, as the points where it rises (x-sorted input)."""
    out: list[tuple[float, float]] = []
    for x, y in points:
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def _frame(
    x_range: tuple[float, float], y_range: tuple[float, float], x_label: str, title: str
) -> tuple[list[str], Callable[[float], float], Callable[[float], float]]:
    """The chart's SVG opening, plot area, grid, ticks and axis label; and the two scales."""
    (x_lo, x_hi), (y_lo, y_hi) = x_range, y_range
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return TOP + (y_hi - y) / (y_hi - y_lo) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for t in nice_ticks(y_lo, y_hi):
        y = sy(t)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">'
            f"{_label(t)}</text>"
        )
    for t in nice_ticks(x_lo, x_hi, 6):
        x = sx(t)
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">'
            f"{_label(t)}</text>"
        )
    parts.append(
        f'<text class="axis" x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    return parts, sx, sy


def _padded(lo: float, hi: float) -> tuple[float, float]:
    pad = (hi - lo) * 0.05 or 0.5
    return lo - pad, hi + pad


def progress_chart(
    scored: Sequence[tuple[float, float]],
    failed: Sequence[float],
    *,
    x_label: str,
    title: str,
) -> Markup:
    """All trials (dots), failures (red ticks on the axis) and the best-so-far line.

    `scored` holds (x, fitness) sorted by x; `failed` the x of failed trials.
    """
    xs = [p[0] for p in scored] + list(failed)
    if not xs:
        return Markup('<p class="muted">No finished trials yet.</p>')
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    ys = [p[1] for p in scored] or [0.0]
    parts, sx, sy = _frame((x_lo, x_hi), _padded(min(ys), max(ys)), x_label, title)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    dots = "".join(f"M{sx(x):.1f} {sy(y):.1f}h0" for x, y in thin(scored, plot_w // 2))
    parts.append(f'<path class="dots" d="{dots}"/>')
    fail_cols = sorted({round(sx(x)) for x in failed})
    ticks = "".join(f"M{x} {TOP + plot_h}v-6" for x in fail_cols)
    parts.append(f'<path class="fails" d="{ticks}"/>')
    steps = best_so_far(scored)
    if steps:
        line = [f"M{sx(steps[0][0]):.1f} {sy(steps[0][1]):.1f}"]
        line += [f"H{sx(x):.1f}V{sy(y):.1f}" for x, y in steps[1:]]
        line.append(f"H{sx(x_hi):.1f}")
        parts.append(f'<path class="best" d="{"".join(line)}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]], *, x_label: str, title: str
) -> Markup:
    """One line per series (e.g. a fusion job's losses by step), each with its legend entry."""
    points = [p for line in series.values() for p in line]
    if not points:
        return Markup('<p class="muted">No step recorded yet.</p>')
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_hi = max(xs) if max(xs) > min(xs) else min(xs) + 1
    parts, sx, sy = _frame((min(xs), x_hi), _padded(min(ys), max(ys)), x_label, title)
    for i, (name, line) in enumerate(series.items()):
        path = "".join(
            f"{'M' if j == 0 else 'L'}{sx(x):.1f} {sy(y):.1f}"
            for j, (x, y) in enumerate(thin(line, WIDTH))
        )
        parts.append(f'<path class="series s{i}" d="{path}"/>')
        parts.append(
            f'<text class="legend s{i}" x="{LEFT + 8 + 90 * i}" y="{TOP + 14}">'
            f"{escape(name)}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
