"""per-knee results: knee_results (one row per knee per SR revision), the flagged row's knee

Revision ID: 0012_knee
Revises: 0011_node
Create Date: 2026-12-07

A knee is the screened films of one side in one study, combined when the study is quiet, before
its SR is built (model/knee.py); the row is linked to the SR when that is recorded. Flagged rows
of before keep knee_laterality and knee_images NULL (image figures).
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_knee"
down_revision = "0011_node"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "knee_results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), sa.ForeignKey("study_reports.id"), nullable=True),
        sa.Column("laterality", sa.String(1), nullable=True),
        sa.Column("result_ids", sa.JSON(), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("bone_loss", sa.Boolean(), nullable=False),
        sa.Column("p_osteoporosis_given_bone_loss", sa.Float(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=True),
        sa.Column("t_score", sa.Float(), nullable=False),
        sa.Column("t_score_low", sa.Float(), nullable=False),
        sa.Column("t_score_high", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_knee_results_study_id", "knee_results", ["study_id"])
    op.create_index("ix_knee_results_report_id", "knee_results", ["report_id"])
    with op.batch_alter_table("patients_flagged") as batch:
        batch.add_column(sa.Column("knee_laterality", sa.String(1), nullable=True))
        batch.add_column(sa.Column("knee_images", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("patients_flagged") as batch:
        batch.drop_column("knee_images")
        batch.drop_column("knee_laterality")
    op.drop_index("ix_knee_results_report_id", "knee_results")
    op.drop_index("ix_knee_results_study_id", "knee_results")
    op.drop_table("knee_results")
