"""Read helpers over the stored usage: spend (budgets).

Costs are summed exactly: by Postgres NUMERIC, and in Python Decimal on SQLite, whose own
SUM() over the exact cost text would go through binary floats.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, Table, and_, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.tables import (
    COST_QUANTUM,
    to_decimal,
    usage_rollups,
)
from exporter.timeutil import as_utc

Granularity = Literal["hour", "day"]
_ZERO = Decimal(0).quantize(COST_QUANTUM)


async def _sum_cost(engine: AsyncEngine, stmt: Select[Any]) -> Decimal:
    """Exact sum of a one-column select of costs, or of its SUM() on Postgres."""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            value = (await conn.execute(stmt)).scalar_one()
            return _ZERO if value is None else to_decimal(value)
        total = _ZERO
        result = await conn.stream(stmt)
        async for (cost,) in result:
            if cost is not None:
                total += cost
        return total


def _cost_select(table: Table, where: ColumnElement[bool], is_pg: bool) -> Select[Any]:
    col = table.c.cost_usd
    return select(func.sum(col) if is_pg else col).where(where)


def _day_floor(dt: datetime) -> datetime:
    return dt.replace(hour=0, minute=0, second=0, microsecond=0)


def _day_ceil(dt: datetime) -> datetime:
    floor = _day_floor(dt)
    return floor if floor == dt else floor + timedelta(days=1)


def _spans(since: datetime, until: datetime) -> list[tuple[Granularity, datetime, datetime]]:
    """Cover [since, until) with whole UTC days from day rollups and hours at the edges."""
    first_day, last_day = _day_ceil(since), _day_floor(until)
    if first_day >= last_day:
        return [("hour", since, until)]
    spans: list[tuple[Granularity, datetime, datetime]] = [("day", first_day, last_day)]
    if since < first_day:
        spans.append(("hour", since, first_day))
    if last_day < until:
        spans.append(("hour", last_day, until))
    return spans


async def spend(
    engine: AsyncEngine,
    since: datetime,
    until: datetime,
    user: str | None = None,
    team: str | None = None,
    api_key_id: str | None = None,
    model: str | None = None,
) -> Decimal:
    """Stored USD cost of the requests completed in [since, until), exactly.

    None matches anything; a string (even '') matches exactly. Windows aligned to UTC hours
    are exact (days, weeks and months are); otherwise the hour buckets *starting* inside the
    window count. Whole days are read from day rollups, edges from hour rollups.
    """
    since, until = as_utc(since), as_utc(until)
    if until <= since:
        return _ZERO
    t = usage_rollups
    match: list[ColumnElement[bool]] = []
    for column, value in (("user", user), ("team", team), ("api_key_id", api_key_id),
                          ("model", model)):  # fmt: skip
        if value is not None:
            match.append(t.c[column] == value)
    is_pg = engine.dialect.name == "postgresql"
    total = _ZERO
    for granularity, start, end in _spans(since, until):
        where = and_(
            t.c.granularity == granularity,
            t.c.bucket_start >= start,
            t.c.bucket_start < end,
            *match,
        )
        total += await _sum_cost(engine, _cost_select(t, where, is_pg))
    return total
