"""Delete audit details past their retention in small, bounded, linear batches; rollups stay.

The details table is also the dedupe index, so the retention is the dedupe window: a report
replayed after its detail row was purged would be counted again (docs/operations.md).

Retention must never hold up the flush. Each batch is its own short transaction on a pooled
connection (never the flush's), deletes at most `batch_size` rows chosen by walking the
`completed_at` index from the oldest, and on Postgres runs under `SET LOCAL statement_timeout`
and `lock_timeout` with sequential scans disabled: a planner working from stale statistics
(say right after a crash left a huge flush behind) cannot pick a plan that rescans the table
per batch. The victims are addressed by `ctid` (a TID scan), so each batch costs O(batch).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.db import backend_name
from exporter.store.errors import ErrorKind, classify
from exporter.store.tables import UTCDateTime
from exporter.timeutil import as_utc

__all__ = ["DEFAULT_BATCH", "PG_PURGE_SQL", "purge_details", "retention_cutoff"]

log = logging.getLogger(__name__)

DEFAULT_BATCH = 5_000
#: Per batch on Postgres; a batch that cannot finish in this is halved and retried.
STATEMENT_TIMEOUT_MS = 5_000
LOCK_TIMEOUT_MS = 1_000
MIN_BATCH = 100

#: Rows locked by someone else are skipped (the next run gets them): retention never waits.
PG_PURGE_SQL = """
DELETE FROM usage_details
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM usage_details
    WHERE completed_at < :cutoff
    ORDER BY completed_at
    LIMIT :n
    FOR UPDATE SKIP LOCKED
))
"""
SQLITE_PURGE_SQL = """
DELETE FROM usage_details
WHERE rowid IN (
    SELECT rowid FROM usage_details INDEXED BY ix_usage_details_completed_at
    WHERE completed_at < :cutoff
    ORDER BY completed_at
    LIMIT :n
)
"""


def retention_cutoff(retention_days: int, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(days=retention_days)


async def _purge_batch(engine: AsyncEngine, cutoff: datetime, n: int, is_pg: bool) -> int:
    async with engine.begin() as conn:
        if is_pg:
            await conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
            await conn.exec_driver_sql(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        stmt = text(PG_PURGE_SQL if is_pg else SQLITE_PURGE_SQL).bindparams(
            bindparam("cutoff", type_=UTCDateTime())
        )
        result = await conn.execute(stmt, {"cutoff": cutoff, "n": n})
        return int(result.rowcount)


async def purge_details(
    engine: AsyncEngine,
    older_than: datetime,
    *,
    batch_size: int = DEFAULT_BATCH,
    max_batches: int | None = None,
) -> int:
    """Delete details with completed_at < older_than; returns how many rows went.

    A batch that times out or waits on a lock (the database busy with flushes) is halved and
    tried again; below `MIN_BATCH` rows the run ends (raising) and the next run resumes.
    """
    older_than = as_utc(older_than)
    is_pg = backend_name(engine.url) == "postgresql"
    total = batches = 0
    n = batch_size
    while max_batches is None or batches < max_batches:
        batches += 1
        try:
            deleted = await _purge_batch(engine, older_than, n, is_pg)
        except Exception as exc:
            if classify(exc) is not ErrorKind.UNAVAILABLE or n // 2 < min(MIN_BATCH, batch_size):
                raise
            n //= 2
            log.info("retention: a batch timed out or waited on a lock; trying %d rows", n)
            continue
        total += deleted
        if deleted < n:
            break
        await asyncio.sleep(0)  # let ingest and the flusher run between batches
    if total:
        log.info("retention: deleted %d detail row(s) completed before %s", total, older_than)
    return total
