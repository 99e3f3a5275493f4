"""Fusion jobs (FuseLLM) and their per-step losses.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.schema import UTCDateTime, json_type

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evomerge_fusion_jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("config_yaml", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("out_dir", sa.Text, nullable=False),
        sa.Column("evaluation", json_type()),
        sa.Column("error", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_fusion_jobs"),
        sa.UniqueConstraint("name", name="uq_evomerge_fusion_jobs_name"),
    )
    op.create_table(
        "evomerge_fusion_steps",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("loss", sa.Float, nullable=False),
        sa.Column("clm", sa.Float, nullable=False),
        sa.Column("fusion", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evomerge_fusion_steps"),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["evomerge_fusion_jobs.id"],
            name="fk_evomerge_fusion_steps_job_id_evomerge_fusion_jobs",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("job_id", "step", name="uq_evomerge_fusion_steps_job_id_step"),
    )


def downgrade() -> None:
    op.drop_table("evomerge_fusion_steps")
    op.drop_table("evomerge_fusion_jobs")
