"""Base models: whether their own code (config.json's auto_map, .py files) may run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:  # batch: SQLite cannot ALTER in place
        batch.add_column(sa.Column("trust_remote_code", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("trust_remote_code")
