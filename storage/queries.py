"""Read queries that need more than one table: trial rows, rankings and study summaries."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

import sqlalchemy as sa

from storage.records import REASKED, RUN_INTERRUPTED, RunInfo, TrialRow
from storage.schema import runs, studies, trials

TRIAL_COLUMNS = [
    studies.c.name.label("study"),
    *(trials.c[f.name] for f in fields(TrialRow) if f.name != "study"),
]
RUN_COLUMNS = [
    studies.c.name.label("study"),
    *(runs.c[f.name] for f in fields(RunInfo) if f.name != "study"),
]


def trial_select() -> sa.Select[tuple[object, ...]]:
    """Every `TrialRow` field, with the study's name."""
    return sa.select(*TRIAL_COLUMNS).join(studies, studies.c.id == trials.c.study_id)


def ranking_value(
    by: Literal["fitness", "heldout"], task: str | None
) -> sa.ColumnElement[float | None]:
    """What `best()` sorts on: fitness, or one task's metric, on the search or held-out split."""
    if by not in ("fitness", "heldout"):
        raise ValueError(f"by must be 'fitness' or 'heldout', got {by!r}")
    if task is None:
        return trials.c.fitness if by == "fitness" else trials.c.heldout
    column = trials.c.metrics if by == "fitness" else trials.c.heldout_metrics
    return column[task].as_float()


def best_select(
    study_id: int | None,
    *,
    top: int,
    method: str | None,
    task: str | None,
    min_heldout: float | None,
    by: Literal["fitness", "heldout"],
) -> sa.Select[tuple[object, ...]]:
    """Completed trials with a ranking value, best first; ties go to the earlier trial."""
    value = ranking_value(by, task)
    query = trial_select().where(trials.c.state == "COMPLETE", value.is_not(None))
    if study_id is not None:
        query = query.where(trials.c.study_id == study_id)
    if method is not None:
        query = query.where(trials.c.method == method)
    if min_heldout is not None:
        query = query.where(trials.c.heldout >= min_heldout)
    return query.order_by(value.desc(), studies.c.name, trials.c.number).limit(top)


def reasked(error: sa.ColumnElement[str]) -> sa.ColumnElement[bool]:
    """Whether a FAIL trial's `error` says it was only cut short (a stop, a crash) and its
    parameters asked again: an interruption, not a failed candidate."""
    said = sa.func.coalesce(error, "")
    return (said == RUN_INTERRUPTED) | said.endswith(REASKED, autoescape=True)


def summary_select() -> sa.Select[tuple[object, ...]]:
    """Studies with trial counts, best fitness and latest activity, in creation order.
    A trial failed only to be asked again (its run stopped or died) is not counted failed."""
    failed = (trials.c.state == "FAIL") & ~reasked(trials.c.error)
    t = (
        sa.select(
            trials.c.study_id,
            sa.func.count().filter(trials.c.state != "RUNNING").label("trials_done"),
            sa.func.count().filter(trials.c.state == "COMPLETE").label("trials_complete"),
            sa.func.count().filter(failed).label("trials_failed"),
            sa.func.count().filter(trials.c.state == "RUNNING").label("trials_running"),
            sa.func.max(trials.c.fitness)
            .filter(trials.c.state == "COMPLETE")
            .label("best_fitness"),
            sa.func.max(trials.c.started_at).label("last_trial_started"),
            sa.func.max(trials.c.finished_at).label("last_trial_finished"),
        )
        .group_by(trials.c.study_id)
        .subquery()
    )
    r = (
        sa.select(
            runs.c.study_id,
            sa.func.max(runs.c.heartbeat_at).label("last_heartbeat"),
            sa.func.max(runs.c.heartbeat_at)
            .filter(runs.c.status == "running")
            .label("live_heartbeat"),
        )
        .group_by(runs.c.study_id)
        .subquery()
    )
    return (
        sa.select(
            studies,
            sa.func.coalesce(t.c.trials_done, 0).label("trials_done"),
            sa.func.coalesce(t.c.trials_complete, 0).label("trials_complete"),
            sa.func.coalesce(t.c.trials_failed, 0).label("trials_failed"),
            sa.func.coalesce(t.c.trials_running, 0).label("trials_running"),
            t.c.best_fitness,
            t.c.last_trial_started,
            t.c.last_trial_finished,
            r.c.last_heartbeat,
            r.c.live_heartbeat,
        )
        .outerjoin(t, t.c.study_id == studies.c.id)
        .outerjoin(r, r.c.study_id == studies.c.id)
        .order_by(studies.c.created_at, studies.c.id)
    )
