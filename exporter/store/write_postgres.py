"""The exactly-once batch write on Postgres: binary COPY into a staging table, then ONE statement.

Rows are prepared in worker threads by the same value rules as SQLite (`copy_rows`), in steps
of COPY_STEP reports, each once the previous one is sent, so no per-report Python runs on
the event loop; asyncpg's `copy_records_to_table` sends them in the binary COPY format (its
compiled codecs, the one per-row cost left on the loop) to `usage_staging`, a session-lived
temporary table emptied at every commit (no WAL, no indexes, no constraints). One statement
then inserts them into `usage_details` in request_id order (the first arrival of a repeated
id wins) with `ON CONFLICT (request_id) DO NOTHING RETURNING`, aggregates only the rows really
inserted into hour and day deltas and upserts those additively. bench/RESULTS.md (`## Flush`,
`## Limits: Postgres flush`) compares it with the earlier JSON statement (`unnest($1::json[])`
+ `json_populate_recordset`: the server parsed every report; bench/pg_json_write.py).

The SQL is assembled from the column lists in `rows.py`, never from data. Row order is the
lock order: request_id for the details, the rollup key for the rollups, byte-wise ("C") so it
is cheap and the same on every replica whatever the database's default collation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.copy_rows import copy_records
from exporter.store.dims import dims_sql
from exporter.store.rows import (
    DERIVED_KEY,
    DETAIL_COLUMNS,
    DIMENSIONS,
    ROLLUP_COLUMNS,
    ROLLUP_SPECS,
)
from exporter.store.tables import ROLLUP_KEY, ROLLUP_SUMS

__all__ = [
    "PG_MERGE_SQL",
    "PG_STAGING",
    "PG_STAGING_COLUMNS",
    "PG_STAGING_SQL",
    "PG_WORK_MEM",
    "pg_merge_sql",
    "probe_postgres",
    "write_postgres",
]

log = logging.getLogger(__name__)

#: Session setting for the flush transaction: sorts and hash aggregates of a large batch stay
#: in memory instead of spilling to disk.
PG_WORK_MEM = "64MB"
#: The staging table: temporary (one per session, invisible to other replicas), no WAL, no
#: constraints; ON COMMIT DELETE ROWS empties it at the end of every flush, failed or not.
PG_STAGING = "usage_staging"


def _q(name: str) -> str:
    return f'"{name}"'


def _cols(names: Iterable[str]) -> str:
    return ", ".join(_q(n) for n in names)


#: the arrival number of a report in its batch: among duplicates the first one is stored
ARRIVAL = "arrival"
PG_STAGING_COLUMNS = (*DETAIL_COLUMNS, ARRIVAL)
PG_STAGING_SQL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {PG_STAGING} ON COMMIT DELETE ROWS AS "  # noqa: S608
    f"SELECT {_cols(DETAIL_COLUMNS)}, 0::bigint AS {ARRIVAL} FROM usage_details WITH NO DATA"
)

_RETURNING = tuple(
    dict.fromkeys(
        ("completed_at", *DIMENSIONS, *(c for s in ROLLUP_SPECS.values() for c in s.reads))
    )
)
_KEY_C = ", ".join(f'{_q(c)} COLLATE "C"' for c in ROLLUP_KEY[2:])
_DERIVED_COLS = "".join(f", {_q(c)}" for c in ROLLUP_KEY if c in DERIVED_KEY)


def _derived_sql(keys: Sequence[str]) -> tuple[str, str]:
    """(extra RETURNING of `ins`, extra select list of `hourly`) for the derived key part
    `dims`: with promoted tag `keys` computed once per inserted row (exporter.store.dims) and
    grouped by; without, a constant."""
    if keys:
        return f", {dims_sql(keys)} AS {_q('dims')}", _DERIVED_COLS
    constants = (f", {DERIVED_KEY[c][0]} AS {_q(c)}" for c in ROLLUP_KEY if c in DERIVED_KEY)
    return "", "".join(constants)


@functools.lru_cache(maxsize=8)
def pg_merge_sql(keys: tuple[str, ...] = ()) -> str:
    """The statement from the staging table for promoted tag `keys` (dims.dims_keys)."""
    returning, derived = _derived_sql(keys)
    grouped = _DERIVED_COLS if keys else ""
    return f"""
WITH ins AS (
    INSERT INTO usage_details ({_cols(DETAIL_COLUMNS)})
    SELECT {_cols(DETAIL_COLUMNS)} FROM {PG_STAGING}
    ORDER BY request_id COLLATE "C", {ARRIVAL}
    ON CONFLICT (request_id) DO NOTHING
    RETURNING {_cols(_RETURNING)}{returning}
), hourly AS (
    SELECT date_trunc('hour', completed_at, 'UTC') AS bucket_start, {_cols(DIMENSIONS)}
        {derived}, {", ".join(f"{ROLLUP_SPECS[c].sql} AS {_q(c)}" for c in ROLLUP_SUMS)}
    FROM ins
    GROUP BY 1, {_cols(DIMENSIONS)}{grouped}
), deltas AS (
    SELECT 'hour' AS granularity, * FROM hourly
    UNION ALL
    SELECT 'day', date_trunc('day', bucket_start, 'UTC'), {_cols(DIMENSIONS)}{_DERIVED_COLS},
        {", ".join(f"sum({_q(c)})" for c in ROLLUP_SUMS)}
    FROM hourly
    GROUP BY 2, {_cols(DIMENSIONS)}{_DERIVED_COLS}
), up AS (
    INSERT INTO usage_rollups ({_cols(ROLLUP_COLUMNS)})
    SELECT * FROM deltas
    ORDER BY granularity COLLATE "C", bucket_start, {_KEY_C}
    ON CONFLICT ({_cols(ROLLUP_KEY)}) DO UPDATE SET
        {", ".join(f"{_q(c)} = usage_rollups.{_q(c)} + excluded.{_q(c)}" for c in ROLLUP_SUMS)}
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM up)
"""  # noqa: S608


#: The statement without promoted tags (dims '{}' for every report).
PG_MERGE_SQL = pg_merge_sql()

#: Reports prepared per step of the COPY stream (in a thread, once the previous step is sent):
#: bounds the rows held in memory at once.
COPY_STEP = 4096
#: asyncpg encodes COPY rows on the event loop (~6 µs each, bench/RESULTS.md): hand the loop
#: back every this many rows, so ingest never waits more than a few milliseconds.
YIELD_EVERY = 512


def _steps(payloads: Sequence[bytes]) -> list[Sequence[bytes]]:
    """WAL records in groups of about COPY_STEP reports (records are never split)."""
    steps: list[Sequence[bytes]] = []
    start = size = 0
    for i, payload in enumerate(payloads):
        size += max(1, payload.count(b'"request_id"'))
        if size >= COPY_STEP:
            steps.append(payloads[start : i + 1])
            start, size = i + 1, 0
    if start < len(payloads):
        steps.append(payloads[start:])
    return steps


class _Stream:
    """The COPY records of a batch as an async iterator, prepared in a worker thread one step
    at a time, each step only once the previous one has been encoded and sent: a thread busy
    with Python while asyncpg encodes on the loop would take the GIL at every yield of the
    stream, and the loop waits up to the interpreter's switch interval (5 ms) to get it back
    (bench/RESULTS.md, `## Limits: Postgres flush pipelined`). The event loop only ever runs
    asyncpg's encoding of a few rows at a time."""

    def __init__(self, payloads: Sequence[bytes]) -> None:
        self.received = 0
        self.rows = 0
        self._steps = _steps(payloads)
        self._now = datetime.now(UTC)

    async def __aiter__(self) -> AsyncIterator[tuple[Any, ...]]:
        for k in range(len(self._steps)):
            received, records = await self._prepare(k)
            self.received += received
            self.rows += len(records)
            for n, record in enumerate(records, 1):
                yield record
                if not n % YIELD_EVERY:  # asyncpg encodes on the loop: let ingest in
                    await asyncio.sleep(0)

    async def _prepare(self, k: int) -> tuple[int, list[tuple[Any, ...]]]:
        # arrival numbers only need to grow: step k's start above all of step k-1's
        return await asyncio.to_thread(copy_records, self._steps[k], k << 32, self._now)


@contextlib.asynccontextmanager
async def _driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled asyncpg connection; broken, or cancelled mid-statement, it is never handed
    back to the pool."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        try:
            yield raw.driver_connection
        except BaseException:
            await conn.invalidate()
            raise


async def write_postgres(
    engine: AsyncEngine, payloads: Sequence[bytes], dims_keys: tuple[str, ...] = ()
) -> tuple[int, int, int]:
    """(received, inserted, rollup rows) of one transaction over WAL record payloads;
    `dims_keys`: the promoted tags (exporter.store.dims.dims_keys)."""
    stream = _Stream(payloads)
    async with _driver_connection(engine) as pg, pg.transaction():
        await pg.execute(f"SET LOCAL work_mem = '{PG_WORK_MEM}'; {PG_STAGING_SQL}")
        await pg.copy_records_to_table(PG_STAGING, records=stream, columns=PG_STAGING_COLUMNS)
        if not stream.rows:
            return stream.received, 0, 0
        inserted, rollups = await pg.fetchrow(pg_merge_sql(dims_keys))
    return stream.received, int(inserted), int(rollups)


async def probe_postgres(engine: AsyncEngine, dims_keys: tuple[str, ...] = ()) -> None:
    """Run the write over no records: fails as a flush would (schema missing or behind,
    permissions including TEMPORARY, database down) without writing anything."""
    async with _driver_connection(engine) as pg, pg.transaction():
        await pg.execute(PG_STAGING_SQL)
        await pg.fetchrow(pg_merge_sql(dims_keys))
