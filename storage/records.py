"""What the store returns: frozen plain dataclasses, safe to pass between threads/processes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The error of a trial whose run died under it; resume fails it in Optuna and re-asks it.
RUN_INTERRUPTED = "run interrupted (heartbeat lost)"
# How the error of a trial failed only to be asked again ends (a stop, a crash, a resume).
REASKED = "parameters re-asked"


def is_reasked(error: str | None) -> bool:
    """Whether a FAIL trial's `error` says it was only cut short and asked again (the SQL
    form, for counts over many rows, is `storage.queries.reasked`)."""
    return error == RUN_INTERRUPTED or (error or "").endswith(REASKED)


@dataclass(frozen=True)
class StudyInfo:
    name: str
    optuna_study_name: str
    config_yaml: str
    budget_trials: int | None
    status: str
    stop_request: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StudySummary:
    """One line of a study list: what a dashboard shows without loading any trial."""

    name: str
    optuna_study_name: str
    status: str
    budget_trials: int | None
    trials_done: int  # finished, whatever the outcome
    trials_complete: int  # of those, COMPLETE: what the budget counts
    trials_failed: int
    trials_running: int
    best_fitness: float | None
    stop_request: str | None
    created_at: datetime
    last_activity: datetime
    last_heartbeat: datetime | None


@dataclass(frozen=True)
class RunInfo:
    id: int
    study: str
    pid: int
    host: str
    status: str
    started_at: datetime
    heartbeat_at: datetime
    ended_at: datetime | None
    exit_reason: str | None


@dataclass(frozen=True)
class TrialRow:
    """One trial; `recipe_json` is `Recipe.to_json()` (load it with `Recipe.from_json`)."""

    study: str
    number: int
    state: str
    attempts: int
    generation: int | None
    method: str
    recipe_json: str
    recipe_hash: str
    metrics: dict[str, float | None] | None
    fitness: float | None
    heldout_metrics: dict[str, float | None] | None
    heldout: float | None
    build_seconds: float | None
    eval_seconds: float | None
    worker: str | None
    error: str | None
    run_id: int | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class FusionJobInfo:
    """A fusion job (FuseLLM): its config, status, where it writes, and its evaluation;
    while it runs, the pid and host running it, their last heartbeat, and a stop request."""

    name: str
    config_yaml: str
    status: str
    out_dir: str
    evaluation: dict | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    pid: int | None = None
    host: str | None = None
    heartbeat_at: datetime | None = None
    stop_request: str | None = None
