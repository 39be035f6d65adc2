"""Text suites: a suite row's labelled segments, and a leaderboard result's held-out loss.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("suite_examples") as batch:
        batch.add_column(sa.Column("segments", sa.JSON(), nullable=True))
    with op.batch_alter_table("leaderboard_results") as batch:
        batch.add_column(sa.Column("loss", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leaderboard_results") as batch:
        batch.drop_column("loss")
    with op.batch_alter_table("suite_examples") as batch:
        batch.drop_column("segments")
