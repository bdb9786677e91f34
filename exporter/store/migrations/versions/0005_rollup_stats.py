"""Rollups that can answer honestly: value counts next to sums, outcome counts, node and tags.

- `duration_count`, `ttft_ms_sum`, `ttft_count`: an average is a sum over the reports that
  carried the value, not over all requests (`duration_ms_sum / requests` was biased low).
- `cancelled`, `estimated`: counts of reports with that status / that were estimated.
- `node` and `dims` (canonical JSON of the promoted tags, '{}' for none) join the key.
- usage_details loses its (user, completed_at) and (team, completed_at) indexes: the read API
  reads details by completed_at range, request_id and trace_id only (bench/RESULTS.md).

Old rollup rows keep node '' and dims '{}' (their reports were never split that way). Their new
counts come from the audit rows where those are complete for the row (as many details as the
row has requests); where retention already purged them, `duration_count` falls back to the old
definition (every request, when the row has any duration) and TTFT stays unknown (count 0).

Revision ID: 0005
Revises: 0004_pricing
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004_pricing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = ["granularity", "bucket_start", "model", "provider", "operation", "user", "team",
           "api_key_id"]  # fmt: skip
NEW_KEY = [*OLD_KEY, "node", "dims"]
_DIMS = ["model", "provider", "operation", "user", "team", "api_key_id"]
_COUNTS = ["duration_count", "ttft_count", "cancelled", "estimated"]


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))


def _new_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("node", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("dims", sa.Text(), nullable=False, server_default=sa.text("'{}'")),
        _count("duration_count"),
        sa.Column("ttft_ms_sum", sa.Double(), nullable=False, server_default=sa.text("0")),
        _count("ttft_count"),
        _count("cancelled"),
        _count("estimated"),
    ]


def _buckets(dialect: str) -> tuple[str, str]:
    """SQL for the hour and day bucket of a detail's completed_at, as the writer stores it."""
    if dialect == "postgresql":
        return ("date_trunc('hour', completed_at, 'UTC')", "date_trunc('day', completed_at, 'UTC')")
    # SQLite keeps 'YYYY-MM-DD HH:MM:SS.ffffff' UTC text (exporter.store.tables.UTCDateTime)
    return (
        "substr(completed_at, 1, 13) || ':00:00.000000'",
        "substr(completed_at, 1, 10) || ' 00:00:00.000000'",
    )


def _backfill(dialect: str) -> None:
    hour, day = _buckets(dialect)
    dims = ", ".join(f'"{c}"' for c in _DIMS)
    agg = (
        "count(*) AS n, count(duration_ms) AS duration_count, "
        "coalesce(sum(ttft_ms), 0) AS ttft_ms_sum, count(ttft_ms) AS ttft_count, "
        "sum(CASE WHEN status = 'cancelled' THEN 1 ELSE 0 END) AS cancelled, "
        "sum(CASE WHEN estimated THEN 1 ELSE 0 END) AS estimated"
    )
    match = " AND ".join(f'd."{c}" = usage_rollups."{c}"' for c in _DIMS)
    op.execute(
        f"""
        UPDATE usage_rollups SET duration_count = d.duration_count, ttft_ms_sum = d.ttft_ms_sum,
            ttft_count = d.ttft_count, cancelled = d.cancelled, estimated = d.estimated
        FROM (
            SELECT 'hour' AS granularity, {hour} AS bucket_start, {dims}, {agg}
            FROM usage_details GROUP BY 2, {dims}
            UNION ALL
            SELECT 'day', {day}, {dims}, {agg}
            FROM usage_details GROUP BY 2, {dims}
        ) AS d
        WHERE d.granularity = usage_rollups.granularity
            AND d.bucket_start = usage_rollups.bucket_start AND {match}
            AND d.n = usage_rollups.requests
        """  # noqa: S608
    )
    # Rows whose audit rows are gone (or partly gone): the old definition, the best we know.
    op.execute(
        """
        UPDATE usage_rollups SET duration_count = requests, ttft_ms_sum = 0, ttft_count = 0
        WHERE duration_count = 0 AND duration_ms_sum > 0
        """
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table(
        "usage_rollups", recreate="always" if dialect == "sqlite" else "auto"
    ) as b:
        for column in _new_columns():
            b.add_column(column)
        b.drop_constraint("pk_usage_rollups", type_="primary")
        b.create_primary_key("pk_usage_rollups", NEW_KEY)
    _backfill(dialect)
    op.drop_index("ix_usage_details_user_completed_at", table_name="usage_details")
    op.drop_index("ix_usage_details_team_completed_at", table_name="usage_details")


def downgrade() -> None:
    """Only possible while every row has node '' and dims '{}' (else the old key collides)."""
    op.create_index("ix_usage_details_team_completed_at", "usage_details", ["team", "completed_at"])
    op.create_index("ix_usage_details_user_completed_at", "usage_details", ["user", "completed_at"])
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table(
        "usage_rollups", recreate="always" if dialect == "sqlite" else "auto"
    ) as b:
        b.drop_constraint("pk_usage_rollups", type_="primary")
        b.create_primary_key("pk_usage_rollups", OLD_KEY)
        for column in reversed(_new_columns()):
            b.drop_column(column.name)
