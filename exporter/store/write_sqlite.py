"""The exactly-once batch write on SQLite (the embedded default), from Python.

Same protocol as the Postgres statement: rows prepared (and de-duplicated, first wins) in a
thread, the statements run on aiosqlite's connection thread (none of the per-report work on
the event loop), inserted in request_id order with `ON CONFLICT (request_id) DO NOTHING RETURNING`,
only the rows really inserted aggregated, the deltas upserted additively in key order, all in
one transaction. Multi-row VALUES are chunked under SQLite's bound-variable limit; costs are
added with the exact `dec_add` SQL function (SQLite's own arithmetic on NUMERIC is a float).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.store.rows import (
    DETAIL_COLUMNS,
    KINDS,
    ROLLUP_COLUMNS,
    Batch,
    Kind,
    aggregate,
    kind_of,
)
from exporter.store.tables import ROLLUP_KEY, ROLLUP_SUMS, decimal_text, usage_rollups

__all__ = ["SQLITE_MAX_VARIABLES", "prepare", "probe_sqlite", "sqlite_timestamp", "write_sqlite"]

_T = TypeVar("_T")

SQLITE_MAX_VARIABLES = 32766  # SQLite's default limit since 3.32


def sqlite_timestamp(dt: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text for a UTC datetime (so ORM reads parse it back)."""
    if dt is None:
        return None
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} "
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond:06d}"
    )


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _money_text(value: Any) -> str | None:
    return None if value is None else decimal_text(value)


_BINDERS: dict[Kind, Callable[[Any], Any]] = {
    Kind.TIME: sqlite_timestamp,
    Kind.MONEY: _money_text,
    Kind.JSON: _json_text,
}


def _binders(
    columns: Sequence[str], kinds: dict[str, Kind]
) -> list[tuple[int, Callable[[Any], Any]]]:
    """(index, converter) of the columns whose Python value SQLite cannot bind as it is."""
    return [(i, _BINDERS[kinds[c]]) for i, c in enumerate(columns) if kinds.get(c) in _BINDERS]


_DETAIL_BIND = _binders(DETAIL_COLUMNS, dict(KINDS))
_ROLLUP_BIND = _binders(ROLLUP_COLUMNS, {c: kind_of(usage_rollups.c[c]) for c in ROLLUP_COLUMNS})


def _params(
    rows: Sequence[tuple[Any, ...]], binders: Sequence[tuple[int, Callable[[Any], Any]]]
) -> list[Any]:
    params: list[Any] = []
    for r in rows:
        values = list(r)
        for i, bind in binders:
            values[i] = bind(values[i])
        params.extend(values)
    return params


def _chunks(rows: Sequence[Any], width: int) -> Iterable[Sequence[Any]]:
    size = max(1, min(1000, SQLITE_MAX_VARIABLES // width))
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _q(name: str) -> str:
    return f'"{name}"'


def _cols(names: Iterable[str]) -> str:
    return ", ".join(_q(n) for n in names)


def _placeholders(n_rows: int, width: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return ", ".join([one] * n_rows)


_ADDITIVE = ", ".join(
    f"{_q(c)} = dec_add(usage_rollups.{_q(c)}, excluded.{_q(c)})"
    if c == "cost_usd"
    else f"{_q(c)} = usage_rollups.{_q(c)} + excluded.{_q(c)}"
    for c in ROLLUP_SUMS
)


def prepare(payloads: Sequence[bytes]) -> tuple[int, list[Any]]:
    """(reports received, distinct DetailRows sorted by request_id) of WAL record payloads.

    Raises RowRefused for data no backend can store.
    """
    batch = Batch()
    for payload in payloads:
        batch.add_payload(payload)
    return batch.received, batch.sorted_rows()


def _write_rows(
    db: sqlite3.Connection, rows: list[Any], dims_keys: tuple[str, ...] = ()
) -> tuple[int, int]:
    """(inserted, rollup rows): the statements of one batch, on the driver's own thread.

    Runs inside the transaction SQLAlchemy began on this connection; binding, the RETURNING
    fetch and the aggregation all happen here, none of it on the event loop.
    """
    cur = db.cursor()
    try:
        width = len(DETAIL_COLUMNS)
        inserted: set[str] = set()
        for chunk in _chunks(rows, width):
            sql = (
                f"INSERT INTO usage_details ({_cols(DETAIL_COLUMNS)}) VALUES "  # noqa: S608
                f"{_placeholders(len(chunk), width)} "
                "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
            )
            cur.execute(sql, _params(chunk, _DETAIL_BIND))
            inserted.update(r[0] for r in cur.fetchall())
        new = rows if len(inserted) == len(rows) else [r for r in rows if r.request_id in inserted]
        rollups = aggregate(new, dims_keys)
        width = len(ROLLUP_COLUMNS)
        for chunk in _chunks(rollups, width):
            sql = (
                f"INSERT INTO usage_rollups ({_cols(ROLLUP_COLUMNS)}) VALUES "  # noqa: S608
                f"{_placeholders(len(chunk), width)} "
                f"ON CONFLICT ({_cols(ROLLUP_KEY)}) DO UPDATE SET {_ADDITIVE}"
            )
            cur.execute(sql, _params(chunk, _ROLLUP_BIND))
        return len(inserted), len(rollups)
    finally:
        cur.close()


async def on_driver_thread(
    conn: AsyncConnection, fn: Callable[[sqlite3.Connection, list[Any]], _T], rows: list[Any]
) -> _T:
    """`fn(sqlite3 connection, rows)` on aiosqlite's connection thread (where every statement of
    this connection runs anyway), so the event loop only waits for one future. aiosqlite
    (0.22) has no public call for this; `_execute` is how its own methods queue work."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection  # aiosqlite.Connection
    return cast(_T, await driver._execute(fn, driver._conn, rows))


async def write_sqlite(
    engine: AsyncEngine, payloads: Sequence[bytes], dims_keys: tuple[str, ...] = ()
) -> tuple[int, int, int]:
    """(received, inserted, rollup rows) of one transaction over WAL record payloads;
    `dims_keys`: the promoted tags (exporter.store.dims.dims_keys)."""
    # Per-report Python work runs in threads, so the event loop keeps serving ingest.
    received, rows = await asyncio.to_thread(prepare, payloads)
    if not rows:
        return received, 0, 0
    async with engine.begin() as conn:
        write = functools.partial(_write_rows, dims_keys=dims_keys)
        inserted, rollups = await on_driver_thread(conn, write, rows)
    return received, inserted, rollups


async def probe_sqlite(engine: AsyncEngine) -> None:
    """Read no rows of every column the write uses: fails as a flush would (schema missing or
    behind, database locked or unreadable) without writing anything."""
    async with engine.connect() as conn:
        for table, columns in (
            ("usage_details", DETAIL_COLUMNS),
            ("usage_rollups", ROLLUP_COLUMNS),
        ):
            await conn.exec_driver_sql(f"SELECT {_cols(columns)} FROM {table} LIMIT 0")  # noqa: S608
