"""Strategies users define: a router and a composer with their parameters over an expert set.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "strategies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=128), nullable=False, unique=True),
        sa.Column("router", sa.String(length=128), nullable=False),
        sa.Column("composer", sa.String(length=128), nullable=False),
        sa.Column("router_params", sa.JSON(), nullable=False),
        sa.Column("composer_params", sa.JSON(), nullable=False),
        sa.Column("experts", sa.JSON(), nullable=False),
        sa.Column("fallback", sa.String(length=128), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("strategies")
