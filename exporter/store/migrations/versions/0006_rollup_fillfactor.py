"""Rollup pages keep room for their own updates: `usage_rollups` fillfactor 50 on Postgres.

Every flush adds to rows it already wrote (the same hour and day keys), and an upsert's
`DO UPDATE` writes a new row version. With full pages (fillfactor 100) that version lands on
another page and all four rollup indexes get a new entry; with free room on the page it is a
HOT update (the summed columns are in no index): no index entry, a fraction of the WAL.
bench/RESULTS.md (`## Flush`) has the measurement. The rollup table is small next to the
details (one row per key and hour or day), so the doubled page count is cheap. New pages
follow the setting at once; existing pages as autovacuum and updates recycle them.

SQLite has no fillfactor: nothing to do there.

Revision ID: 0006_rollup_fillfactor
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_rollup_fillfactor"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the setting `tables.usage_rollups` declares (postgresql_with)
FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE usage_rollups SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE usage_rollups RESET (fillfactor)")
