"""The exactly-once batch write on SQLite (the embedded default).

Same protocol as the Postgres statement, with SQLite doing the per-report work in C where it
can. Rows are bound in a worker thread (`sqlite_bind.prepare_params`: one pass per report,
de-duplicated, first wins, request_id order); then, in one transaction on aiosqlite's
connection thread (none of it on the event loop):

1. a no-op write takes the database's write lock, so nothing commits between the next two
   statements, and the largest rowid is read: rows inserted from here on have larger rowids
   (SQLite gives a new row max(rowid) + 1);
2. the details go in with multi-row `INSERT … ON CONFLICT (request_id) DO NOTHING`, chunked
   under SQLite's bound-variable limit;
3. the hour and day deltas of exactly the rows inserted (`rowid > before`; their count is
   checked against the inserts') are aggregated by one `GROUP BY` statement, built from
   `ROLLUP_SPECS`' SQL; costs are summed exactly as integer parts and 1e-10 fractions
   (SQLite's own arithmetic on decimal text is binary float) and joined in Python per key;
4. the deltas are upserted additively in key order (costs with the exact `dec_add` function).

So the Python work per report is the binding alone; aggregation is per rollup key.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.money import from_units, money_text
from exporter.store.rollup_sums import ROLLUP_SPECS
from exporter.store.rows import DERIVED_KEY, DETAIL_COLUMNS, DIMENSIONS, ROLLUP_COLUMNS
from exporter.store.sqlite_bind import prepare_params
from exporter.store.tables import ROLLUP_KEY, ROLLUP_SUMS

__all__ = ["SQLITE_MAX_VARIABLES", "prepare", "probe_sqlite", "write_sqlite"]

_T = TypeVar("_T")

SQLITE_MAX_VARIABLES = 32766  # SQLite's default limit since 3.32
_UNITS = 10**10  # cost units per USD (exporter.money.COST_SCALE)


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


def _flat(rows: Sequence[Sequence[Any]]) -> list[Any]:
    params: list[Any] = []
    for r in rows:
        params.extend(r)
    return params


_ADDITIVE = ", ".join(
    f"{_q(c)} = dec_add(usage_rollups.{_q(c)}, excluded.{_q(c)})"
    if c == "cost_usd"
    else f"{_q(c)} = usage_rollups.{_q(c)} + excluded.{_q(c)}"
    for c in ROLLUP_SUMS
)

# -- the rollup deltas of the rows just inserted, in SQL -----------------------------------------
#: stored completed_at text is "YYYY-MM-DD HH:MM:SS.ffffff" UTC (sqlite_bind.sqlite_timestamp)
_BUCKETS = {
    "hour": "substr(completed_at, 1, 13) || ':00:00.000000'",
    "day": "substr(completed_at, 1, 10) || ' 00:00:00.000000'",
}
#: SQLite spelling of the derived key parts (rows.DERIVED_KEY): no promoted tags yet
_DERIVED_SQL = {"dims": "'{}'"}
assert set(_DERIVED_SQL) == set(DERIVED_KEY), "a derived rollup key part needs SQLite SQL"
_KEY_NAMES = [*DIMENSIONS, *(c for c in ROLLUP_KEY if c in DERIVED_KEY)]
_KEY_SQL = [_DERIVED_SQL[c] if c in DERIVED_KEY else _q(c) for c in _KEY_NAMES]
# the cost text has exactly 10 decimals: its sign, integer part and fraction as integers
_SIGN = "(CASE WHEN substr(cost_usd, 1, 1) = '-' THEN -1 ELSE 1 END)"
_WHOLE = "CAST(substr(ltrim(cost_usd, '-'), 1, length(ltrim(cost_usd, '-')) - 11) AS INTEGER)"
_FRACTION = "CAST(substr(cost_usd, -10) AS INTEGER)"
_SUMS_SQL = [
    f"coalesce(sum({_SIGN} * {_WHOLE}), 0), coalesce(sum({_SIGN} * {_FRACTION}), 0)"
    if c == "cost_usd"
    else ROLLUP_SPECS[c].sql
    for c in ROLLUP_SUMS
]
_COST_AT = ROLLUP_SUMS.index("cost_usd")


def _deltas_sql() -> str:
    selects = []
    for granularity, bucket in _BUCKETS.items():
        keys = [bucket, *_KEY_SQL]
        selects.append(
            f"SELECT '{granularity}', {', '.join(keys)}, {', '.join(_SUMS_SQL)} "  # noqa: S608
            f"FROM usage_details WHERE rowid > ? GROUP BY {', '.join(keys)}"
        )
    return " UNION ALL ".join(selects)


DELTAS_SQL = _deltas_sql()
_IN_KEY_ORDER = [ROLLUP_KEY.index(c) for c in ("granularity", "bucket_start", *_KEY_NAMES)]


def _rollup_row(selected: Sequence[Any]) -> tuple[Any, ...]:
    """A selected delta (key in _KEY order, sums with the cost as two integers) as the rollup
    row SQLite binds, in ROLLUP_COLUMNS order."""
    n_key = len(ROLLUP_KEY)
    key: list[Any] = [None] * n_key
    for value, at in zip(selected[:n_key], _IN_KEY_ORDER, strict=True):
        key[at] = value
    sums = list(selected[n_key:])
    whole, fraction = sums[_COST_AT], sums[_COST_AT + 1]
    sums[_COST_AT : _COST_AT + 2] = [money_text(from_units(whole * _UNITS + fraction))]
    return (*key, *sums)


def prepare(payloads: Sequence[bytes]) -> tuple[int, list[tuple[Any, ...]]]:
    """(reports received, distinct detail rows as SQLite binds them, by request_id).

    Raises RowRefused for data no backend can store.
    """
    return prepare_params(payloads, datetime.now(UTC))


def _write_rows(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> tuple[int, int]:
    """(inserted, rollup rows): the statements of one batch, on the driver's own thread.

    Runs inside the transaction SQLAlchemy began on this connection. The statement count is
    O(1) in the reports (chunks of up to 1,000 rows), never one per report.
    """
    cur = db.cursor()
    try:
        cur.execute("UPDATE usage_rollups SET requests = requests WHERE 0")  # the write lock
        cur.execute("SELECT coalesce(max(rowid), 0) FROM usage_details")
        (before,) = cur.fetchone()
        width = len(DETAIL_COLUMNS)
        inserted = 0
        for chunk in _chunks(rows, width):
            cur.execute(
                f"INSERT INTO usage_details ({_cols(DETAIL_COLUMNS)}) "  # noqa: S608
                f"VALUES {_placeholders(len(chunk), width)} "
                "ON CONFLICT (request_id) DO NOTHING",
                _flat(chunk),
            )
            inserted += cur.rowcount
        if not inserted:
            return 0, 0
        cur.execute(DELTAS_SQL, (before, before))
        rollups = sorted(_rollup_row(r) for r in cur.fetchall())
        hour_requests = sum(
            r[len(ROLLUP_KEY)] for r in rollups if r[0] == "hour"
        )  # requests is the first sum
        if hour_requests != inserted:  # rowids were not allocated past `before`: never silent
            raise RuntimeError(f"SQLite flush: {inserted} rows inserted, {hour_requests} found")
        width = len(ROLLUP_COLUMNS)
        for chunk in _chunks(rollups, width):
            cur.execute(
                f"INSERT INTO usage_rollups ({_cols(ROLLUP_COLUMNS)}) "  # noqa: S608
                f"VALUES {_placeholders(len(chunk), width)} "
                f"ON CONFLICT ({_cols(ROLLUP_KEY)}) DO UPDATE SET {_ADDITIVE}",
                _flat(chunk),
            )
        return inserted, len(rollups)
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


async def write_sqlite(engine: AsyncEngine, payloads: Sequence[bytes]) -> tuple[int, int, int]:
    """(received, inserted, rollup rows) of one transaction over WAL record payloads."""
    # Per-report Python work runs in threads, so the event loop keeps serving ingest.
    received, rows = await asyncio.to_thread(prepare, payloads)
    if not rows:
        return received, 0, 0
    async with engine.begin() as conn:
        inserted, rollups = await on_driver_thread(conn, _write_rows, rows)
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
