"""Pricing: billed units, tier and unpriced reason on audit rows; unpriced count on rollups.

Old rows: before this revision an unpriced report was stored with cost 0 (not NULL). A detail
row with cost 0 and tokens > 0 is taken as unpriced (cost NULL, reason 'unknown_model': a model
priced at exactly 0 is rare, and `llm-usage-exporter reprice` restores any real price); the
rollups' `unpriced` count is rebuilt from the details still kept (retention may have purged
older ones; their rollups keep unpriced = 0). `cost_sent` is false on old rows: whether a
client sent their cost was not recorded, so `reprice` treats them as computed.

Revision ID: 0004_pricing
Revises: 0003_tags
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_pricing"
down_revision: str | None = "0003_tags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy (a migration must not change meaning when the models move on).
BILLED_COUNTS = (
    "cache_creation_1h_input_tokens",
    "input_audio_tokens",
    "cached_audio_input_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "web_search_requests",
)
_KEY = ("model", "provider", "operation", "user", "team", "api_key_id")


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))


def _text(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=False, server_default=sa.text("''"))


def _buckets(dialect: str) -> tuple[str, str]:
    """SQL for a detail row's hour and day bucket, as the rollups store bucket_start."""
    if dialect == "postgresql":
        return (
            "date_trunc('hour', d.completed_at, 'UTC')",
            "date_trunc('day', d.completed_at, 'UTC')",
        )
    # SQLite: UTC text 'YYYY-MM-DD HH:MM:SS.ffffff' (exporter.store.tables.UTCDateTime)
    return (
        "substr(d.completed_at, 1, 13) || ':00:00.000000'",
        "substr(d.completed_at, 1, 10) || ' 00:00:00.000000'",
    )


def upgrade() -> None:
    with op.batch_alter_table("usage_details") as batch:
        for name in BILLED_COUNTS:
            batch.add_column(_count(name))
        batch.add_column(_text("service_tier"))
        batch.add_column(_text("unpriced_reason"))
        batch.add_column(
            sa.Column("cost_sent", sa.Boolean(), nullable=False, server_default=sa.text("false"))
        )
    with op.batch_alter_table("usage_rollups") as batch:
        batch.add_column(_count("unpriced"))

    op.execute(
        "UPDATE usage_details SET cost_usd = NULL, unpriced_reason = 'unknown_model' "
        "WHERE cost_usd = 0 AND input_tokens + output_tokens > 0"
    )
    hour, day = _buckets(op.get_bind().dialect.name)
    key = ", ".join(f'd."{c}"' for c in _KEY)
    match = " AND ".join(f'usage_rollups."{c}" = s."{c}"' for c in _KEY)
    for granularity, bucket in (("hour", hour), ("day", day)):
        op.execute(
            f"""
            UPDATE usage_rollups SET unpriced = s.n
            FROM (
                SELECT {bucket} AS bucket_start, {key}, count(*) AS n
                FROM usage_details AS d
                WHERE d.cost_usd IS NULL
                GROUP BY {bucket}, {key}
            ) AS s
            WHERE usage_rollups.granularity = '{granularity}'
              AND usage_rollups.bucket_start = s.bucket_start AND {match}
            """  # noqa: S608 - built from constants only
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_rollups") as batch:
        batch.drop_column("unpriced")
    with op.batch_alter_table("usage_details") as batch:
        batch.drop_column("cost_sent")
        batch.drop_column("unpriced_reason")
        batch.drop_column("service_tier")
        for name in reversed(BILLED_COUNTS):
            batch.drop_column(name)
    op.execute("UPDATE usage_details SET cost_usd = 0 WHERE cost_usd IS NULL")
