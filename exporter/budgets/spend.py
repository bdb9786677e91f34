"""Stored spend of one budget spec in one window, per template value, exactly.

Whole UTC days come from day rollups, whole hours from hour rollups and the sub-hour edges of
windows in zones with a :30 or :45 offset from the audit rows, so any window is exact. Costs are
summed by Postgres NUMERIC, or in Python Decimal on SQLite (whose SUM() would go through
floats). NULL costs (unpriced reports) count as 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, func, literal, select
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.tables import to_decimal, usage_details, usage_rollups

__all__ = ["Match", "SpendQuery", "stored_spend"]

DIMENSIONS = ("user", "team", "api_key_id", "model")


@dataclass(frozen=True, slots=True)
class Match:
    """Fixed match fields (None = any) and the template field to group by (None = one total)."""

    user: str | None = None
    team: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    per: str | None = None

    def fixed(self) -> Mapping[str, str]:
        return {d: v for d in DIMENSIONS if (v := getattr(self, d)) is not None}


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


def _select(table: Table, granularity: str, start: datetime, end: datetime, m: Match,
            is_pg: bool) -> Any:  # fmt: skip
    t = table
    time_col = t.c.completed_at if granularity == "detail" else t.c.bucket_start
    conds: list[ColumnElement[bool]] = [time_col >= start, time_col < end]
    if granularity != "detail":
        conds.append(t.c.granularity == granularity)
    conds.extend(t.c[d] == v for d, v in m.fixed().items())
    group = t.c[m.per] if m.per else literal("")
    if is_pg:
        stmt = select(group, func.sum(t.c.cost_usd)).where(and_(*conds))
        return stmt.group_by(t.c[m.per]) if m.per else stmt
    return select(group, t.c.cost_usd).where(and_(*conds))


async def stored_spend(
    engine: AsyncEngine, since: datetime, until: datetime, match: Match
) -> dict[str, Decimal]:
    """Stored USD completed in [since, until) per template value ('' without a template);
    values that spent nothing are absent."""
    is_pg = engine.dialect.name == "postgresql"
    totals: dict[str, Decimal] = {}
    async with engine.connect() as conn:
        for granularity, start, end in spans(since, until):
            table = usage_details if granularity == "detail" else usage_rollups
            stmt = _select(table, granularity, start, end, match, is_pg)
            result = await conn.stream(stmt)
            async for rows in result.partitions(5000):  # one thread hop per partition
                for value, cost in rows:
                    if cost is not None:
                        key = str(value)
                        totals[key] = totals.get(key, Decimal(0)) + to_decimal(cost)
    return totals


class SpendQuery:
    """What the tracker calls to read the database; the engine's owner closes it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def __call__(self, since: datetime, until: datetime, match: Match) -> dict[str, Decimal]:
        return await stored_spend(self._engine, since, until, match)
