"""audit export to the hospital's audit repository (IHE ATNA): atna_export cursor

Revision ID: 0009_atna
Revises: 0008_fls
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_atna"
down_revision = "0008_fls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "atna_export",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("last_event_id", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("atna_export")
