"""Engines for any SQLAlchemy URL, tuned so several processes can share one database.

SQLite: WAL (readers never wait for the writer), a busy timeout, and transactions that say
up front whether they write: a writing transaction starts with `BEGIN IMMEDIATE`, so it
takes the write lock before reading and cannot deadlock on a lock upgrade, which also makes
it a mutex between processes. PostgreSQL: a `lock_timeout` of the same length, so a stuck
lock holder gives an error instead of a hang.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from storage.errors import StorageUnavailableError

DEFAULT_URL = "sqlite:///evomerge.db"
DEFAULT_BUSY_TIMEOUT_S = 10.0
# An unreachable PostgreSQL host fails after this long instead of the OS's minutes.
CONNECT_TIMEOUT_S = 10
MIGRATIONS = Path(__file__).parent / "migrations"
# Execution option read by the SQLite `begin` hook: this transaction will write.
WRITE = "evomerge_write"
# Any constant: PostgreSQL advisory lock key that serialises concurrent `migrate()` calls.
MIGRATE_LOCK_KEY = 0x65766F6D


def default_storage_url() -> str:
    """`EVOMERGE_STORAGE`, else a SQLite file in the working directory."""
    return os.environ.get("EVOMERGE_STORAGE", DEFAULT_URL)


def parse_url(url: str | URL) -> URL:
    """The parsed URL, or a `StorageUnavailableError` that says what is wrong with it."""
    try:
        return sa.make_url(url)
    except ArgumentError as e:
        raise StorageUnavailableError(
            f"bad storage URL {url!r}: {e} (expected e.g. {DEFAULT_URL} or "
            "postgresql+psycopg://user@host:5432/db)"
        ) from e


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL (None for any other URL)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database.removeprefix("file:"))


def masked(url: str | URL) -> str:
    """`url` with its password hidden: the only form of a URL a message may show."""
    try:
        return parse_url(url).render_as_string(hide_password=True)
    except StorageUnavailableError:
        return "<unparsable storage URL>"


def make_engine(url: str | URL, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url` with evomerge's locking behaviour; connects lazily."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed):
            raise StorageUnavailableError(
                f"in-memory SQLite ({parsed}) cannot be shared between connections, threads "
                "or Optuna; use a file, e.g. sqlite:///evomerge.db"
            )
        kwargs["connect_args"] = {"timeout": busy_timeout_s, "check_same_thread": False}
    elif backend == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError) as e:
        shown = parsed.render_as_string(hide_password=True)
        raise StorageUnavailableError(f"unsupported storage URL {shown}: {e}") from e
    if backend == "sqlite":
        _tune_sqlite(engine, busy_timeout_s)
    elif backend == "postgresql":
        _tune_postgresql(engine, busy_timeout_s)
    return engine


def sqlite_journal(engine: Engine) -> None:
    """WAL with synchronous=NORMAL on every new connection of `engine` (ours and Optuna's).

    A commit then survives any process crash; only an OS crash or power loss can drop the
    last commits. The default, FULL, would fsync each of Optuna's many small commits (one per
    parameter of every trial).
    """

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()


def _tune_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    sqlite_journal(engine)

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own implicit BEGIN (DML only, never DDL) is switched off; `_begin` below
        # emits BEGIN for every transaction, which also makes migrations transactional.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get(WRITE) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def _tune_postgresql(engine: Engine, busy_timeout_s: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {int(busy_timeout_s * 1000)}")
        dbapi_connection.commit()


@contextmanager
def transaction(engine: Engine, *, write: bool) -> Iterator[Connection]:
    """A connection in one transaction, committed on success and rolled back on error."""
    with engine.connect() as conn:
        if write:
            conn.execution_options(**{WRITE: True})
        with conn.begin():
            yield conn


def upgrade_to_head(conn: Connection) -> None:
    """Apply evomerge's migrations inside `conn`'s open write transaction."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    command.upgrade(config, "head")
