"""Initial schema: usage_details (audit rows) and usage_rollups (hour/day, additive).

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in exporter/store/tables.py: a migration must not change meaning
# when the models move on. Costs: NUMERIC(20,10); SQLite has no decimal, so exact TEXT there.
MONEY = sa.Numeric(20, 10).with_variant(sa.Text(), "sqlite")
TS = sa.DateTime(timezone=True)
ID_TEXT = sa.Text(collation="C").with_variant(sa.Text(), "sqlite")


def _key(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=False, server_default=sa.text("''"))


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))


def upgrade() -> None:
    op.create_table(
        "usage_details",
        sa.Column("request_id", ID_TEXT, nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        _key("provider"),
        sa.Column("operation", sa.Text(), nullable=False),
        _key("user"),
        _key("team"),
        _key("api_key_id"),
        sa.Column("trace_id", ID_TEXT, nullable=False, server_default=sa.text("''")),
        _key("parent_id"),
        _key("node"),
        _count("input_tokens"),
        _count("output_tokens"),
        _count("cached_input_tokens"),
        _count("cache_creation_input_tokens"),
        _count("reasoning_tokens"),
        _count("total_tokens"),
        sa.Column("cost_usd", MONEY, nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        _key("error_type"),
        sa.Column("stream", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("completed", sa.Boolean(), nullable=False, server_default=sa.text("true")),
        sa.Column("estimated", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("output_chunk_count", sa.BigInteger(), nullable=True),
        sa.Column("request_content_bytes", sa.BigInteger(), nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("completed_at", TS, nullable=False),
        sa.Column("duration_ms", sa.Double(), nullable=True),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        _key("source"),
        sa.Column("inserted_at", TS, nullable=False, server_default=sa.func.current_timestamp()),
        sa.PrimaryKeyConstraint("request_id", name="pk_usage_details"),
    )
    for cols in (
        ["completed_at"],
        ["user", "completed_at"],
        ["team", "completed_at"],
        ["trace_id"],
    ):
        op.create_index(f"ix_usage_details_{'_'.join(cols)}", "usage_details", cols)

    op.create_table(
        "usage_rollups",
        sa.Column("granularity", sa.Text(), nullable=False),
        sa.Column("bucket_start", TS, nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("user", sa.Text(), nullable=False),
        sa.Column("team", sa.Text(), nullable=False),
        sa.Column("api_key_id", sa.Text(), nullable=False),
        _count("requests"),
        _count("errors"),
        _count("input_tokens"),
        _count("output_tokens"),
        _count("cached_input_tokens"),
        _count("cache_creation_input_tokens"),
        _count("reasoning_tokens"),
        sa.Column("cost_usd", MONEY, nullable=False, server_default=sa.text("0")),
        sa.Column("duration_ms_sum", sa.Double(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint(
            "granularity",
            "bucket_start",
            "model",
            "provider",
            "operation",
            "user",
            "team",
            "api_key_id",
            name="pk_usage_rollups",
        ),
    )
    for cols in (
        ["granularity", "user", "bucket_start"],
        ["granularity", "team", "bucket_start"],
        ["granularity", "api_key_id", "bucket_start"],
    ):
        op.create_index(f"ix_usage_rollups_{'_'.join(cols)}", "usage_rollups", cols)


def downgrade() -> None:
    op.drop_table("usage_rollups")
    op.drop_table("usage_details")
