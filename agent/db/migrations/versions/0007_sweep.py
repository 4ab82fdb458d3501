"""retrospective sweep: jobs.priority, sweep_studies, sweep_cursors

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "sweep_studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("pacs", sa.String(64), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("series", sa.Integer(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("send_results", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retrieve_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_sweep_studies_state", "sweep_studies", ["state"])
    op.create_index("ix_sweep_studies_retrieve_started_at", "sweep_studies", ["retrieve_started_at"])
    op.create_table(
        "sweep_cursors",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(128), nullable=False, unique=True),
        sa.Column("next_date", sa.String(8), nullable=False),
        sa.Column("finished", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sweep_cursors")
    op.drop_index("ix_sweep_studies_retrieve_started_at", "sweep_studies")
    op.drop_index("ix_sweep_studies_state", "sweep_studies")
    op.drop_table("sweep_studies")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
