"""Jobs have a kind (task); a model carries its latest screening.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VERDICTS = "screening_verdict IS NULL OR screening_verdict IN ('clean', 'suspicious', 'backdoored')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("task", sa.String(32), server_default="purify", nullable=False))
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("screening_verdict", sa.String(16), nullable=True))
        batch.add_column(sa.Column("screening_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("screening_target", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("screening_job_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("screened_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint(op.f("ck_artifacts_screening_verdict"), VERDICTS)
        batch.create_index(op.f("ix_artifacts_org_id_verdict_created_at_id"),
                           ["org_id", "screening_verdict", "created_at", "id"])


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_index(op.f("ix_artifacts_org_id_verdict_created_at_id"))
        batch.drop_constraint(op.f("ck_artifacts_screening_verdict"), type_="check")
        for column in ("screened_at", "screening_job_id", "screening_target", "screening_score",
                       "screening_verdict"):
            batch.drop_column(column)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("task")
