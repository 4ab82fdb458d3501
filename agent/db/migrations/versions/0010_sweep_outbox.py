"""outbox.priority: results of live studies are sent before those of swept ones

Revision ID: 0010_sweep_outbox
Revises: 0009_atna
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_sweep_outbox"
down_revision = "0009_atna"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("priority")
