"""A fusion job's lease: the pid and host running it, its heartbeat, and a stop request.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("evomerge_fusion_jobs", sa.Column("pid", sa.Integer))
    op.add_column("evomerge_fusion_jobs", sa.Column("host", sa.String(255)))
    op.add_column("evomerge_fusion_jobs", sa.Column("heartbeat_at", UTCDateTime))
    op.add_column("evomerge_fusion_jobs", sa.Column("stop_request", sa.String(16)))


def downgrade() -> None:
    # recreate="never": rebuilding the table would cascade-delete its steps on SQLite
    with op.batch_alter_table("evomerge_fusion_jobs", recreate="never") as batch:
        batch.drop_column("stop_request")
        batch.drop_column("heartbeat_at")
        batch.drop_column("host")
        batch.drop_column("pid")
