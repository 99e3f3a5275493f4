"""A study's progress from its trial points: the two charts and the generation counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.dashboard.charts import progress_chart
from evomerge.dashboard.queries import Point


def time_unit(span_s: float) -> tuple[str, float]:
    """The unit that keeps a time axis of `span_s` seconds readable, and its size."""
    for unit, size in (("hours", 3600.0), ("minutes", 60.0)):
        if span_s >= 2 * size:
            return unit, size
    return "seconds", 1.0


@dataclass(frozen=True)
class Generation:
    number: int
    done: int
    running: int


def latest_generations(points: list[Point], last: int = 2) -> list[Generation]:
    """Trial counts of the `last` CMA-ES generations, newest first."""
    counts: dict[int, list[int]] = {}
    for p in points:
        if p.generation is not None:
            done_running = counts.setdefault(p.generation, [0, 0])
            done_running[p.state == "RUNNING"] += 1
    newest = sorted(counts, reverse=True)[:last]
    return [Generation(g, *counts[g]) for g in newest]


def charts(points: list[Point]) -> dict[str, Any]:
    """Fitness over trial numbers and over time; running and re-asked trials are left out."""
    done = [p for p in points if p.finished_s is not None and p.state != "RUNNING"]
    done = [p for p in done if not p.reasked]
    scored_n = [(float(p.number), p.fitness) for p in done if p.fitness is not None]
    failed_n = [float(p.number) for p in done if p.fitness is None]
    by_time = sorted(done, key=lambda p: p.finished_s)
    start = by_time[0].finished_s if by_time else 0.0
    unit, size = time_unit(by_time[-1].finished_s - start if by_time else 0.0)
    scored_t = [
        ((p.finished_s - start) / size, p.fitness) for p in by_time if p.fitness is not None
    ]
    failed_t = [(p.finished_s - start) / size for p in by_time if p.fitness is None]
    return {
        "by_trial": progress_chart(
            scored_n, failed_n, x_label="trial", title="fitness over trials"
        ),
        "by_time": progress_chart(
            scored_t,
            failed_t,
            x_label=f"{unit} since the first trial finished",
            title="fitness over time",
        ),
    }
