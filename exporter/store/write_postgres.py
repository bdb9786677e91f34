"""The exactly-once batch write on Postgres: ONE statement over the WAL records as they are.

`unnest($1::json[])` of the WAL record payloads feeds `json_populate_recordset`, so parsing,
ordering, aggregation and both upserts happen inside the server. The exporter's event loop,
which also serves ingest, does no per-report work, and a whole flush is one round trip with
one bind parameter (asyncpg's 32767-parameter limit never applies). bench/RESULTS.md has the
measurements against typed-array unnest and multi-row VALUES.

The statement is assembled from the column lists and rules in `rows.py`, never from data. Row
order is the lock order: request_id for the details, the rollup key for the rollups,
byte-wise ("C") so it is cheap and the same on every replica whatever the database's default
collation.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.dims import clean_json, dims_sql
from exporter.store.rows import (
    DERIVED_KEY,
    DETAIL_COLUMNS,
    DIMENSIONS,
    EMPTY_TEXT_DEFAULTS,
    KINDS,
    ROLLUP_COLUMNS,
    ROLLUP_SPECS,
    Kind,
    bool_default,
    clean_text,
)
from exporter.store.tables import ROLLUP_KEY, ROLLUP_SUMS

__all__ = ["PG_WORK_MEM", "PG_WRITE_SQL", "pg_write_sql", "probe_postgres", "write_postgres"]

#: Session setting for the flush transaction: sorts and hash aggregates of a large batch stay
#: in memory instead of spilling to disk.
PG_WORK_MEM = "64MB"


def _q(name: str) -> str:
    return f'"{name}"'


def _cols(names: Iterable[str]) -> str:
    return ", ".join(_q(n) for n in names)


def _value_sql(name: str) -> str:
    """The column's value from the JSON record `r`, with the same defaults as rows.normalize."""
    col = f"r.{_q(name)}"
    kind = KINDS[name]
    if kind is Kind.TEXT:
        default = EMPTY_TEXT_DEFAULTS.get(name, "")
        return f"coalesce(nullif({col}, ''), '{default}')" if default else f"coalesce({col}, '')"
    if name == "total_tokens":
        return f"coalesce({col}, coalesce(r.input_tokens, 0) + coalesce(r.output_tokens, 0))"
    if kind is Kind.COUNT:
        return f"coalesce({col}, 0)"
    if kind is Kind.BOOL:
        return f"coalesce({col}, {str(bool_default(name)).lower()})"
    if name == "completed_at":
        return f"coalesce({col}, now())"
    return col


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
def pg_write_sql(keys: tuple[str, ...] = ()) -> str:
    """The flush statement for promoted tag `keys` (exporter.store.dims.dims_keys)."""
    returning, derived = _derived_sql(keys)
    grouped = _DERIVED_COLS if keys else ""
    return f"""
WITH src AS (
    SELECT r.*, p.pn
    FROM unnest($1::json[]) WITH ORDINALITY AS p(doc, pn)
    CROSS JOIN LATERAL json_populate_recordset(NULL::usage_details, p.doc)
        WITH ORDINALITY AS r
), ins AS (
    INSERT INTO usage_details ({_cols(DETAIL_COLUMNS)})
    SELECT {", ".join(_value_sql(c) for c in DETAIL_COLUMNS)}
    FROM src AS r
    WHERE r.request_id <> ''
    ORDER BY r.request_id COLLATE "C", r.pn, r.ordinality
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
SELECT (SELECT count(*) FROM src), (SELECT count(*) FROM ins), (SELECT count(*) FROM up)
"""  # noqa: S608


#: The statement without promoted tags (dims '{}' for every report).
PG_WRITE_SQL = pg_write_sql()


def _clean_payload(payload: bytes) -> bytes:
    """Replace NUL characters (Postgres text cannot hold them) in a record's strings."""
    reports = orjson.loads(payload)
    for report in reports:
        for key, value in report.items():
            if isinstance(value, str) and "\x00" in value:
                report[key] = clean_text(value)
        if isinstance(report.get("tags"), dict | list):  # `dims` reads them as text
            report["tags"] = clean_json(report["tags"])
    return orjson.dumps(reports)


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
    docs = [(_clean_payload(p) if b"\\u0000" in p else p).decode() for p in payloads]
    if not docs:
        return 0, 0, 0
    async with _driver_connection(engine) as pg, pg.transaction():
        await pg.execute(f"SET LOCAL work_mem = '{PG_WORK_MEM}'")
        received, inserted, rollups = await pg.fetchrow(pg_write_sql(dims_keys), docs)
    return int(received), int(inserted), int(rollups)


async def probe_postgres(engine: AsyncEngine, dims_keys: tuple[str, ...] = ()) -> None:
    """Run the write statement over no records: fails as a flush would (schema missing or
    behind, permissions, database down) without writing anything."""
    async with _driver_connection(engine) as pg, pg.transaction():
        await pg.fetchrow(pg_write_sql(dims_keys), [])
