"""`Store`: evomerge's studies, runs and trials in one SQL database beside Optuna's.

One `Store` per process (engines do not survive `fork`). Every method is one short
transaction, and returns plain dataclasses, never ORM objects, so results can cross threads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from alembic.util import CommandError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage import queries
from storage.db import (
    DEFAULT_BUSY_TIMEOUT_S,
    MIGRATE_LOCK_KEY,
    default_storage_url,
    make_engine,
    parse_url,
    sqlite_journal,
    transaction,
    upgrade_to_head,
)
from storage.errors import (
    LeaseLostError,
    SchemaError,
    StorageUnavailableError,
    StudyBusyError,
    StudyExistsError,
    UnknownStudyError,
    UnknownTrialError,
    translated,
)
from storage.lease import process_alive
from storage.records import (
    RUN_INTERRUPTED,
    FusionJobInfo,
    RunInfo,
    StudyInfo,
    StudySummary,
    TrialRow,
)
from storage.schema import (
    FUSION_STATUSES,
    RUN_STATUSES,
    STOP_MODES,
    STUDY_STATUSES,
    TRIAL_STATES,
    fusion_jobs,
    fusion_steps,
    runs,
    studies,
    trials,
)

if TYPE_CHECKING:
    import optuna

    from evomerge.recipe import Recipe

StopMode = Literal["stop", "cancel"]
_UPSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
# Result fields a retried trial starts without.
_RESULT_FIELDS = (
    "metrics",
    "fitness",
    "heldout_metrics",
    "heldout",
    "build_seconds",
    "eval_seconds",
    "error",
    "finished_at",
)


_STUDY_FIELDS = frozenset(f.name for f in fields(StudyInfo))
_JOB_FIELDS = frozenset(f.name for f in fields(FusionJobInfo))


def _fusion_job(row: sa.Row, stale_after_s: float | None) -> FusionJobInfo:
    info = FusionJobInfo(**{k: v for k, v in row._mapping.items() if k in _JOB_FIELDS})
    if info.status != "running" or stale_after_s is None:
        return info
    beat = info.heartbeat_at
    if beat is None or (_now() - beat).total_seconds() >= stale_after_s:
        return replace(info, status="interrupted")
    return info


def _now() -> datetime:
    return datetime.now(UTC)


def _lease_held(
    heartbeat_at: datetime, pid: int, host: str, here: str, now: datetime, stale_after_s: float
) -> bool:
    """Whether a run's (or a fusion job's) process still holds its lease: it heartbeat within
    `stale_after_s` and is not a pid gone from this very host (a SIGKILL leaves no time to
    say so)."""
    age = (now - heartbeat_at).total_seconds()
    return age < stale_after_s and not (host == here and not process_alive(pid))


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


def _finite_metrics(
    metrics: Mapping[str, float] | None, split: str
) -> tuple[dict[str, float | None] | None, list[str]]:
    """Metrics with NaN/inf replaced by None (JSON cannot hold them), and a note for each."""
    if metrics is None:
        return None, []
    clean: dict[str, float | None] = {}
    notes = []
    for name, value in metrics.items():
        number = float(value)
        clean[str(name)] = number if math.isfinite(number) else None
        if not math.isfinite(number):
            notes.append(f"{split} metric {name!r} is {number}")
    return clean, notes


class Store:
    """evomerge's tables in the database at `url` (default: `default_storage_url()`).

    Opening checks the URL and connects once, so a bad URL fails here with a clear
    `StorageUnavailableError`. A wait for a lock lasts at most `busy_timeout_s`, then raises
    `StorageLockedError` with the transaction rolled back.
    """

    def __init__(
        self, url: str | None = None, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> None:
        parsed = parse_url(default_storage_url() if url is None else url)
        self.url = parsed.render_as_string(hide_password=True)
        self.busy_timeout_s = busy_timeout_s
        if parsed.get_backend_name() not in _UPSERT:
            raise StorageUnavailableError(
                f"unsupported storage URL {self.url}: evomerge stores to SQLite or PostgreSQL"
            )
        self._engine = make_engine(parsed, busy_timeout_s)
        with translated(self.url, busy_timeout_s, connecting=True), self._engine.connect():
            pass

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        with (
            translated(self.url, self.busy_timeout_s),
            transaction(self._engine, write=write) as conn,
        ):
            yield conn

    def migrate(self) -> None:
        """Create or upgrade evomerge's tables to the newest schema; safe to call every start.

        Optuna's tables are left alone: Optuna creates and upgrades its own.
        """
        try:
            with self._tx(write=True) as conn:
                upgrade_to_head(conn)
        except CommandError as e:
            raise SchemaError(
                f"cannot migrate {self.url}: {e} (was it written by a newer evomerge?)"
            ) from e

    def optuna_storage(self, **kwargs: Any) -> optuna.storages.RDBStorage:
        """Optuna's storage on the same database; on SQLite with the same busy timeout
        (Optuna's default is 5 s). `kwargs` go to `RDBStorage` (e.g. heartbeat_interval)."""
        import optuna

        url = self._engine.url.render_as_string(hide_password=False)
        engine_kwargs: dict[str, Any] = {}
        if self._engine.dialect.name == "sqlite":
            engine_kwargs["connect_args"] = {"timeout": self.busy_timeout_s}
        with translated(self.url, self.busy_timeout_s, connecting=True), self._schema_lock():
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        if self._engine.dialect.name == "sqlite":
            sqlite_journal(storage.engine)
            storage.engine.dispose()  # connections opened while creating tables: reopen tuned
        return storage

    @contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """PostgreSQL: one process at a time lets Optuna create its tables. Optuna's
        `create_all` checks, then creates; coordinators starting at once on a fresh database
        collide on `CREATE TYPE` (UniqueViolation) without this. Same lock as `migrate()`."""
        if self._engine.dialect.name != "postgresql":
            yield
            return
        with self._engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_LOCK_KEY})

    def _study_id(self, conn: Connection, name: str, *, lock: bool = False) -> int:
        query = sa.select(studies.c.id).where(studies.c.name == name)
        study_id = conn.execute(query.with_for_update() if lock else query).scalar()
        if study_id is None:
            raise UnknownStudyError(f"no study named {name!r} in {self.url}")
        return study_id

    # Studies

    def create_study(
        self,
        name: str,
        config_yaml: str,
        optuna_study_name: str,
        budget_trials: int | None = None,
    ) -> StudyInfo:
        """Register a new study (status `created`); `StudyExistsError` if the name is taken."""
        now = _now()
        info = StudyInfo(
            name=name,
            optuna_study_name=optuna_study_name,
            config_yaml=config_yaml,
            budget_trials=budget_trials,
            status="created",
            stop_request=None,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._tx(write=True) as conn:
                conn.execute(sa.insert(studies).values(**asdict(info)))
        except IntegrityError as e:
            raise StudyExistsError(f"study {name!r} already exists in {self.url}") from e
        return info

    def get_study(self, name: str, *, missing_ok: bool = False) -> StudyInfo | None:
        """The study, or None with `missing_ok` (else `UnknownStudyError`)."""
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(studies).where(studies.c.name == name)).first()
        if row is None:
            if missing_ok:
                return None
            raise UnknownStudyError(f"no study named {name!r} in {self.url}")
        return StudyInfo(**{k: v for k, v in row._mapping.items() if k in _STUDY_FIELDS})

    def list_studies(self, *, stale_after_s: float | None = None) -> list[StudySummary]:
        """Every study with progress and latest activity, oldest first.

        With `stale_after_s`, a `running` study whose run stopped heartbeating is shown as
        `interrupted` (its process died without saying so).
        """
        with self._tx(write=False) as conn:
            rows = conn.execute(queries.summary_select()).all()
        now = _now()
        out = []
        for row in rows:
            status = row.status
            if status == "running" and stale_after_s is not None:
                live = row.live_heartbeat
                if live is None or (now - live).total_seconds() >= stale_after_s:
                    status = "interrupted"
            times = (row.updated_at, row.last_trial_started, row.last_trial_finished)
            out.append(
                StudySummary(
                    name=row.name,
                    optuna_study_name=row.optuna_study_name,
                    status=status,
                    budget_trials=row.budget_trials,
                    trials_done=row.trials_done,
                    trials_complete=row.trials_complete,
                    trials_failed=row.trials_failed,
                    trials_running=row.trials_running,
                    best_fitness=row.best_fitness,
                    stop_request=row.stop_request,
                    created_at=row.created_at,
                    last_activity=max(t for t in (*times, row.last_heartbeat) if t is not None),
                    last_heartbeat=row.last_heartbeat,
                )
            )
        return out

    def _update_study(self, name: str, **values: Any) -> None:
        with self._tx(write=True) as conn:
            result = conn.execute(
                sa.update(studies).where(studies.c.name == name).values(**values, updated_at=_now())
            )
        if result.rowcount == 0:
            raise UnknownStudyError(f"no study named {name!r} in {self.url}")

    def set_study_status(self, name: str, status: str) -> None:
        _check(status, STUDY_STATUSES, "study status")
        self._update_study(name, status=status)

    def request_stop(self, name: str, mode: StopMode = "stop") -> None:
        """Ask the study's run to stop: `stop` lets running trials finish, `cancel` does not.

        A pending `cancel` is not weakened by a later `stop`.
        """
        _check(mode, STOP_MODES, "stop mode")
        keep_cancel = sa.case((studies.c.stop_request == "cancel", "cancel"), else_=mode)
        self._update_study(name, stop_request=keep_cancel, stop_requested_at=_now())

    def stop_request(self, name: str) -> StopMode | None:
        """The pending stop request, if any: the run polls this with its heartbeat."""
        with self._tx(write=False) as conn:
            query = sa.select(studies.c.stop_request).where(studies.c.name == name)
            row = conn.execute(query).first()
        if row is None:
            raise UnknownStudyError(f"no study named {name!r} in {self.url}")
        return row.stop_request

    def clear_stop_request(self, name: str) -> None:
        self._update_study(name, stop_request=None, stop_requested_at=None)

    # Runs

    def start_run(
        self, study: str, pid: int, host: str, stale_after_s: float, since: datetime | None = None
    ) -> int:
        """Take the study's lease: a new `running` run, its id returned.

        `StudyBusyError` if another run of the study heartbeat within `stale_after_s`, unless
        that run's pid is gone from this very host (a SIGKILL leaves no time to say so).
        Older `running` runs are dead: they become `interrupted` ("heartbeat lost") and their
        RUNNING trials FAIL. The study becomes `running` and a stop request made before
        `since` (when this run's process started; default: any) is cleared: one made while
        the run started up is its own, honoured at its first poll, never silently lost.
        Race-safe: the study row is locked (PostgreSQL) or the write lock held (SQLite).
        """
        with self._tx(write=True) as conn:
            study_id = self._study_id(conn, study, lock=True)
            now = _now()
            live = conn.execute(
                sa.select(runs).where(runs.c.study_id == study_id, runs.c.status == "running")
            ).all()
            for run in live:
                if _lease_held(run.heartbeat_at, run.pid, run.host, host, now, stale_after_s):
                    age = (now - run.heartbeat_at).total_seconds()
                    raise StudyBusyError(
                        f"study {study!r} is already being run by pid {run.pid} on "
                        f"{run.host} (run {run.id}, last heartbeat {age:.1f} s ago); stop it "
                        f"with `evomerge stop {study}` (or --cancel), or if that process is "
                        f"dead, retry once its heartbeat is {stale_after_s:g} s old"
                    )
            dead = [run.id for run in live]
            if dead:
                conn.execute(
                    sa.update(runs)
                    .where(runs.c.id.in_(dead))
                    .values(status="interrupted", ended_at=now, exit_reason="heartbeat lost")
                )
                conn.execute(
                    sa.update(trials)
                    .where(trials.c.run_id.in_(dead), trials.c.state == "RUNNING")
                    .values(state="FAIL", finished_at=now, error=RUN_INTERRUPTED)
                )
            run_id = conn.execute(
                sa.insert(runs)
                .values(
                    study_id=study_id,
                    pid=pid,
                    host=host,
                    status="running",
                    started_at=now,
                    heartbeat_at=now,
                )
                .returning(runs.c.id)
            ).scalar_one()
            ours = studies.c.stop_requested_at >= (since or now)
            conn.execute(
                sa.update(studies)
                .where(studies.c.id == study_id)
                .values(
                    status="running",
                    stop_request=sa.case((ours, studies.c.stop_request), else_=None),
                    stop_requested_at=sa.case((ours, studies.c.stop_requested_at), else_=None),
                    updated_at=now,
                )
            )
        return run_id

    def heartbeat(self, run_id: int) -> None:
        """Say run `run_id` is alive; `LeaseLostError` if it is no longer `running`."""
        with self._tx(write=True) as conn:
            result = conn.execute(
                sa.update(runs)
                .where(runs.c.id == run_id, runs.c.status == "running")
                .values(heartbeat_at=_now())
            )
            if result.rowcount == 1:
                return
            ended = conn.execute(
                sa.select(runs.c.status, runs.c.exit_reason).where(runs.c.id == run_id)
            ).first()
        why = "does not exist" if ended is None else f"is {ended.status} ({ended.exit_reason})"
        raise LeaseLostError(f"run {run_id} {why}; another run may own the study now")

    def end_run(self, run_id: int, status: str, exit_reason: str | None = None) -> bool:
        """Close a running run; False (and no change) if it was already closed by another."""
        _check(status, RUN_STATUSES[1:], "run end status")
        with self._tx(write=True) as conn:
            result = conn.execute(
                sa.update(runs)
                .where(runs.c.id == run_id, runs.c.status == "running")
                .values(status=status, ended_at=_now(), exit_reason=exit_reason)
            )
        return result.rowcount == 1

    def runs(self, study: str) -> list[RunInfo]:
        """The study's runs, oldest first."""
        with self._tx(write=False) as conn:
            study_id = self._study_id(conn, study)
            rows = conn.execute(
                sa.select(*queries.RUN_COLUMNS)
                .join(studies, studies.c.id == runs.c.study_id)
                .where(runs.c.study_id == study_id)
                .order_by(runs.c.id)
            ).all()
        return [RunInfo(**row._mapping) for row in rows]

    # Trials

    def record_trial_started(
        self,
        study: str,
        run_id: int | None,
        optuna_number: int,
        generation: int | None,
        recipe: Recipe,
        worker: str | None = None,
    ) -> int:
        """Record trial `optuna_number` as RUNNING; returns its attempt count.

        Idempotent per (study, number): a retried trial bumps `attempts` and drops the
        previous attempt's results instead of adding a row (one atomic upsert).
        """
        with self._tx(write=True) as conn:
            study_id = self._study_id(conn, study)
            insert = _UPSERT[conn.dialect.name](trials).values(
                study_id=study_id,
                run_id=run_id,
                number=optuna_number,
                generation=generation,
                state="RUNNING",
                attempts=1,
                method=recipe.method,
                recipe_json=recipe.to_json(),
                recipe_hash=recipe.hash,
                worker=worker,
                started_at=_now(),
            )
            retry = {
                name: insert.excluded[name]
                for name in ("run_id", "generation", "method", "recipe_json", "recipe_hash")
            }
            retry |= {name: None for name in _RESULT_FIELDS}
            upsert = insert.on_conflict_do_update(
                index_elements=[trials.c.study_id, trials.c.number],
                set_={
                    **retry,
                    "state": "RUNNING",
                    "attempts": trials.c.attempts + 1,
                    "worker": insert.excluded.worker,
                    "started_at": insert.excluded.started_at,
                },
            ).returning(trials.c.attempts)
            return conn.execute(upsert).scalar_one()

    def record_attempt(self, study: str, optuna_number: int) -> None:
        """Trial `optuna_number` runs again (its worker died): one more attempt, no result."""
        values: dict[str, Any] = dict.fromkeys(_RESULT_FIELDS)
        values |= {"state": "RUNNING", "attempts": trials.c.attempts + 1, "started_at": _now()}
        self._update_trial(study, optuna_number, values)

    def record_trial_finished(
        self,
        study: str,
        optuna_number: int,
        state: Literal["COMPLETE", "FAIL", "PRUNED"],
        metrics: Mapping[str, float] | None = None,
        fitness: float | None = None,
        build_seconds: float | None = None,
        eval_seconds: float | None = None,
        worker: str | None = None,
        error: str | None = None,
    ) -> str:
        """Record a trial's result; returns the state stored.

        A non-finite fitness is stored as NULL with the reason in `error`, and a COMPLETE
        trial with one, or with none, becomes FAIL, as Optuna's `tell` does, so it can never
        rank as best.
        """
        _check(state, TRIAL_STATES[1:], "finished trial state")
        clean, notes = _finite_metrics(metrics, "search")
        if fitness is not None and not math.isfinite(fitness):
            notes.append(f"fitness is {fitness}")
            fitness = None
        elif state == "COMPLETE" and fitness is None:
            notes.append("COMPLETE without a fitness")
        if state == "COMPLETE" and fitness is None:
            state = "FAIL"
        values: dict[str, Any] = {
            "state": state,
            "metrics": clean,
            "fitness": None if state == "FAIL" else fitness,
            "build_seconds": build_seconds,
            "eval_seconds": eval_seconds,
            "error": "; ".join([e for e in (error, *notes) if e]) or None,
            "finished_at": _now(),
        }
        if worker is not None:
            values["worker"] = worker
        self._update_trial(study, optuna_number, values)
        return state

    def record_heldout(
        self,
        study: str,
        optuna_number: int,
        metrics: Mapping[str, float] | None,
        fitness: float | None,
    ) -> None:
        """Record the held-out re-score of a trial; NaN is stored as NULL, noted in `error`."""
        clean, notes = _finite_metrics(metrics, "held-out")
        if fitness is not None and not math.isfinite(fitness):
            notes.append(f"held-out fitness is {fitness}")
            fitness = None
        values: dict[str, Any] = {"heldout_metrics": clean, "heldout": fitness}
        if notes:
            note = "; ".join(notes)
            values["error"] = sa.func.coalesce(trials.c.error + "; ", "") + note
        self._update_trial(study, optuna_number, values)

    def _update_trial(self, study: str, number: int, values: dict[str, Any]) -> None:
        with self._tx(write=True) as conn:
            study_id = self._study_id(conn, study)
            result = conn.execute(
                sa.update(trials)
                .where(trials.c.study_id == study_id, trials.c.number == number)
                .values(**values)
            )
        if result.rowcount == 0:
            raise UnknownTrialError(
                f"trial {number} of study {study!r} was never recorded as started"
            )

    def trial(self, study: str, optuna_number: int) -> TrialRow | None:
        with self._tx(write=False) as conn:
            study_id = self._study_id(conn, study)
            row = conn.execute(
                queries.trial_select().where(
                    trials.c.study_id == study_id, trials.c.number == optuna_number
                )
            ).first()
        return None if row is None else TrialRow(**row._mapping)

    def trials(
        self,
        study: str,
        *,
        state: str | None = None,
        order_by: Literal["number", "fitness"] = "number",
        offset: int = 0,
        limit: int | None = None,
    ) -> list[TrialRow]:
        """A study's trials (one page with `limit`), by number or best fitness first (no
        fitness last)."""
        _check(order_by, ("number", "fitness"), "order_by")
        with self._tx(write=False) as conn:
            query = queries.trial_select().where(trials.c.study_id == self._study_id(conn, study))
            if state is not None:
                query = query.where(trials.c.state == state)
            if order_by == "fitness":
                query = query.order_by(trials.c.fitness.desc().nulls_last(), trials.c.number)
            else:
                query = query.order_by(trials.c.number)
            rows = conn.execute(query.offset(offset).limit(limit)).all()
        return [TrialRow(**row._mapping) for row in rows]

    def count_trials(self, study: str, state: str | None = None) -> int:
        with self._tx(write=False) as conn:
            query = (
                sa.select(sa.func.count())
                .select_from(trials)
                .where(trials.c.study_id == self._study_id(conn, study))
            )
            if state is not None:
                query = query.where(trials.c.state == state)
            return conn.execute(query).scalar_one()

    def best(
        self,
        study: str | None = None,
        *,
        top: int = 5,
        method: str | None = None,
        task: str | None = None,
        min_heldout: float | None = None,
        by: Literal["fitness", "heldout"] = "fitness",
    ) -> list[TrialRow]:
        """The best COMPLETE trials of one study, or of all studies when `study` is None.

        Ranked by fitness (`by="fitness"`) or held-out fitness (`by="heldout"`); with `task`,
        by that task's metric on the same split instead, skipping trials without it.
        `method` keeps one merge method; `min_heldout` keeps held-out fitness >= it.
        """
        with self._tx(write=False) as conn:
            study_id = None if study is None else self._study_id(conn, study)
            query = queries.best_select(
                study_id, top=top, method=method, task=task, min_heldout=min_heldout, by=by
            )
            rows = conn.execute(query).all()
        return [TrialRow(**row._mapping) for row in rows]

    # Fusion jobs (FuseLLM): beside the studies, with their per-step losses

    def create_fusion_job(self, name: str, config_yaml: str, out_dir: str) -> FusionJobInfo:
        """Register a new fusion job (status `created`); `StudyExistsError` if the name is
        taken."""
        now = _now()
        info = FusionJobInfo(name, config_yaml, "created", out_dir, None, None, now, now)
        try:
            with self._tx(write=True) as conn:
                conn.execute(sa.insert(fusion_jobs).values(**asdict(info)))
        except IntegrityError as e:
            raise StudyExistsError(f"fusion job {name!r} already exists in {self.url}") from e
        return info

    def fusion_job(
        self, name: str, *, missing_ok: bool = False, stale_after_s: float | None = None
    ) -> FusionJobInfo | None:
        """One job; with `stale_after_s`, a `running` one whose process stopped heartbeating
        is shown as `interrupted` (as `list_studies` shows a study)."""
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(fusion_jobs).where(fusion_jobs.c.name == name)).first()
        if row is None:
            if missing_ok:
                return None
            raise UnknownStudyError(f"no fusion job named {name!r} in {self.url}")
        return _fusion_job(row, stale_after_s)

    def list_fusion_jobs(self, *, stale_after_s: float | None = None) -> list[FusionJobInfo]:
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(fusion_jobs).order_by(fusion_jobs.c.id)).all()
        return [_fusion_job(r, stale_after_s) for r in rows]

    def claim_fusion_job(self, name: str, pid: int, host: str, stale_after_s: float) -> None:
        """Take a job's lease and mark it `running`, as `start_run` does for a study:
        `StudyBusyError` while another process runs it (two would train into one folder)."""
        with self._tx(write=True) as conn:
            query = sa.select(fusion_jobs).where(fusion_jobs.c.name == name).with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise UnknownStudyError(f"no fusion job named {name!r} in {self.url}")
            now = _now()
            held = row.status == "running" and row.heartbeat_at is not None
            if held and _lease_held(row.heartbeat_at, row.pid, row.host, host, now, stale_after_s):
                age = (now - row.heartbeat_at).total_seconds()
                raise StudyBusyError(
                    f"fusion job {name!r} is already being run by pid {row.pid} on {row.host} "
                    f"(last heartbeat {age:.1f} s ago); stop that process (Ctrl-C, SIGTERM), or "
                    f"if it is dead, retry once its heartbeat is {stale_after_s:g} s old"
                )
            conn.execute(
                sa.update(fusion_jobs)
                .where(fusion_jobs.c.id == row.id)
                .values(
                    status="running",
                    error=None,
                    pid=pid,
                    host=host,
                    heartbeat_at=now,
                    stop_request=None,  # a Stop pressed while no process ran it
                    updated_at=now,
                )
            )

    def fusion_heartbeat(self, name: str, pid: int) -> bool:
        """Say the job's process `pid` is alive, and learn whether it is asked to stop;
        `LeaseLostError` if it no longer runs the job."""
        ours = (fusion_jobs.c.name == name, fusion_jobs.c.pid == pid)
        with self._tx(write=True) as conn:
            result = conn.execute(
                sa.update(fusion_jobs)
                .where(*ours, fusion_jobs.c.status == "running")
                .values(heartbeat_at=_now())
            )
            if result.rowcount != 1:
                raise LeaseLostError(f"fusion job {name!r} is no longer run by pid {pid}")
            query = sa.select(fusion_jobs.c.stop_request).where(*ours)
            return conn.execute(query).scalar() is not None

    def request_fusion_stop(self, name: str) -> None:
        """Ask the job's process to stop (it resumes from its last checkpoint)."""
        with self._tx(write=True) as conn:
            result = conn.execute(
                sa.update(fusion_jobs)
                .where(fusion_jobs.c.name == name)
                .values(stop_request="stop", updated_at=_now())
            )
        if result.rowcount == 0:
            raise UnknownStudyError(f"no fusion job named {name!r} in {self.url}")

    def set_fusion_job(
        self,
        name: str,
        status: str,
        *,
        error: str | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ) -> None:
        """A job's status, with the error that failed it or the evaluation that ended it."""
        _check(status, FUSION_STATUSES, "status")
        values: dict[str, Any] = {"status": status, "error": error, "updated_at": _now()}
        if evaluation is not None:
            values["evaluation"] = dict(evaluation)
        with self._tx(write=True) as conn:
            done = conn.execute(
                sa.update(fusion_jobs).where(fusion_jobs.c.name == name).values(**values)
            )
        if done.rowcount == 0:
            raise UnknownStudyError(f"no fusion job named {name!r} in {self.url}")

    def record_fusion_steps(self, name: str, steps: list[Mapping[str, float]]) -> None:
        """The losses of `steps` (dicts with step, loss, clm, fusion), replacing any stored for
        those steps or later: a resumed job re-runs the steps after its last checkpoint."""
        if not steps:
            return
        first = min(int(s["step"]) for s in steps)
        with self._tx(write=True) as conn:
            job = conn.execute(
                sa.select(fusion_jobs.c.id).where(fusion_jobs.c.name == name)
            ).scalar()
            if job is None:
                raise UnknownStudyError(f"no fusion job named {name!r} in {self.url}")
            conn.execute(
                sa.delete(fusion_steps).where(
                    fusion_steps.c.job_id == job, fusion_steps.c.step >= first
                )
            )
            rows = [
                {"job_id": job, **{k: s[k] for k in ("step", "loss", "clm", "fusion")}}
                for s in steps
            ]
            conn.execute(sa.insert(fusion_steps), rows)

    def fusion_steps(self, name: str) -> list[dict[str, float]]:
        """Every recorded step of a job, in order."""
        query = (
            sa.select(
                fusion_steps.c.step, fusion_steps.c.loss, fusion_steps.c.clm, fusion_steps.c.fusion
            )
            .join(fusion_jobs, fusion_jobs.c.id == fusion_steps.c.job_id)
            .where(fusion_jobs.c.name == name)
            .order_by(fusion_steps.c.step)
        )
        with self._tx(write=False) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
