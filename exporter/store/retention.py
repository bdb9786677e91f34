"""Delete audit details past their retention, in small transactions; rollups are kept.

The details table is also the dedupe index, so the retention is the dedupe window: a report
replayed after its detail row was purged would be counted again (docs/operations.md).
Batches keep each transaction short so the flusher and replicas are never blocked for long.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.tables import usage_details
from exporter.timeutil import as_utc

log = logging.getLogger(__name__)

DEFAULT_BATCH = 5_000


def retention_cutoff(retention_days: int, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(days=retention_days)


async def purge_details(
    engine: AsyncEngine,
    older_than: datetime,
    *,
    batch_size: int = DEFAULT_BATCH,
    max_batches: int | None = None,
) -> int:
    """Delete details with completed_at < older_than; returns how many rows went."""
    t = usage_details
    older_than = as_utc(older_than)
    victims = (
        select(t.c.request_id)
        .where(t.c.completed_at < older_than)
        .limit(batch_size)
        .scalar_subquery()
    )
    stmt = delete(t).where(t.c.request_id.in_(victims))
    total = batches = 0
    while max_batches is None or batches < max_batches:
        async with engine.begin() as conn:
            deleted = (await conn.execute(stmt)).rowcount
        total += deleted
        batches += 1
        if deleted < batch_size:
            break
        await asyncio.sleep(0)  # let ingest and the flusher run between batches
    if total:
        log.info("retention: deleted %d detail row(s) completed before %s", total, older_than)
    return total
