"""Read helpers over the stored usage: totals (tests, API) and spend (budgets).

Costs are summed exactly: by Postgres NUMERIC, and in Python Decimal on SQLite, whose own
SUM() over the exact cost text would go through binary floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, Table, and_, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.tables import (
    COST_QUANTUM,
    ROLLUP_KEY,
    ROLLUP_SUMS,
    to_decimal,
    usage_details,
    usage_rollups,
)

Granularity = Literal["hour", "day"]
_ZERO = Decimal(0).quantize(COST_QUANTUM)
_TOKENS = ("input_tokens", "output_tokens", "cached_input_tokens",
           "cache_creation_input_tokens", "reasoning_tokens")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over a set of requests; the same shape for details and rollups."""

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = _ZERO
    duration_ms_sum: float = 0.0

    def exact(self) -> tuple[Any, ...]:
        """Every field but the float duration sum, for exact comparisons."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "duration_ms_sum")


def _totals(counts: Sequence[Any], cost: Decimal, duration: Any) -> Totals:
    c = [int(v) for v in counts]
    return Totals(c[0], c[1], c[2], c[3], c[4], c[5], c[6], cost, float(duration))


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


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


async def detail_totals(
    engine: AsyncEngine, since: datetime | None = None, until: datetime | None = None
) -> Totals:
    """Totals over the audit rows, optionally for completed_at in [since, until)."""
    t = usage_details
    conds: list[ColumnElement[bool]] = []
    if since is not None:
        conds.append(t.c.completed_at >= _utc(since))
    if until is not None:
        conds.append(t.c.completed_at < _utc(until))
    where = and_(True, *conds)
    stmt = select(
        func.count(),
        func.count().filter(t.c.status != "success"),
        *(func.coalesce(func.sum(t.c[c]), 0) for c in _TOKENS),
        func.coalesce(func.sum(t.c.duration_ms), 0.0),
    ).where(where)
    async with engine.connect() as conn:
        row = (await conn.execute(stmt)).one()
    cost = await _sum_cost(engine, _cost_select(t, where, engine.dialect.name == "postgresql"))
    return _totals(row[:7], cost, row[7])


async def rollup_totals(
    engine: AsyncEngine,
    granularity: Granularity,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Totals:
    """Totals over the rollups of one granularity, for bucket_start in [since, until)."""
    t = usage_rollups
    conds: list[ColumnElement[bool]] = [t.c.granularity == granularity]
    if since is not None:
        conds.append(t.c.bucket_start >= _utc(since))
    if until is not None:
        conds.append(t.c.bucket_start < _utc(until))
    where = and_(*conds)
    sums = ROLLUP_SUMS[: ROLLUP_SUMS.index("cost_usd")]  # the seven counts
    stmt = select(
        *(func.coalesce(func.sum(t.c[c]), 0) for c in sums),
        func.coalesce(func.sum(t.c.duration_ms_sum), 0.0),
    ).where(where)
    async with engine.connect() as conn:
        row = (await conn.execute(stmt)).one()
    cost = await _sum_cost(engine, _cost_select(t, where, engine.dialect.name == "postgresql"))
    return _totals(row[:7], cost, row[7])


RollupKey = tuple[str, datetime, str, str, str, str, str, str]


async def rollup_rows(
    engine: AsyncEngine, granularity: Granularity | None = None
) -> dict[RollupKey, Totals]:
    """Every rollup row by its key (for tests and exports; not for large tables)."""
    t = usage_rollups
    stmt = select(*(t.c[c] for c in ROLLUP_KEY), *(t.c[c] for c in ROLLUP_SUMS))
    if granularity is not None:
        stmt = stmt.where(t.c.granularity == granularity)
    n = len(ROLLUP_KEY)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return {tuple(r[:n]): _totals(r[n : n + 7], r[n + 7], r[n + 8]) for r in rows}


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
    since, until = _utc(since), _utc(until)
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


async def request_ids(engine: AsyncEngine) -> Sequence[str]:
    """All stored request ids (tests)."""
    async with engine.connect() as conn:
        return list((await conn.execute(select(usage_details.c.request_id))).scalars())
