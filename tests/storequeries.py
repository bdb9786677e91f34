"""What the database holds, read plainly for tests: ids, totals and rollup rows.

Sums are computed here in Python (exact Decimal costs) from the stored rows, independently of
the exporter's own read queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.tables import ROLLUP_KEY, to_decimal, usage_details, usage_rollups

Granularity = Literal["hour", "day"]
Q = Decimal("1e-10")
_ZERO = Decimal(0).quantize(Q)
TOKENS = ("input_tokens", "output_tokens", "cached_input_tokens",
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
    unpriced: int = 0  # reports stored with cost NULL

    def exact(self) -> tuple[Any, ...]:
        """Every field but the float duration sum, for exact comparisons."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "duration_ms_sum")


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _sum(rows: Iterable[Any], detail: bool) -> Totals:
    n = errors = 0
    tokens = dict.fromkeys(TOKENS, 0)
    cost, duration, unpriced = _ZERO, 0.0, 0
    for r in rows:
        m = r._mapping
        n += 1 if detail else m["requests"]
        errors += (m["status"] != "success") if detail else m["errors"]
        for c in TOKENS:
            tokens[c] += m[c]
        if m["cost_usd"] is not None:
            cost += to_decimal(m["cost_usd"])
        unpriced += (m["cost_usd"] is None) if detail else m["unpriced"]
        d = m["duration_ms"] if detail else m["duration_ms_sum"]
        duration += d or 0.0
    return Totals(n, int(errors), *tokens.values(), cost, duration, unpriced)  # type: ignore[arg-type]


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
    async with engine.connect() as conn:
        rows = (await conn.execute(select(t).where(and_(True, *conds)))).all()
    return _sum(rows, detail=True)


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
    async with engine.connect() as conn:
        rows = (await conn.execute(select(t).where(and_(*conds)))).all()
    return _sum(rows, detail=False)


RollupKey = tuple[Any, ...]


async def rollup_rows(
    engine: AsyncEngine, granularity: Granularity | None = None
) -> dict[RollupKey, Totals]:
    """Every rollup row by its key (ROLLUP_KEY order)."""
    t = usage_rollups
    stmt = select(t)
    if granularity is not None:
        stmt = stmt.where(t.c.granularity == granularity)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return {tuple(r._mapping[c] for c in ROLLUP_KEY): _sum([r], detail=False) for r in rows}


async def request_ids(engine: AsyncEngine) -> Sequence[str]:
    """All stored request ids."""
    async with engine.connect() as conn:
        return list((await conn.execute(select(usage_details.c.request_id))).scalars())
