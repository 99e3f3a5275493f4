"""Read queries the dashboard needs beyond `Store`: narrow rows for big studies.

`Store.trials` returns whole rows, recipe JSON included, in two orders. A study page of a
10,000-trial study needs a sortable page of a few columns, and every trial's state, score
and time for the charts and generation counts; these read only the columns they show.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from storage import UnknownStudyError
from storage.db import transaction
from storage.queries import reasked
from storage.schema import studies, trials


@dataclass(frozen=True)
class TrialLine:
    """One row of the trials table."""

    number: int
    state: str
    generation: int | None
    fitness: float | None
    heldout: float | None
    build_seconds: float | None
    eval_seconds: float | None
    worker: str | None
    started_at: datetime
    finished_at: datetime | None


class Point(NamedTuple):
    """One trial as the charts and the generation counts see it (a tuple: there are many)."""

    number: int
    generation: int | None
    state: str
    fitness: float | None  # None for a failed or running trial
    finished_s: float | None  # seconds since the Unix epoch; None while running
    reasked: bool  # a FAIL cut short by a stop or a crash, its parameters asked again


class epoch_seconds(FunctionElement[float]):
    """A timestamp as seconds since the epoch, computed by the database: reading 10,000
    floats is several times faster than parsing 10,000 datetimes in Python."""

    type = sa.Float()
    inherit_cache = True


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    return f"((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0)"


@compiles(epoch_seconds, "postgresql")
def _epoch_postgresql(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    return f"EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)})"


SORTABLE = (
    "number",
    "state",
    "generation",
    "fitness",
    "heldout",
    "build_seconds",
    "eval_seconds",
    "finished_at",
)
_LINE_COLUMNS = [trials.c[f.name] for f in fields(TrialLine)]


class Queries:
    """The dashboard's own reads, on an engine of the study database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _study_id(self, conn: Connection, study: str) -> int:
        study_id = conn.execute(sa.select(studies.c.id).where(studies.c.name == study)).scalar()
        if study_id is None:
            raise UnknownStudyError(f"no study named {study!r}")
        return study_id

    def page(
        self, study: str, *, sort: str, descending: bool, offset: int, limit: int
    ) -> list[TrialLine]:
        """One page of trials sorted by a `SORTABLE` column, empty values last."""
        if sort not in SORTABLE:
            raise ValueError(f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE)}")
        column = trials.c[sort]
        order = (column.desc() if descending else column.asc()).nulls_last()
        with transaction(self.engine, write=False) as conn:
            query = (
                sa.select(*_LINE_COLUMNS)
                .where(trials.c.study_id == self._study_id(conn, study))
                .order_by(order, trials.c.number)
                .offset(offset)
                .limit(limit)
            )
            return [TrialLine(**row._mapping) for row in conn.execute(query)]

    def points(self, study: str) -> list[Point]:
        """Every trial, by number, in six columns: one pass feeds every chart and count
        (each row read costs a B-tree seek, so the study page reads the trials once)."""
        with transaction(self.engine, write=False) as conn:
            query = (
                sa.select(
                    trials.c.number,
                    trials.c.generation,
                    trials.c.state,
                    trials.c.fitness,
                    epoch_seconds(trials.c.finished_at),
                    (trials.c.state == "FAIL") & reasked(trials.c.error),
                )
                .where(trials.c.study_id == self._study_id(conn, study))
                .order_by(trials.c.number)
            )
            return [Point._make(row) for row in conn.execute(query).all()]
