"""Stored spend in one window, grouped by the fields budgets match on, exactly.

Budgets that share a window and the fields they fix (700 per-user day budgets) are read by
one grouped query, so a refresh costs a query per kind of budget, not per budget.

Whole UTC days come from day rollups, whole hours from hour rollups and the sub-hour edges of
windows in zones with a :30 or :45 offset from the audit rows, so any window is exact. Costs are
summed by Postgres NUMERIC, or in Python Decimal on SQLite (whose SUM() would go through
floats). NULL costs (unpriced reports) count as 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Integer,
    Numeric,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    func,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.money import from_units
from exporter.store.tables import to_decimal, usage_details, usage_rollups
from exporter.timeutil import as_utc

__all__ = ["Filters", "SpendQuery", "SpendReader", "SpendSession", "split_rows", "stored_spend"]


#: field → the values to keep (a superset is fine: results are keyed by the grouped fields)
Filters = Mapping[str, Sequence[str]]
#: (window start, window end, filters, grouped fields) → stored spend per group
SpendReader = Callable[
    [datetime, datetime, Filters, Sequence[str]], Awaitable[dict[tuple[str, ...], Decimal]]
]
MAX_IN = 5000  # past this many values a filter is dropped: the grouping still separates them
ROWS_PER_PASS = 500  # result rows summed per event-loop pass


_ZERO = Decimal(0)
_DAY = timedelta(days=1)
_HOUR = timedelta(hours=1)


def _ceil(dt: datetime, step: timedelta) -> datetime:
    f = _floor(dt, step)
    return f if f == dt else f + step


def _floor(dt: datetime, step: timedelta) -> datetime:
    if step == _DAY:
        return dt.replace(hour=0, minute=0, second=0, microsecond=0)
    return dt.replace(minute=0, second=0, microsecond=0)


def spans(since: datetime, until: datetime) -> list[tuple[str, datetime, datetime]]:
    """Cover [since, until) with ('day'|'hour'|'detail', start, end) pieces, coarsest inside."""
    out: list[tuple[str, datetime, datetime]] = []

    def cover(start: datetime, end: datetime, level: int) -> None:
        if start >= end:
            return
        if level == 2:
            out.append(("detail", start, end))
            return
        step = (_DAY, _HOUR)[level]
        lo, hi = _ceil(start, step), _floor(end, step)
        if lo >= hi:
            cover(start, end, level + 1)
            return
        out.append((("day", "hour")[level], lo, hi))
        cover(start, lo, level + 1)
        cover(hi, end, level + 1)

    cover(since.astimezone(UTC), until.astimezone(UTC), 0)
    return out


#: a filter's shape in a statement: (field, one value: `=`; else IN of a list)
_Shape = tuple[tuple[str, bool], ...]


def _shape(filters: Filters) -> tuple[_Shape, dict[str, Any]]:
    """The filters as a statement shape and its bound values (`lo`/`hi` are the span's)."""
    shape: list[tuple[str, bool]] = []
    params: dict[str, Any] = {}
    for d, values in filters.items():
        if len(values) == 1:
            shape.append((d, True))
            params[f"f_{d}"] = values[0]
        elif len(values) <= MAX_IN:
            shape.append((d, False))
            params[f"f_{d}"] = list(values)
    return tuple(shape), params


@lru_cache(maxsize=256)
def _where(granularity: str, shape: _Shape, pg: bool, piece: int = 0) -> Any:
    """The span's table and WHERE, values bound at execution: a refresh builds no statement
    once each shape has been seen (building one with `_units_select` took ~1 ms of the loop).
    Postgres gets a list as one array (`= ANY($1)`): an expanding IN is re-rendered with a
    placeholder per value (700 user ids) at every execution."""
    t = usage_details if granularity == "detail" else usage_rollups
    time_col = t.c.completed_at if granularity == "detail" else t.c.bucket_start
    conds: list[ColumnElement[bool]] = [
        time_col >= bindparam(f"lo{piece}"),
        time_col < bindparam(f"hi{piece}"),
    ]
    if granularity != "detail":
        conds.append(t.c.granularity == granularity)
    for d, single in shape:
        if single:
            conds.append(t.c[d] == bindparam(f"f_{d}"))
        elif pg:
            conds.append(t.c[d] == any_(bindparam(f"f_{d}", type_=ARRAY(Text))))
        else:
            conds.append(t.c[d].in_(bindparam(f"f_{d}", expanding=True)))
    return t, and_(*conds)


@lru_cache(maxsize=256)
def _statement(granularity: str, shape: _Shape, group: tuple[str, ...], kind: str) -> Any:
    """SQLite, one span: `kind` "units" (`_units_select`) or "rows" (every cost)."""
    t, where = _where(granularity, shape, False)
    if kind == "units":
        return _units_select(t, where, group)
    return select(*[t.c[d] for d in group], t.c.cost_usd).where(where)


def _pg_statement(pieces: tuple[str, ...], shape: _Shape, group: tuple[str, ...]) -> Any:
    """Postgres (compiled once per shape by `_pg_sql`): every span of a window in one
    statement (a UNION ALL of the spans' rows, summed as NUMERIC): one round trip per read
    instead of one per span. Plain NUMERIC: asyncpg's Decimals as they are (the column's
    `Money` would re-quantize each row in Python; `to_decimal` applies the one rule once)."""
    parts = []
    for k, granularity in enumerate(pieces):
        t, where = _where(granularity, shape, True, k)
        parts.append(
            select(*[t.c[d].label(d) for d in group], t.c.cost_usd.label("cost")).where(where)
        )
    src = (union_all(*parts) if len(parts) > 1 else parts[0]).subquery("spans")
    cols = [src.c[d] for d in group]
    stmt = select(*cols, func.sum(src.c.cost, type_=Numeric(asdecimal=True)))
    return stmt.group_by(*cols) if cols else stmt


_PG_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


@lru_cache(maxsize=256)
def _pg_sql(
    pieces: tuple[str, ...], shape: _Shape, group: tuple[str, ...]
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """`_pg_statement` compiled once: (SQL with $n placeholders, the bind name of each, the
    constant binds' values). The refresh runs it on the driver's connection: no per-read
    compile-cache lookup, bind processing or Row objects, and no BEGIN/ROLLBACK round trips
    around a single SELECT (each statement is its own snapshot, taken after it started)."""
    compiled = _pg_statement(pieces, shape, group).compile(dialect=_PG_DIALECT)
    names = tuple(compiled.positiontup or ())
    constants = {k: b.value for k, b in compiled.binds.items() if b.value is not None}
    return compiled.string, names, constants


def _units_select(t: Any, where: Any, group: Sequence[str]) -> Any:
    """SQLite: an exact SUM in 1e-10 USD integer units of the canonical cost text (ten
    decimals, as the store writes it), with a count of rows not in that form (then Python
    sums that span instead)."""
    c = t.c.cost_usd
    canonical = and_(func.instr(c, ".") > 0, func.length(c) - func.instr(c, ".") == 10)
    units = func.sum(case((canonical, cast(func.replace(c, ".", ""), Integer))))
    odd = func.sum(case((and_(c.is_not(None), ~canonical), 1), else_=0))
    cols = [t.c[d] for d in group]
    stmt = select(*cols, type_coerce(units, Integer), type_coerce(odd, Integer)).where(where)
    return stmt.group_by(*cols) if cols else stmt


async def stored_spend(
    engine: AsyncEngine, since: datetime, until: datetime, filters: Filters, group: Sequence[str]
) -> dict[tuple[str, ...], Decimal]:
    """Stored USD completed in [since, until) per value of the `group` fields (one total under
    `()` without any), for the rows whose fields are among `filters`; zero sums are absent.
    Exact on both backends: Postgres sums NUMERIC; SQLite sums integer units in SQL (on its
    own thread, not the event loop), or Decimals in Python for odd rows or on overflow."""
    async with engine.connect() as conn:
        return await _spend_on(conn, since, until, filters, group)


async def _spend_on(
    conn: AsyncConnection, since: datetime, until: datetime, filters: Filters,
    group: Sequence[str],
) -> dict[tuple[str, ...], Decimal]:  # fmt: skip
    is_pg = conn.dialect.name == "postgresql"
    n = len(group)
    totals: dict[tuple[str, ...], Decimal] = {}

    def add(key: tuple[Any, ...], amount: Decimal) -> None:
        k = tuple(str(v) for v in key)
        totals[k] = totals.get(k, _ZERO) + amount

    shape, bound = _shape(filters)
    fields = tuple(group)
    pieces = spans(since, until)
    if not pieces:  # an empty or inverted window holds nothing
        return totals
    if is_pg:
        raw: Any = (await conn.get_raw_connection()).driver_connection  # asyncpg's
        sql, names, constants = _pg_sql(tuple(g for g, _, _ in pieces), shape, fields)
        params = {**constants, **bound}
        for k, (_, start, end) in enumerate(pieces):
            params[f"lo{k}"], params[f"hi{k}"] = as_utc(start), as_utc(end)
        # a backend killed mid-read or a read cancelled at its timeout leaves nothing for the
        # pool to hand out broken: asyncpg settles the cancel, pre-ping finds a dead one
        # (tests/test_budget_pg_read.py)
        records = await raw.fetch(sql, *[params[p] for p in names])
        for i, row in enumerate(records, 1):
            if row[n] is not None:  # one row per group (GROUP BY): nothing to add up
                totals[tuple(map(str, row[:n]))] = to_decimal(row[n])
            if i % ROWS_PER_PASS == 0:  # 2,000 template values: slices of the loop
                await asyncio.sleep(0)
        return totals
    for granularity, start, end in pieces:
        params = {**bound, "lo0": start, "hi0": end}
        try:
            stmt = _statement(granularity, shape, fields, "units")
            rows = (await conn.execute(stmt, params)).all()
        except OverflowError:
            rows = None
        except Exception as exc:  # SQLite's "integer overflow" past 9.2e8 USD in a sum
            if "overflow" not in str(exc):
                raise
            rows = None
        if rows is not None and not any(r[n + 1] for r in rows):
            for r in rows:
                if r[n] is not None:
                    add(r[:n], from_units(r[n]))
            continue
        result = await conn.stream(_statement(granularity, shape, fields, "rows"), params)
        async for part in result.partitions(ROWS_PER_PASS):  # yield between slices
            for r in part:
                if r[n] is not None:
                    add(r[:n], r[n] if isinstance(r[n], Decimal) else to_decimal(r[n]))
            await asyncio.sleep(0)
    return totals


class SpendSession:
    """A refresh's reads on one connection (a pool checkout with its ping per query was most
    of a refresh's event-loop callbacks on SQLite). Each read ends its transaction (on
    Postgres it has none: one statement on the driver's connection), so the next one, started
    later, sees every commit made in between."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def __call__(
        self, since: datetime, until: datetime, filters: Filters, group: Sequence[str]
    ) -> dict[tuple[str, ...], Decimal]:
        try:
            return await _spend_on(self._conn, since, until, filters, group)
        finally:
            await self._conn.rollback()

    async def version(self) -> str | None:
        """The database's state as text: equal at two calls only if no transaction committed
        anything in between, so a read made between them still holds. Postgres: the
        snapshot (xmin:xmax:running xids: a write takes an xid at or past xmax, a commit
        leaves the running list). SQLite: `data_version` (others' commits) with
        `total_changes()` (this connection's own), valid for this connection only. None: no
        such function (Postgres < 13), every read is made."""
        conn = self._conn
        try:
            if conn.dialect.name == "postgresql":
                raw: Any = (await conn.get_raw_connection()).driver_connection
                try:
                    return str(await raw.fetchval(_PG_VERSION))
                except Exception as exc:
                    if getattr(exc, "sqlstate", None) == "42883":  # undefined_function
                        return None
                    raise
            if _CONN_NUMBER not in conn.info:
                conn.info[_CONN_NUMBER] = next(_CONN_NUMBERS)
            row: Any = (await conn.exec_driver_sql(_SQLITE_VERSION)).one()
            return f"{conn.info[_CONN_NUMBER]}:{row[0]}:{row[1]}"
        finally:
            await conn.rollback()


_PG_VERSION = "SELECT pg_current_snapshot()::text"
_SQLITE_VERSION = "SELECT data_version, total_changes() FROM pragma_data_version()"
_CONN_NUMBER = "exporter.spend_version"  # the connection's number, in its `info`
_CONN_NUMBERS = itertools.count(1)


class SpendQuery:
    """What the tracker calls to read the database; the engine's owner closes it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[SpendSession]:
        """One connection for a refresh's queries."""
        async with self._engine.connect() as conn:
            yield SpendSession(conn)

    async def __call__(
        self, since: datetime, until: datetime, filters: Filters, group: Sequence[str]
    ) -> dict[tuple[str, ...], Decimal]:
        return await stored_spend(self._engine, since, until, filters, group)


def split_rows(
    rows: Mapping[tuple[str, ...], Decimal], n: int
) -> dict[tuple[str, ...], dict[str, Decimal]]:
    """Grouped rows by their first `n` fields (a budget's fixed values) → template value
    (the last field, or '') → spend."""
    out: dict[tuple[str, ...], dict[str, Decimal]] = {}
    for key, amount in rows.items():
        value = key[n] if len(key) > n else ""
        out.setdefault(key[:n], {})[value] = amount
    return out
