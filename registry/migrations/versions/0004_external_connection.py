"""External experts: their own API base and the name of the environment variable with their key.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experts") as batch:
        batch.add_column(sa.Column("api_base", sa.String(length=1024), nullable=True))
        batch.add_column(sa.Column("api_key_env", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("experts") as batch:
        batch.drop_column("api_key_env")
        batch.drop_column("api_base")
