"""several agents on one database: the node of each row, study claims, open associations, nodes

Revision ID: 0011_node
Revises: 0010_sweep_outbox
Create Date: 2026-12-07

Existing rows keep node NULL: the single node of old.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_node"
down_revision = "0010_sweep_outbox"
branch_labels = None
depends_on = None

_NODE_TABLES = ("instances", "jobs", "study_reports", "outbox")


def upgrade() -> None:
    for table in _NODE_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("node", sa.String(64), nullable=True))
            batch.create_index(f"ix_{table}_node", ["node"])
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("storage", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "study_claims",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False, unique=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "open_associations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("association", sa.String(32), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("node", "association", "study_instance_uid", name="uq_open_association_study"),
    )
    op.create_index("ix_open_associations_study_instance_uid", "open_associations", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_open_associations_study_instance_uid", "open_associations")
    op.drop_table("open_associations")
    op.drop_table("study_claims")
    op.drop_table("nodes")
    for table in _NODE_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_node")
            batch.drop_column("node")
