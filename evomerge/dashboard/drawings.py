"""Inline SVG: a recipe's heatmap per merge parameter, a DFS path diagram, and the weight
similarity of a study's models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from markupsafe import Markup, escape

from evomerge.recipe import EMBED, LM_HEAD, NORM, DataFlow, Recipe

if TYPE_CHECKING:  # the analysis loads torch; the dashboard imports it on first use
    from evomerge.glue.kinship import ZooAnalysis

CELL, LABEL_W, HEAD_H = 22, 150, 46
# Distinct hues for the models of a DFS path (cycled past eight).
PALETTE = ("#3b6fb6", "#d9822b", "#2e9e6a", "#b6455e", "#7e5bb5", "#8a6d3b", "#2a9bb0", "#666")


def short_group(group: str) -> str:
    """Column label: `layers.3` -> `3`, `layers.0-3` -> `0-3`, `lm_head` -> `head`."""
    names = {EMBED: "emb", NORM: "norm", LM_HEAD: "head"}
    return names.get(group, group.removeprefix("layers."))


def _color(t: float) -> str:
    """White to deep blue for t in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (round(a + (z - a) * t) for a, z in ((247, 8), (251, 48), (255, 107)))
    return f"rgb({r},{g},{b})"


@dataclass(frozen=True)
class Heatmap:
    """One parameter of a recipe: a row per source (or one row for a shared value)."""

    name: str
    rows: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]  # values[row][group]
    low: float
    high: float


def heatmaps(recipe: Recipe) -> list[Heatmap]:
    """The recipe's parameters as source-by-group grids, on a scale that includes [0, 1]."""
    out = []
    for name, per_group in recipe.params.items():
        shared = all(len(v) == 1 for v in per_group)
        rows = ("(all sources)",) if shared else recipe.sources
        values = tuple(
            tuple(v[0] if len(v) == 1 else v[i] for v in per_group) for i in range(len(rows))
        )
        flat = [x for row in values for x in row]
        out.append(Heatmap(name, rows, values, min(0.0, *flat), max(1.0, *flat)))
    return out


def heatmap_svg(recipe: Recipe, hm: Heatmap) -> Markup:
    """A grid with a cell per (row, layer group); hovering a cell shows its value."""
    width = LABEL_W + CELL * len(recipe.groups) + 4
    height = HEAD_H + CELL * len(hm.rows) + 4
    parts = [
        f'<svg class="heatmap" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(hm.name)} per layer group">'
    ]
    for g, group in enumerate(recipe.groups):
        x = LABEL_W + g * CELL + CELL / 2
        parts.append(
            f'<text class="tick" transform="translate({x:.0f},{HEAD_H - 4}) rotate(-55)">'
            f"{escape(short_group(group))}</text>"
        )
    span = hm.high - hm.low
    for r, (row, values) in enumerate(zip(hm.rows, hm.values, strict=True)):
        y = HEAD_H + r * CELL
        parts.append(
            f'<text class="tick" x="{LABEL_W - 6}" y="{y + CELL / 2 + 4:.0f}" '
            f'text-anchor="end">{escape(row[-24:])}</text>'
        )
        for g, value in enumerate(values):
            fill = _color((value - hm.low) / span)
            tip = f"{row} · {recipe.groups[g]} · {hm.name} = {value:.4f}"
            parts.append(
                f'<rect x="{LABEL_W + g * CELL}" y="{y}" width="{CELL - 1}" height="{CELL - 1}" '
                f'fill="{fill}"><title>{escape(tip)}</title></rect>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(hm: Heatmap) -> Markup:
    """The color scale of one heatmap, from its low to its high value."""
    stops = "".join(f'<span style="background:{_color(i / 4)}"></span>' for i in range(5))
    return Markup(f'<span class="legend">{hm.low:.2g} {stops} {hm.high:.2g}</span>')


def dataflow_svg(flow: DataFlow) -> Markup:
    """The path of a token: one node per hop (model row, layer number inside), the hop's
    scale under it, arrows between hops; hops go left to right and wrap every 16."""
    per_line, step, row_h = 16, 52, 30
    band = row_h * len(flow.models) + 30
    lines = (len(flow.path) + per_line - 1) // per_line
    width = LABEL_W + per_line * step
    height = band * lines
    parts = [
        f'<svg class="dataflow" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="data-flow path">',
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0 0L8 4L0 8z" fill="#888"/></marker></defs>',
    ]

    def where(i: int) -> tuple[float, float]:
        line, col = divmod(i, per_line)
        return LABEL_W + col * step + step / 2, line * band + 14 + flow.path[i][0] * row_h

    for line in range(lines):
        for m, model in enumerate(flow.models):
            y = line * band + 14 + m * row_h
            parts.append(
                f'<text class="tick" x="{LABEL_W - 14}" y="{y + 4}" text-anchor="end" '
                f'style="fill:{PALETTE[m % len(PALETTE)]}">{escape(model[-20:])}</text>'
                f'<line class="grid" x1="{LABEL_W}" x2="{width}" y1="{y}" y2="{y}"/>'
            )
    for i in range(1, len(flow.path)):
        if i % per_line:
            (x0, y0), (x1, y1) = where(i - 1), where(i)
            parts.append(
                f'<line class="hop" x1="{x0 + 11:.0f}" y1="{y0}" x2="{x1 - 12:.0f}" y2="{y1}" '
                'marker-end="url(#arrow)"/>'
            )
    for i, ((model, layer), scale) in enumerate(zip(flow.path, flow.scales, strict=True)):
        x, y = where(i)
        color = PALETTE[model % len(PALETTE)]
        tip = f"hop {i}: {flow.models[model]} layer {layer}, scale {scale:.4f}"
        parts.append(
            f'<g><title>{escape(tip)}</title><circle cx="{x:.0f}" cy="{y}" r="11" '
            f'fill="{color}"/><text class="node" x="{x:.0f}" y="{y + 4}" '
            f'text-anchor="middle">{layer}</text>'
            f'<text class="scale" x="{x:.0f}" y="{y + 23}" text-anchor="middle">'
            f"×{scale:.2f}</text></g>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def similarity_svg(result: ZooAnalysis) -> Markup:
    """The similarity matrix as a heatmap with each value in its cell, models ordered by
    cluster and each cluster outlined on the diagonal; a pair that cannot merge is grey, its
    reason in the tooltip. The colors span the lowest similarity shown to 1, so a family's
    0.98 and 0.99 are told apart."""
    cell, head = 48, 110
    order = [n for cluster in result.clusters for n in cluster]
    shown = [v for row in result.matrix for v in row if v is not None]
    low = min(min(shown), result.threshold)
    width, height = LABEL_W + cell * len(order) + 60, head + cell * len(order) + 4
    parts = [
        f'<svg class="similarity" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="weight similarity">'
    ]
    for i, name in enumerate(order):
        x = LABEL_W + i * cell + cell / 2
        parts.append(
            f'<text class="tick" transform="translate({x:.0f},{head - 4}) rotate(-35)">'
            f"{escape(name[-24:])}</text>"
            f'<text class="tick" x="{LABEL_W - 6}" y="{head + i * cell + cell / 2 + 4:.0f}" '
            f'text-anchor="end">{escape(name[-24:])}</text>'
        )
    for r, a in enumerate(order):
        for c, b in enumerate(order):
            value = result.similarity(a, b)
            pair = tuple(sorted((a, b), key=result.names.index))
            why = result.reasons.get(pair, "-")
            tip = f"{a} · {b}: " + (f"{value:.4f}" if value is not None else why)
            t = 0.0 if value is None else (value - low) / max(1.0 - low, 1e-9)
            fill = "#ccc" if value is None else _color(t)
            ink = "#fff" if t > 0.6 else "#222"
            label = "–" if value is None else f"{max(value, 0.0):.3f}"
            x, y = LABEL_W + c * cell, head + r * cell
            parts.append(
                f'<g><title>{escape(tip)}</title><rect x="{x}" y="{y}" width="{cell - 1}" '
                f'height="{cell - 1}" fill="{fill}"/><text class="cell" x="{x + cell / 2}" '
                f'y="{y + cell / 2 + 4}" text-anchor="middle" style="fill:{ink}">{label}'
                "</text></g>"
            )
    start = 0
    for cluster in result.clusters:
        x, y = LABEL_W + start * cell - 1, head + start * cell - 1
        side = cell * len(cluster)
        parts.append(
            f'<rect class="cluster" x="{x}" y="{y}" width="{side}" height="{side}" '
            'fill="none" stroke="#d9822b" stroke-width="3"/>'
        )
        start += len(cluster)
    parts.append("</svg>")
    return Markup("".join(parts))
