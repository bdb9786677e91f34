"""The exactly-once batch write on SQLite (the embedded default).

Same protocol as the Postgres statement, with SQLite doing the per-report work in C where it
can. Rows are bound in a worker thread (`sqlite_bind.prepare_params`: one pass per report,
de-duplicated, first wins, request_id order); then, in one transaction on aiosqlite's
connection thread (none of it on the event loop):

1. a no-op write takes the database's write lock, so nothing commits between the next two
   statements, and the largest rowid is read: rows inserted from here on have larger rowids
   (SQLite gives a new row max(rowid) + 1; only past rowid 2**63 - 1 would it pick others,
   and then the count check below fails the flush instead of miscounting);
2. the details go in with multi-row `INSERT … ON CONFLICT (request_id) DO NOTHING`, chunked
   under SQLite's bound-variable limit;
3. the hour deltas of exactly the rows inserted (`rowid > before`; their count is checked
   against the inserts') are aggregated by one `GROUP BY` statement built from
   `ROLLUP_SPECS`' SQL, costs summed exactly as integer parts and 1e-10 fractions (SQLite's
   own arithmetic on decimal text is binary float); the day deltas are summed from the hours,
   per key, in Python;
4. the deltas are upserted additively in key order (costs with the exact `dec_add` function).

So the Python work per report is the binding alone; aggregation is per rollup key.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from operator import add, itemgetter
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.money import UNITS_PER_USD, from_units, money_text
from exporter.store.dims import dims_text
from exporter.store.rollup_sums import ROLLUP_SPECS
from exporter.store.rows import DERIVED_KEY, DETAIL_COLUMNS, DIMENSIONS, ROLLUP_COLUMNS
from exporter.store.sqlite_bind import prepare_params
from exporter.store.tables import ROLLUP_KEY, ROLLUP_SUMS, usage_details

__all__ = ["SQLITE_MAX_VARIABLES", "prepare", "probe_sqlite", "write_sqlite"]

_T = TypeVar("_T")

SQLITE_MAX_VARIABLES = 32766  # SQLite's default limit since 3.32


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


# -- narrow inserts: what the database fills itself is not bound ------------------------------
def _filled_by_database(name: str) -> tuple[bool, Any]:
    """(whether SQLite stores the same value when the column is left out, that value)."""
    column = usage_details.c[name]
    default = column.server_default
    arg = getattr(default, "arg", None)
    text = None if default is None else str(getattr(arg, "text", arg)).strip().lower()
    value: Any = {"''": "", "0": 0, "false": False, "true": True}.get(text or "", _NOTHING)
    if default is None and column.nullable:
        value = None
    return value is not _NOTHING, value


_NOTHING = object()
#: Columns most reports leave at their default (billed extras, stream estimates, the tier,
#: attribution below the node, tags): a row whose values there are all the defaults is inserted
#: without them (about half the parameters to bind, the GIL held for half as long).
RARELY_SET = ("parent_id", "cache_creation_input_tokens", "stream", "completed", "estimated",
              "output_chunk_count", "request_content_bytes", "tags", "service_tier",
              "unpriced_reason", "cost_sent", "cache_creation_1h_input_tokens",
              "input_audio_tokens", "cached_audio_input_tokens", "output_audio_tokens",
              "input_image_tokens", "output_image_tokens", "web_search_requests")  # fmt: skip
_FILLED: Mapping[str, Any] = {c: v for c in RARELY_SET for ok, v in [_filled_by_database(c)] if ok}
assert set(_FILLED) == set(RARELY_SET), "a RARELY_SET column without a database default"
_AT = {c: i for i, c in enumerate(DETAIL_COLUMNS)}
_rare = itemgetter(*(_AT[c] for c in RARELY_SET))
_RARE_DEFAULTS = tuple(_FILLED[c] for c in RARELY_SET)
NARROW_COLUMNS = tuple(c for c in DETAIL_COLUMNS if c not in _FILLED)
_narrow = itemgetter(*(_AT[c] for c in NARROW_COLUMNS))


def _split(rows: Sequence[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], list[Any]]:
    """(rows bound in NARROW_COLUMNS, rows bound in full)."""
    narrow: list[tuple[Any, ...]] = []
    full: list[Any] = []
    for r in rows:
        if _rare(r) == _RARE_DEFAULTS:  # tuple ==: bools and ints only meet in bool columns
            narrow.append(_narrow(r))
        else:
            full.append(r)
    return narrow, full


_ADDITIVE = ", ".join(
    f"{_q(c)} = dec_add(usage_rollups.{_q(c)}, excluded.{_q(c)})"
    if c == "cost_usd"
    else f"{_q(c)} = usage_rollups.{_q(c)} + excluded.{_q(c)}"
    for c in ROLLUP_SUMS
)

# -- the rollup deltas of the rows just inserted, in SQL -----------------------------------------
#: stored completed_at text is "YYYY-MM-DD HH:MM:SS.ffffff" UTC (sqlite_bind.sqlite_timestamp)
_HOUR = "substr(completed_at, 1, 13) || ':00:00.000000'"
#: SQLite spelling of the derived key parts (rows.DERIVED_KEY): `dims` is constant without
#: promoted tags, else `llm_dims(tags)`, a function `_write_rows` registers that calls
#: store.dims.dims_text (the one Python definition) on the stored tags
_DERIVED_SQL = {"dims": ("'{}'", "llm_dims(tags)")}
assert set(_DERIVED_SQL) == set(DERIVED_KEY), "a derived rollup key part needs SQLite SQL"
_KEY_NAMES = ("bucket_start", *DIMENSIONS, *(c for c in ROLLUP_KEY if c in DERIVED_KEY))
# the cost text has exactly 10 decimals: its (signed) integer part and its signed fraction
_WHOLE = "CAST(cost_usd AS INTEGER)"
_FRACTION = (
    "CAST(substr(cost_usd, -10) AS INTEGER) * (CASE WHEN substr(cost_usd, 1, 1) = '-' "
    "THEN -1 ELSE 1 END)"
)
_SUMS_SQL = [
    f"coalesce(sum({_WHOLE}), 0), coalesce(sum({_FRACTION}), 0)"
    if c == "cost_usd"
    else ROLLUP_SPECS[c].sql
    for c in ROLLUP_SUMS
]


def hours_sql(promoted: bool) -> str:
    """The hour deltas of the rows past a rowid (days are summed from them per key, in Python);
    `promoted`: whether `dims` comes from promoted tags."""
    keys = [_HOUR] + [
        _DERIVED_SQL[c][promoted] if c in DERIVED_KEY else _q(c) for c in _KEY_NAMES[1:]
    ]
    return (
        f"SELECT {', '.join(keys)}, {', '.join(_SUMS_SQL)} "  # noqa: S608
        "FROM usage_details WHERE rowid > ? GROUP BY "
        + ", ".join(str(i) for i in range(1, len(keys) + 1))
    )


_HOURS_SQL = (hours_sql(False), hours_sql(True))
_N_KEY = len(_KEY_NAMES)
_COST_AT = ROLLUP_SUMS.index("cost_usd")
_IN_KEY_ORDER = [ROLLUP_KEY.index(c) for c in ("granularity", *_KEY_NAMES)]
_REQUESTS, _GRANULARITY = ROLLUP_COLUMNS.index("requests"), ROLLUP_COLUMNS.index("granularity")


def _rollup_row(granularity: str, selected: Sequence[Any]) -> tuple[Any, ...]:
    """A delta (key in _KEY_NAMES order, sums with the cost as two integers) as the rollup row
    SQLite binds, in ROLLUP_COLUMNS order."""
    key: list[Any] = [None] * len(ROLLUP_KEY)
    for value, at in zip((granularity, *selected[:_N_KEY]), _IN_KEY_ORDER, strict=True):
        key[at] = value
    sums = list(selected[_N_KEY:])
    whole, fraction = sums[_COST_AT], sums[_COST_AT + 1]
    sums[_COST_AT : _COST_AT + 2] = [money_text(from_units(whole * UNITS_PER_USD + fraction))]
    return (*key, *sums)


def _deltas(hours: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Hour and day rollup rows of the selected hour deltas, sorted by the rollup key."""
    days: dict[tuple[Any, ...], list[Any]] = {}
    for h in hours:
        key = (h[0][:10] + " 00:00:00.000000", *h[1:_N_KEY])
        day = days.get(key)
        if day is None:
            days[key] = list(h[_N_KEY:])
        else:
            day[:] = map(add, day, h[_N_KEY:])
    out = [_rollup_row("hour", h) for h in hours]
    out += [_rollup_row("day", (*k, *sums)) for k, sums in days.items()]
    out.sort()  # the rollup key leads each row, and keys are unique
    return out


def prepare(payloads: Sequence[bytes]) -> tuple[int, list[tuple[Any, ...]]]:
    """(reports received, distinct detail rows as SQLite binds them, by request_id).

    Raises RowRefused for data no backend can store.
    """
    return prepare_params(payloads, datetime.now(UTC))


def _dims_function(keys: tuple[str, ...]) -> Callable[[str | None], str]:
    def llm_dims(tags: str | None) -> str:
        return dims_text(None if tags is None else orjson.loads(tags), keys)

    return llm_dims


def _write_rows(
    db: sqlite3.Connection, rows: list[tuple[Any, ...]], dims_keys: tuple[str, ...] = ()
) -> tuple[int, int]:
    """(inserted, rollup rows): the statements of one batch, on the driver's own thread.

    Runs inside the transaction SQLAlchemy began on this connection. The statement count is
    O(1) in the reports (chunks of up to 1,000 rows), never one per report.
    """
    cur = db.cursor()
    try:
        cur.execute("UPDATE usage_rollups SET requests = requests WHERE 0")  # the write lock
        cur.execute("SELECT coalesce(max(rowid), 0) FROM usage_details")
        (before,) = cur.fetchone()
        inserted = 0
        narrow, full = _split(rows)
        for columns, bound in ((NARROW_COLUMNS, narrow), (DETAIL_COLUMNS, full)):
            width = len(columns)
            for chunk in _chunks(bound, width):
                cur.execute(
                    f"INSERT INTO usage_details ({_cols(columns)}) "  # noqa: S608
                    f"VALUES {_placeholders(len(chunk), width)} "
                    "ON CONFLICT (request_id) DO NOTHING",
                    _flat(chunk),
                )
                inserted += cur.rowcount
        if not inserted:
            return 0, 0
        if dims_keys:  # per row only with promoted tags; dims_text is the one definition
            db.create_function("llm_dims", 1, _dims_function(dims_keys), deterministic=True)
        cur.execute(_HOURS_SQL[bool(dims_keys)], (before,))
        rollups = _deltas(cur.fetchall())
        hour_requests = sum(r[_REQUESTS] for r in rollups if r[_GRANULARITY] == "hour")
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
