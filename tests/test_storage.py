"""The SQL store on real SQLite and PostgreSQL databases (see tests/fixtures_db.py)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.recipe import Recipe
from storage import (
    REASKED,
    RUN_INTERRUPTED,
    LeaseLostError,
    SchemaError,
    StorageLockedError,
    StorageUnavailableError,
    Store,
    StudyBusyError,
    StudyExistsError,
    UnknownStudyError,
    UnknownTrialError,
)
from storage.schema import PREFIX, VERSION_TABLE, metadata

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Forked children open their own Store and exit with os._exit, so the parent's pooled
# connections are never touched by them; fork keeps the multi-process tests fast.
FORK = multiprocessing.get_context("fork")


def recipe(weight: float = 0.5, method: str = "linear") -> Recipe:
    return Recipe(
        method=method,
        sources=("a", "b"),
        groups=("embed", "layers.0"),
        params={"weight": ((weight, 1 - weight), (weight, 1 - weight))},
    )


def add_study(store: Store, name: str = "s", budget: int | None = 10) -> None:
    store.create_study(name, f"name: {name}\n", optuna_study_name=name, budget_trials=budget)


def complete(
    store: Store,
    study: str,
    number: int,
    fitness: float,
    *,
    method: str = "linear",
    metrics: dict[str, float] | None = None,
    heldout: float | None = None,
) -> None:
    store.record_trial_started(study, None, number, 0, recipe(number / 100, method), "w0")
    store.record_trial_finished(
        study, number, "COMPLETE", metrics or {"task": fitness}, fitness, 1.0, 2.0
    )
    if heldout is not None:
        store.record_heldout(study, number, {"task": heldout}, heldout)


# Schema and migrations


def test_a_database_of_the_first_schema_upgrades_keeping_its_studies(db_url: str) -> None:
    """A store written before fusion jobs existed (revision 0001) gains their tables."""
    from alembic import command
    from alembic.config import Config

    from storage.db import MIGRATIONS

    engine = sa.create_engine(db_url, poolclass=NullPool)
    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    engine.dispose()
    with Store(db_url) as store:
        add_study(store)
        store.migrate()
        assert store.get_study("s").status == "created"
        store.create_fusion_job("f", "name: f\n", "/tmp/f")
        store.record_fusion_steps("f", [{"step": 1, "loss": 2.0, "clm": 2.5, "fusion": 1.5}])
        assert store.fusion_steps("f") == [{"step": 1, "loss": 2.0, "clm": 2.5, "fusion": 1.5}]
        store.claim_fusion_job("f", os.getpid(), socket.gethostname(), stale_after_s=60)
        assert store.fusion_job("f").pid == os.getpid()  # and a fusion job's lease (0003)


def test_status_says_a_silent_run_is_interrupted(db_url: str) -> None:
    """A coordinator (and a fusion job) SIGKILLed an hour ago: `evomerge status` says
    interrupted, as the dashboard does, not running forever."""
    from storage.schema import fusion_jobs, runs

    with Store(db_url) as store:
        store.migrate()
        add_study(store, "killed")
        store.start_run("killed", 1, "h", stale_after_s=60)
        store.create_fusion_job("fused", "name: fused\n", "/runs/fused")
        store.claim_fusion_job("fused", 2, "h", stale_after_s=60)
        store.record_fusion_steps("fused", [{"step": 1, "loss": 2.0, "clm": 2.5, "fusion": 1.5}])
    engine = sa.create_engine(db_url, poolclass=NullPool)
    with engine.begin() as conn:
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        conn.execute(sa.update(runs).values(heartbeat_at=hour_ago))
        conn.execute(sa.update(fusion_jobs).values(heartbeat_at=hour_ago))
    engine.dispose()
    shown = CliRunner().invoke(app, ["status", "--storage", db_url, "--json"])
    assert shown.exit_code == 0, shown.output
    listed = json.loads(shown.output)
    assert [s["status"] for s in listed["studies"]] == ["interrupted"]
    (job,) = listed["fusion_jobs"]
    assert (job["name"], job["status"], job["steps"], job["pid"]) == ("fused", "interrupted", 1, 2)
    table = CliRunner().invoke(app, ["status", "fused", "--storage", db_url])
    assert table.exit_code == 0 and "interrupted" in table.output and "pid 2 on h" in table.output


def test_fusion_jobs_keep_status_evaluation_and_the_steps_of_a_resumed_run(db_url: str) -> None:
    with Store(db_url) as store:
        store.migrate()
        store.create_fusion_job("f", "name: f\n", "/runs/f")
        with pytest.raises(StudyExistsError, match="fusion job 'f' already exists"):
            store.create_fusion_job("f", "name: f\n", "/runs/f")
        steps = [{"step": i, "loss": 3.0 - i, "clm": 3.0, "fusion": 2.0} for i in range(1, 5)]
        store.record_fusion_steps("f", steps)
        # killed after step 4, resumed from the step-2 checkpoint: steps 3 on are run again
        again = [{"step": i, "loss": 9.0, "clm": 3.0, "fusion": 2.0} for i in range(3, 6)]
        store.record_fusion_steps("f", again)
        assert [(s["step"], s["loss"]) for s in store.fusion_steps("f")] == [
            (1, 2.0),
            (2, 1.0),
            (3, 9.0),
            (4, 9.0),
            (5, 9.0),
        ]
        store.set_fusion_job("f", "finished", evaluation={"fused": {"add": 0.5}})
        job = store.fusion_job("f")
        assert job.status == "finished" and job.evaluation == {"fused": {"add": 0.5}}
        assert [j.name for j in store.list_fusion_jobs()] == ["f"]
        with pytest.raises(ValueError, match="status"):
            store.set_fusion_job("f", "dancing")
        assert store.fusion_job("nope", missing_ok=True) is None


def test_migrate_is_idempotent_and_matches_schema(db_url: str) -> None:
    with Store(db_url) as store:
        store.migrate()
        store.migrate()
        add_study(store)
        store.migrate()
        assert store.get_study("s").status == "created"
    engine = sa.create_engine(db_url, poolclass=NullPool)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert tables == {VERSION_TABLE, *metadata.tables}, "only evomerge_ tables, no others"
        version = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
        assert version == [("0003",)]
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": VERSION_TABLE,
                "compare_type": True,
                "include_name": lambda name, type_, _p: type_ != "table" or name.startswith(PREFIX),
            },
        )
        assert compare_metadata(context, metadata) == []
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with Store(db_url) as store, pytest.raises(SchemaError, match="newer evomerge"):
        store.migrate()


def test_unmigrated_database_says_to_migrate(db_url: str) -> None:
    with Store(db_url) as store, pytest.raises(SchemaError, match=r"migrate\(\)"):
        add_study(store)


@pytest.mark.parametrize("optuna_first", [True, False], ids=["optuna-first", "evomerge-first"])
def test_optuna_tables_coexist(db_url: str, optuna_first: bool) -> None:
    with Store(db_url) as store:
        if not optuna_first:
            store.migrate()
        study = optuna.create_study(storage=db_url, study_name="s", direction="maximize")
        store.migrate()
        add_study(store)
        for value in (0.25, 0.75):
            trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            complete(store, "s", trial.number, value)
            study.tell(trial, value)
        tuned = optuna.create_study(storage=store.optuna_storage(), study_name="t")
        tuned.tell(tuned.ask(), 1.0)

    loaded = optuna.load_study(study_name="s", storage=db_url)
    assert loaded.best_value == 0.75 and len(loaded.trials) == 2
    with Store(db_url) as store:
        assert [t.fitness for t in store.best("s")] == [0.75, 0.25]

    def get(path: str) -> dict:
        environ = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, _h, _e=None: status.append(s)))
        assert status == ["200 OK"], body[:500]
        return json.loads(body)

    from optuna_dashboard import wsgi

    app = wsgi(db_url)
    names = {s["study_name"]: s["study_id"] for s in get("/api/studies")["study_summaries"]}
    assert set(names) == {"s", "t"}
    assert len(get(f"/api/studies/{names['s']}")["trials"]) == 2


# Bad URLs and locks


def test_bad_url_gives_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    not_a_db = tmp_path / "config.yaml"
    not_a_db.write_text("name: demo\n")
    cases = {
        "not a url": "bad storage URL",
        "nosuchdialect://x/y": "unsupported storage URL",
        "mysql://u@h/db": "unsupported storage URL",
        "sqlite://": "in-memory SQLite",
        "sqlite:///:memory:": "in-memory SQLite",
        f"sqlite:///{tmp_path}/missing/dir/x.db": "cannot open storage",
        f"sqlite:///{not_a_db}": "not a SQLite database",
        "postgresql+psycopg://postgres@127.0.0.1:1/test": "cannot open storage",
        "postgresql+psycopg://u:secret@127.0.0.1:1/test": r"u:\*\*\*@",
    }
    for url, message in cases.items():
        with pytest.raises(StorageUnavailableError, match=message) as err:
            Store(url, busy_timeout_s=0.2)
        assert "secret" not in str(err.value)
    assert not (tmp_path / "missing").exists()
    assert not_a_db.read_text() == "name: demo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@contextmanager
def write_lock(url: str) -> Iterator[None]:
    """Another connection holding the write lock: readers may go on, writers must wait."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn = sqlite3.connect(parsed.database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.rollback()
            conn.close()
        return
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as conn, conn.begin() as tx:
        tables = ", ".join(metadata.tables)
        conn.execute(sa.text(f"LOCK TABLE {tables} IN EXCLUSIVE MODE"))
        yield
        tx.rollback()
    engine.dispose()


def test_locked_database_gives_clear_error_and_changes_nothing(store: Store, db_url: str) -> None:
    add_study(store)
    run_id = store.start_run("s", 1, "h", stale_after_s=0.01)
    complete(store, "s", 0, 0.5)
    store.record_trial_started("s", run_id, 1, 0, recipe(), "w0")

    def snapshot(s: Store) -> tuple:
        return (s.get_study("s"), s.runs("s"), s.trials("s"), s.list_studies())

    before = snapshot(store)
    writes = {
        "create_study": lambda s: add_study(s, "t"),
        "start_run": lambda s: s.start_run("s", 2, "h", stale_after_s=0.01),
        "heartbeat": lambda s: s.heartbeat(run_id),
        "record_trial_started": lambda s: s.record_trial_started("s", None, 2, 0, recipe(), "w"),
        "record_trial_finished": lambda s: s.record_trial_finished("s", 1, "COMPLETE", {}, 1.0),
        "request_stop": lambda s: s.request_stop("s", "cancel"),
    }
    with Store(db_url, busy_timeout_s=0.2) as blocked, write_lock(db_url):
        for name, write in writes.items():
            with pytest.raises(StorageLockedError, match=r"is locked.*Nothing was changed"):
                write(blocked)
            assert snapshot(blocked) == before, f"{name} changed something while locked"
    assert snapshot(store) == before


def test_exclusively_locked_sqlite_file_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "evomerge.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE other (x INTEGER)")
    with pytest.raises(StorageLockedError, match="is locked"):
        Store(f"sqlite:///{path}", busy_timeout_s=0.2)
    holder.rollback()
    assert holder.execute("SELECT name FROM sqlite_master").fetchall() == []
    holder.close()


# Studies and stop requests


def test_studies_and_summaries(store: Store, db_url: str) -> None:
    add_study(store, "a", budget=5)
    with pytest.raises(StudyExistsError, match="'a' already exists"):
        add_study(store, "a")
    add_study(store, "b", budget=None)
    assert store.get_study("zz", missing_ok=True) is None
    with pytest.raises(UnknownStudyError):
        store.get_study("zz")
    with pytest.raises(UnknownStudyError):
        store.set_study_status("zz", "finished")
    with pytest.raises(ValueError, match="study status"):
        store.set_study_status("a", "done")

    run_id = store.start_run("a", 1, "h", stale_after_s=60)
    complete(store, "a", 0, 0.25)
    complete(store, "a", 1, 0.5)
    store.record_trial_started("a", run_id, 2, 1, recipe(), "w0")
    store.record_trial_finished("a", 2, "FAIL", None, None, error="worker died")
    for number, why in ((4, f"cancelled; {REASKED}"), (5, RUN_INTERRUPTED), (6, None)):
        store.record_trial_started("a", run_id, number, 1, recipe(), "w0")
        store.record_trial_finished("a", number, "FAIL", None, None, error=why)
    store.record_trial_started("a", run_id, 3, 1, recipe(), "w0")
    a, b = store.list_studies()  # failed: 2 and 6; 4 and 5 were only interrupted
    assert (a.name, a.status, a.trials_done, a.trials_running) == ("a", "running", 6, 1)
    assert (a.trials_complete, a.trials_failed) == (2, 2)
    assert (a.budget_trials, a.best_fitness, a.stop_request) == (5, 0.5, None)
    assert a.last_activity >= a.last_heartbeat >= a.created_at
    shown = CliRunner().invoke(app, ["status", "--storage", db_url], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if " a " in line)
    assert [c.strip() for c in row.split("│")[3:5]] == ["2/5", "2"], shown.output  # of the budget
    assert (b.name, b.status, b.trials_done, b.best_fitness, b.budget_trials) == (
        "b",
        "created",
        0,
        None,
        None,
    )
    time.sleep(0.1)
    assert store.list_studies(stale_after_s=0.05)[0].status == "interrupted"
    store.end_run(run_id, "finished", "budget reached")
    store.set_study_status("a", "finished")
    assert store.get_study("a").status == "finished"
    assert store.get_study("a").config_yaml == "name: a\n"


def test_stop_requests(store: Store) -> None:
    add_study(store)
    assert store.stop_request("s") is None
    store.request_stop("s", "stop")
    assert store.stop_request("s") == "stop"
    store.request_stop("s", "cancel")
    store.request_stop("s", "stop")
    assert store.stop_request("s") == "cancel", "a later stop must not weaken a cancel"
    assert store.list_studies()[0].stop_request == "cancel"
    store.clear_stop_request("s")
    assert store.stop_request("s") is None
    store.request_stop("s")
    started = datetime.now(UTC)
    store.start_run("s", 1, "h", stale_after_s=60, since=started)
    assert store.stop_request("s") is None, "a new run starts without an old stop request"
    add_study(store, "t")
    started = datetime.now(UTC)
    store.request_stop("t", "cancel")  # pressed while the run's process starts up
    store.start_run("t", 2, "h", stale_after_s=60, since=started)
    assert store.stop_request("t") == "cancel", "a stop made during start-up is the run's own"
    with pytest.raises(ValueError, match="stop mode"):
        store.request_stop("s", "kill")
    with pytest.raises(UnknownStudyError):
        store.stop_request("zz")


# Trials


def test_trial_retry_is_idempotent(store: Store) -> None:
    add_study(store)
    run_id = store.start_run("s", 1, "h", stale_after_s=60)
    assert store.record_trial_started("s", run_id, 7, 2, recipe(0.3), "w0") == 1
    store.record_trial_finished("s", 7, "FAIL", None, None, 1.5, None, "w0", "CUDA OOM")
    assert store.record_trial_started("s", run_id, 7, 2, recipe(0.3), "w1") == 2
    (row,) = store.trials("s")
    assert (row.number, row.state, row.attempts, row.worker) == (7, "RUNNING", 2, "w1")
    assert (row.error, row.build_seconds, row.finished_at) == (None, None, None)
    store.record_trial_finished("s", 7, "COMPLETE", {"task": 0.9}, 0.9, 1.0, 2.0)
    row = store.trial("s", 7)
    assert (row.state, row.fitness, row.metrics, row.worker) == (
        "COMPLETE",
        0.9,
        {"task": 0.9},
        "w1",
    )
    assert (row.build_seconds, row.eval_seconds, row.run_id, row.generation) == (
        1.0,
        2.0,
        run_id,
        2,
    )
    assert Recipe.from_json(row.recipe_json) == recipe(0.3)
    assert (row.recipe_hash, row.method) == (recipe(0.3).hash, "linear")
    assert store.count_trials("s") == 1
    assert store.trial("s", 8) is None
    with pytest.raises(UnknownTrialError, match="never recorded"):
        store.record_trial_finished("s", 8, "COMPLETE", None, 1.0)
    with pytest.raises(UnknownTrialError):
        store.record_heldout("s", 8, None, 1.0)
    with pytest.raises(UnknownStudyError):
        store.record_trial_started("zz", None, 0, 0, recipe(), None)
    with pytest.raises(ValueError, match="trial state"):
        store.record_trial_finished("s", 7, "RUNNING", None, None)


def test_best_filters_and_ordering(store: Store) -> None:
    add_study(store, "a")
    add_study(store, "b")
    complete(store, "a", 0, 0.6, metrics={"arc.easy": 0.1, "gsm": 0.9}, heldout=0.5)
    complete(store, "a", 1, 0.8, method="ties", metrics={"arc.easy": 0.7}, heldout=0.3)
    complete(store, "a", 2, 0.6, metrics={"arc.easy": 0.4}, heldout=0.6)
    complete(store, "b", 0, 0.7, metrics={"arc.easy": 0.9})
    complete(store, "b", 1, 0.95, method="ties")
    store.record_trial_started("b", None, 2, 0, recipe(), "w0")
    store.record_trial_started("b", None, 3, 0, recipe(), "w0")
    store.record_trial_finished("b", 3, "PRUNED", None, 2.0)

    def ranked(rows: list) -> list[tuple[str, int]]:
        return [(r.study, r.number) for r in rows]

    assert ranked(store.best(top=10)) == [("b", 1), ("a", 1), ("b", 0), ("a", 0), ("a", 2)]
    assert ranked(store.best(top=2)) == [("b", 1), ("a", 1)]
    assert ranked(store.best("a")) == [("a", 1), ("a", 0), ("a", 2)], "ties: earlier first"
    assert ranked(store.best(method="ties")) == [("b", 1), ("a", 1)]
    assert ranked(store.best("a", method="linear", top=1)) == [("a", 0)]
    assert ranked(store.best(task="arc.easy")) == [("b", 0), ("a", 1), ("a", 2), ("a", 0)]
    assert ranked(store.best(task="gsm")) == [("a", 0)]
    assert ranked(store.best(by="heldout")) == [("a", 2), ("a", 0), ("a", 1)]
    assert ranked(store.best(min_heldout=0.4)) == [("a", 0), ("a", 2)]
    assert ranked(store.best(task="task", by="heldout", min_heldout=0.55)) == [("a", 2)]
    assert store.best(method="slerp") == []
    best = store.best("a", top=1)[0]
    assert (best.fitness, best.heldout, best.heldout_metrics) == (0.8, 0.3, {"task": 0.3})
    with pytest.raises(UnknownStudyError):
        store.best("zz")
    with pytest.raises(ValueError, match="by must be"):
        store.best(by="speed")


def test_nan_is_never_stored_as_a_number(store: Store) -> None:
    add_study(store)
    complete(store, "s", 0, 0.1)
    for number, bad in ((1, math.nan), (2, math.inf), (3, -math.inf)):
        store.record_trial_started("s", None, number, 0, recipe(), "w0")
        state = store.record_trial_finished(
            "s", number, "COMPLETE", {"task": bad, "other": 0.5}, bad, 1.0, 2.0, None, "warn"
        )
        row = store.trial("s", number)
        assert state == row.state == "FAIL" and row.fitness is None
        assert row.metrics == {"task": None, "other": 0.5}
        assert row.error.startswith("warn; search metric 'task' is") and "fitness is" in row.error
    store.record_trial_started("s", None, 4, 0, recipe(), "w0")
    assert store.record_trial_finished("s", 4, "COMPLETE", {"task": 0.2}, None) == "FAIL"
    assert store.trial("s", 4).error == "COMPLETE without a fitness"
    store.record_heldout("s", 0, {"task": math.nan}, math.nan)
    row = store.trial("s", 0)
    assert (row.heldout, row.heldout_metrics) == (None, {"task": None})
    assert "held-out fitness is nan" in row.error
    assert [r.number for r in store.best(top=10)] == [0]
    assert store.best(by="heldout") == [] and store.best(task="task", by="heldout") == []
    assert [r.number for r in store.trials("s", order_by="fitness")] == [0, 1, 2, 3, 4]


def test_trials_are_paged(store: Store) -> None:
    add_study(store)
    for number in range(25):
        complete(store, "s", number, (number * 7) % 25 / 25)
    store.record_trial_started("s", None, 25, 0, recipe(), "w0")
    pages = [store.trials("s", offset=o, limit=10) for o in (0, 10, 20)]
    assert [len(p) for p in pages] == [10, 10, 6]
    assert [r.number for p in pages for r in p] == [r.number for r in store.trials("s")]
    assert [r.number for r in store.trials("s")] == list(range(26))
    by_fitness = store.trials("s", order_by="fitness", limit=3)
    assert [r.fitness for r in by_fitness] == [24 / 25, 23 / 25, 22 / 25]
    assert store.trials("s", order_by="fitness", offset=25)[0].fitness is None
    assert [r.number for r in store.trials("s", state="RUNNING")] == [25]
    assert (store.count_trials("s"), store.count_trials("s", "COMPLETE")) == (26, 25)
    assert store.count_trials("s", "FAIL") == 0


# Runs


def test_a_fusion_job_has_a_lease_like_a_run(store: Store) -> None:
    """One process runs a fusion job at a time (two would train into one folder); a job
    whose process went silent is shown interrupted and taken over, at once when its pid is
    gone from this host."""
    store.create_fusion_job("f", "name: f\n", "/runs/f")
    here = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer exists
    store.claim_fusion_job("f", gone.pid, here, stale_after_s=60)
    job = store.fusion_job("f", stale_after_s=60)
    assert (job.status, job.pid, job.host) == ("running", gone.pid, here)
    store.claim_fusion_job("f", os.getpid(), here, stale_after_s=60)  # gone: taken at once
    with pytest.raises(
        StudyBusyError, match=rf"fusion job 'f' is already being run by pid {os.getpid()}"
    ):
        store.claim_fusion_job("f", 2, here + "-elsewhere", stale_after_s=60)
    with pytest.raises(LeaseLostError, match="no longer run by pid 2"):
        store.fusion_heartbeat("f", 2)
    assert store.fusion_heartbeat("f", os.getpid()) is False  # alive, and not asked to stop
    store.request_fusion_stop("f")
    assert store.fusion_heartbeat("f", os.getpid()) is True
    time.sleep(0.3)
    assert store.list_fusion_jobs(stale_after_s=0.2)[0].status == "interrupted"
    assert store.fusion_job("f").status == "running"  # as stored, without a stale limit
    store.claim_fusion_job("f", 2, here + "-elsewhere", stale_after_s=0.2)  # silent: taken
    with pytest.raises(LeaseLostError):
        store.fusion_heartbeat("f", os.getpid())
    store.set_fusion_job("f", "stopped")
    assert store.fusion_job("f", stale_after_s=0.2).status == "stopped"
    store.claim_fusion_job("f", 3, here + "-elsewhere", stale_after_s=60)  # stopped: free
    assert store.fusion_heartbeat("f", 3) is False  # the old request was not this run's
    with pytest.raises(UnknownStudyError):
        store.request_fusion_stop("nope")
    with pytest.raises(UnknownStudyError):
        store.claim_fusion_job("nope", 1, here, stale_after_s=60)


def test_run_lease(store: Store) -> None:
    add_study(store)
    first = store.start_run("s", 101, "host-a", stale_after_s=60)
    store.record_trial_started("s", first, 0, 0, recipe(), "w0")
    complete(store, "s", 1, 0.5)
    with pytest.raises(StudyBusyError, match=r"pid 101 on host-a"):
        store.start_run("s", 202, "host-b", stale_after_s=60)
    store.heartbeat(first)
    time.sleep(0.3)
    with pytest.raises(StudyBusyError):
        store.start_run("s", 202, "host-b", stale_after_s=60)
    second = store.start_run("s", 202, "host-b", stale_after_s=0.2)
    old, new = store.runs("s")
    assert (old.id, old.status, old.exit_reason) == (first, "interrupted", "heartbeat lost")
    assert old.ended_at is not None and (new.id, new.status, new.pid) == (second, "running", 202)
    dead = store.trial("s", 0)
    assert (dead.state, dead.error) == ("FAIL", "run interrupted (heartbeat lost)")
    assert store.trial("s", 1).state == "COMPLETE"
    with pytest.raises(LeaseLostError, match="interrupted"):
        store.heartbeat(first)
    assert store.end_run(first, "finished", "done") is False
    assert store.end_run(second, "stopped", "user stop") is True
    assert [(r.status, r.exit_reason) for r in store.runs("s")] == [
        ("interrupted", "heartbeat lost"),
        ("stopped", "user stop"),
    ]
    third = store.start_run("s", 303, "host-c", stale_after_s=60)
    assert [r.id for r in store.runs("s")] == [first, second, third]
    with pytest.raises(ValueError, match="run end status"):
        store.end_run(third, "running")
    with pytest.raises(UnknownStudyError):
        store.start_run("zz", 1, "h", stale_after_s=60)


def test_a_run_whose_process_is_gone_from_this_host_is_taken_over_at_once(store: Store) -> None:
    add_study(store)
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer exists
    dead = store.start_run("s", gone.pid, socket.gethostname(), stale_after_s=60)
    with pytest.raises(StudyBusyError, match="evomerge stop s"):
        store.start_run("s", 2, socket.gethostname() + "-elsewhere", stale_after_s=60)
    live = store.start_run("s", os.getpid(), socket.gethostname(), stale_after_s=60)
    assert [(r.id, r.status) for r in store.runs("s")] == [(dead, "interrupted"), (live, "running")]
    with pytest.raises(StudyBusyError):  # this process is alive: its run is not taken over
        store.start_run("s", 3, socket.gethostname(), stale_after_s=60)


def test_a_rerun_counts_as_an_attempt(store: Store) -> None:
    add_study(store)
    run_id = store.start_run("s", 1, "h", stale_after_s=60)
    store.record_trial_started("s", run_id, 0, 0, recipe(), "w0")
    store.record_attempt("s", 0)
    row = store.trial("s", 0)
    assert (row.state, row.attempts, row.generation) == ("RUNNING", 2, 0)


def _race_for_lease(url: str, barrier: Any, out: Any) -> None:
    with Store(url) as store:
        barrier.wait()
        try:
            out.put(store.start_run("s", os.getpid(), "host", stale_after_s=60))
        except StudyBusyError:
            out.put(None)
        barrier.wait()  # alive until every contender tried: an exited winner's lease is free


def test_two_processes_racing_for_the_lease_give_one_winner(store: Store, db_url: str) -> None:
    add_study(store)
    contenders = 3
    barrier, out = FORK.Barrier(contenders), FORK.Queue()
    procs = [
        FORK.Process(target=_race_for_lease, args=(db_url, barrier, out)) for _ in range(contenders)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert [(r.id, r.status) for r in store.runs("s")] == [(winners[0], "running")]


def _write_trials(url: str, study: str, worker: int, barrier: Any) -> None:
    with Store(url) as store:
        barrier.wait()
        for number in range(30):
            store.record_trial_started(study, None, number, 0, recipe(number / 30), f"w{worker}")
            store.record_trial_finished(
                study, number, "COMPLETE", {"task": number / 30}, number / 30, 0.1, 0.2
            )
            store.record_trial_started("shared", None, number, 0, recipe(), f"w{worker}")


def test_concurrent_writers_lose_and_duplicate_nothing(store: Store, db_url: str) -> None:
    writers = 3
    for name in ("shared", *(f"s{i}" for i in range(writers))):
        add_study(store, name)
    barrier = FORK.Barrier(writers)
    procs = [
        FORK.Process(target=_write_trials, args=(db_url, f"s{i}", i, barrier))
        for i in range(writers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for i in range(writers):
        rows = store.trials(f"s{i}")
        assert [r.number for r in rows] == list(range(30))
        assert {(r.state, r.attempts, r.worker) for r in rows} == {("COMPLETE", 1, f"w{i}")}
    shared = store.trials("shared")
    assert [r.number for r in shared] == list(range(30))
    assert {r.attempts for r in shared} == {writers}
    assert store.list_studies()[0].trials_running == 30
