"""usage_details.tags: free-form attribution (a JSON object of string → string), nullable.

Revision ID: 0003_tags
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_tags"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # nullable without a default: no table rewrite on Postgres, instant on a large table
    op.add_column("usage_details", sa.Column("tags", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_details") as batch:
        batch.drop_column("tags")
