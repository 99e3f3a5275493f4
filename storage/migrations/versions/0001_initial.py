"""Studies, runs and trials.

Revision ID: 0001
Revises:
Create Date: 2025-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.schema import UTCDateTime, json_type

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evomerge_studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("optuna_study_name", sa.String(512), nullable=False),
        sa.Column("config_yaml", sa.Text, nullable=False),
        sa.Column("budget_trials", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stop_request", sa.String(16)),
        sa.Column("stop_requested_at", UTCDateTime),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_studies"),
        sa.UniqueConstraint("name", name="uq_evomerge_studies_name"),
    )
    op.create_table(
        "evomerge_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("heartbeat_at", UTCDateTime, nullable=False),
        sa.Column("ended_at", UTCDateTime),
        sa.Column("exit_reason", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_runs"),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["evomerge_studies.id"],
            name="fk_evomerge_runs_study_id_evomerge_studies",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_evomerge_runs_study_id", "evomerge_runs", ["study_id"])
    op.create_table(
        "evomerge_trials",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, nullable=False),
        sa.Column("run_id", sa.Integer),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("generation", sa.Integer),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("recipe_json", sa.Text, nullable=False),
        sa.Column("recipe_hash", sa.String(64), nullable=False),
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
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_trials"),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["evomerge_studies.id"],
            name="fk_evomerge_trials_study_id_evomerge_studies",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["evomerge_runs.id"],
            name="fk_evomerge_trials_run_id_evomerge_runs",
            ondelete="SET NULL",
        ),
        sa.UniqueConstraint("study_id", "number", name="uq_evomerge_trials_study_id_number"),
    )
    op.create_index("ix_evomerge_trials_method", "evomerge_trials", ["method"])
    op.create_index("ix_evomerge_trials_recipe_hash", "evomerge_trials", ["recipe_hash"])
    op.create_index("ix_evomerge_trials_study_id_state", "evomerge_trials", ["study_id", "state"])
    op.create_index(
        "ix_evomerge_trials_study_id_fitness", "evomerge_trials", ["study_id", "fitness"]
    )


def downgrade() -> None:
    op.drop_table("evomerge_trials")
    op.drop_table("evomerge_runs")
    op.drop_table("evomerge_studies")
