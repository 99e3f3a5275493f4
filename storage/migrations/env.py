"""Alembic environment for evomerge's tables only.

`Store.migrate()` passes its open write transaction in `config.attributes["connection"]`;
the `alembic` command line (`alembic -c storage/alembic.ini ...`) opens one from
`sqlalchemy.url` or `EVOMERGE_STORAGE`. Optuna's tables and its `alembic_version` table are
outside this environment: autogenerate ignores every name without the `evomerge_` prefix.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from storage.db import default_storage_url, make_engine, transaction
from storage.schema import PREFIX, VERSION_TABLE, metadata


def _ours(name: str | None, type_: str, _parent: Any) -> bool:
    return type_ != "table" or (name or "").startswith(PREFIX)


def _run(conn: Connection) -> None:
    context.configure(
        connection=conn,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=_ours,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    conn = context.config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or default_storage_url())
    try:
        with transaction(engine, write=True) as conn:
            _run(conn)
    finally:
        engine.dispose()


_main()
