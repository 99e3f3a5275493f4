"""Database fixtures: every storage test runs on SQLite and on PostgreSQL.

Each PostgreSQL test gets a fresh schema (the URL's `search_path`), dropped afterwards, in
the database at `EVOMERGE_TEST_PG`, so tests never see each other's tables. If PostgreSQL
is unreachable its tests fail with a message saying so, unless `EVOMERGE_SKIP_PG=1`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from storage import Store

PG_URL = os.environ.get("EVOMERGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    """An engine on the test PostgreSQL database, for creating and dropping schemas."""
    if os.environ.get("EVOMERGE_SKIP_PG") == "1":
        pytest.skip("PostgreSQL tests skipped: EVOMERGE_SKIP_PG=1")
    engine = sa.create_engine(PG_URL, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as e:
        pytest.fail(
            f"PostgreSQL is unreachable at {PG_URL} ({str(e.orig).strip()}). Start it, point "
            "EVOMERGE_TEST_PG at one, or set EVOMERGE_SKIP_PG=1 to skip its tests.",
            pytrace=False,
        )
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema (Optuna's and evomerge's tables go there)."""
    schema = f"evomerge_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with pg_admin.begin() as conn:
        conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty database: a SQLite file in a temporary folder, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'evomerge.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A migrated `Store` on `db_url`."""
    with Store(db_url) as s:
        s.migrate()
        yield s
