"""fracture-liaison pathway: finding_assessments, patients_flagged.referred_at,
follow_up_events.dxa_date; the coordinator's "reviewed" status becomes "new" (a review is now a
radiologist's verdict per finding)

Revision ID: 0008_fls
Revises: 0007
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_fls"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "finding_assessments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("result_id", sa.Integer(), sa.ForeignKey("results.id"), nullable=False),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("flagged_id", sa.Integer(), sa.ForeignKey("patients_flagged.id"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_finding_assessments_result_id", "finding_assessments", ["result_id"])
    op.create_index("ix_finding_assessments_study_id", "finding_assessments", ["study_id"])
    op.create_index("ix_finding_assessments_flagged_id", "finding_assessments", ["flagged_id"])
    with op.batch_alter_table("patients_flagged") as batch:
        batch.add_column(sa.Column("referred_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_patients_flagged_referred_at", ["referred_at"])
    with op.batch_alter_table("follow_up_events") as batch:
        batch.add_column(sa.Column("dxa_date", sa.Date(), nullable=True))
    op.execute("UPDATE patients_flagged SET status = 'new' WHERE status = 'reviewed'")
    # a patient already referred: the clock starts at their latest "DXA ordered"
    op.execute(
        "UPDATE patients_flagged SET referred_at = (SELECT max(e.at) FROM follow_up_events e "
        "WHERE e.flagged_id = patients_flagged.id AND e.action = 'dxa_ordered') WHERE status = 'dxa_ordered'"
    )


def downgrade() -> None:
    op.execute("UPDATE patients_flagged SET status = 'reviewed' WHERE status IN ('confirmed', 'rejected')")
    op.execute("UPDATE patients_flagged SET status = 'dxa_done' WHERE status IN ('treatment', 'no_treatment')")
    with op.batch_alter_table("follow_up_events") as batch:
        batch.drop_column("dxa_date")
    with op.batch_alter_table("patients_flagged") as batch:
        batch.drop_index("ix_patients_flagged_referred_at")
        batch.drop_column("referred_at")
    op.drop_index("ix_finding_assessments_flagged_id", "finding_assessments")
    op.drop_index("ix_finding_assessments_study_id", "finding_assessments")
    op.drop_index("ix_finding_assessments_result_id", "finding_assessments")
    op.drop_table("finding_assessments")
