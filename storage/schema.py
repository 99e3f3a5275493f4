"""evomerge's tables, beside Optuna's in the same database.

Every name starts with `evomerge_` so the two schemas never collide, and Alembic keeps its
own version table (`VERSION_TABLE`) so Optuna's `alembic_version` is left to Optuna. The
migrations in `storage/migrations/versions` create exactly these tables; a test compares them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

VERSION_TABLE = "evomerge_alembic_version"
PREFIX = "evomerge_"

STUDY_STATUSES = ("created", "running", "stopped", "finished", "failed", "interrupted")
RUN_STATUSES = ("running", "stopped", "finished", "failed", "interrupted")
TRIAL_STATES = ("RUNNING", "COMPLETE", "FAIL", "PRUNED")
STOP_MODES = ("stop", "cancel")
FUSION_STATUSES = ("created", "running", "stopped", "finished", "failed", "interrupted")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone; this restores it)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value} given; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON (JSONB on PostgreSQL); Python None is SQL NULL so `IS NULL` filters work."""
    return sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

studies = sa.Table(
    "evomerge_studies",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("optuna_study_name", sa.String(512), nullable=False),
    sa.Column("config_yaml", sa.Text, nullable=False),
    sa.Column("budget_trials", sa.Integer),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stop_request", sa.String(16)),
    sa.Column("stop_requested_at", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

runs = sa.Table(
    "evomerge_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "study_id",
        sa.Integer,
        sa.ForeignKey("evomerge_studies.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
    sa.Column("ended_at", UTCDateTime),
    sa.Column("exit_reason", sa.Text),
)

trials = sa.Table(
    "evomerge_trials",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "study_id",
        sa.Integer,
        sa.ForeignKey("evomerge_studies.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("evomerge_runs.id", ondelete="SET NULL")),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("generation", sa.Integer),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("method", sa.String(64), nullable=False, index=True),
    sa.Column("recipe_json", sa.Text, nullable=False),
    sa.Column("recipe_hash", sa.String(64), nullable=False, index=True),
    sa.Column("metrics", json_type()),
    sa.Column("fitness", sa.Float),
    sa.Column("heldout_metrics", json_type()),
    sa.Column("heldout", sa.Float),
    sa.Column("build_seconds", sa.Float),
    sa.Column("eval_seconds", sa.Float),
    sa.Column("worker", sa.String(255)),
    sa.Column("error", sa.Text),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.UniqueConstraint("study_id", "number"),
    sa.Index(None, "study_id", "state"),
    sa.Index(None, "study_id", "fitness"),
)

fusion_jobs = sa.Table(
    "evomerge_fusion_jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("config_yaml", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("out_dir", sa.Text, nullable=False),
    sa.Column("evaluation", json_type()),
    sa.Column("error", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # The lease of the process running the job (as a study's run): who, and when it last said so.
    sa.Column("pid", sa.Integer),
    sa.Column("host", sa.String(255)),
    sa.Column("heartbeat_at", UTCDateTime),
    sa.Column("stop_request", sa.String(16)),  # `evomerge stop` or the dashboard's Stop
)

fusion_steps = sa.Table(
    "evomerge_fusion_steps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "job_id",
        sa.Integer,
        sa.ForeignKey("evomerge_fusion_jobs.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("loss", sa.Float, nullable=False),
    sa.Column("clm", sa.Float, nullable=False),
    sa.Column("fusion", sa.Float, nullable=False),
    sa.UniqueConstraint("job_id", "step"),
)
