"""outbox.commitment_uid, outbox.commitment_asked_at: storage commitment of delivered results

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("commitment_asked_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_outbox_commitment_uid", ["commitment_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_commitment_uid")
        batch.drop_column("commitment_asked_at")
        batch.drop_column("commitment_uid")
