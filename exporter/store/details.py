"""Audit-row reads: keyset pages of requests, one request, the rows of one trace.

Pages are ordered newest first by (completed_at, request_id), a unique key, and the cursor is
the last row's key: a page never shifts when reports arrive (unlike OFFSET), so paging through
a range returns every row that was there exactly once. Rows flushed meanwhile show up only if
their key sorts after the cursor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.readsql import bounded
from exporter.store.tables import usage_details

__all__ = ["DETAIL_FIELDS", "Page", "request_by_id", "request_page", "trace_rows"]

#: What a request row shows: every audit column but the internal insert time.
DETAIL_FIELDS: tuple[str, ...] = tuple(
    str(c.name) for c in usage_details.c if c.name != "inserted_at"
)
#: Columns /v1/requests may filter on by equality (besides the from/to range).
FILTER_COLUMNS = ("model", "provider", "operation", "user", "team", "api_key_id", "node",
                  "trace_id", "status", "error_type", "source")  # fmt: skip
_COLUMNS = [usage_details.c[name] for name in DETAIL_FIELDS]


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[dict[str, Any]]
    #: (completed_at, request_id) of the last row when more may follow, else None
    next_key: tuple[datetime, str] | None


def _row(r: Any) -> dict[str, Any]:
    return dict(zip(DETAIL_FIELDS, r, strict=True))


async def request_page(
    engine: AsyncEngine,
    *,
    since: datetime | None,
    until: datetime | None,
    filters: Mapping[str, tuple[str, ...]],
    after: tuple[datetime, str] | None,
    limit: int,
    time_limit: float,
) -> Page:
    """Up to `limit` rows older than `after` (newest first) matching the filters."""
    t = usage_details
    conds: list[ColumnElement[bool]] = []
    if since is not None:
        conds.append(t.c.completed_at >= since)
    if until is not None:
        conds.append(t.c.completed_at < until)
    for name, values in sorted(filters.items()):
        if name not in FILTER_COLUMNS:
            raise ValueError(f"unknown filter {name!r}")
        conds.append(t.c[name].in_(values))
    if after is not None:
        conds.append(tuple_(t.c.completed_at, t.c.request_id) < tuple_(*after))
    stmt = (
        select(*_COLUMNS)
        .where(and_(True, *conds))
        .order_by(t.c.completed_at.desc(), t.c.request_id.desc())
        .limit(limit + 1)
    )
    async with bounded(engine, time_limit) as conn:
        rows = [_row(r) for r in (await conn.execute(stmt)).all()]
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if more and rows else None
    return Page(rows, (last["completed_at"], last["request_id"]) if last else None)


async def request_by_id(
    engine: AsyncEngine, request_id: str, time_limit: float
) -> dict[str, Any] | None:
    stmt = select(*_COLUMNS).where(usage_details.c.request_id == request_id)
    async with bounded(engine, time_limit) as conn:
        row = (await conn.execute(stmt)).first()
    return None if row is None else _row(row)


async def trace_rows(
    engine: AsyncEngine, trace_id: str, max_rows: int, time_limit: float
) -> list[dict[str, Any]]:
    """The audit rows of one trace (at most `max_rows` + 1, so callers can tell it was cut)."""
    t = usage_details
    stmt = (
        select(*_COLUMNS)
        .where(t.c.trace_id == trace_id)
        .order_by(t.c.completed_at, t.c.request_id)
        .limit(max_rows + 1)
    )
    async with bounded(engine, time_limit) as conn:
        return [_row(r) for r in (await conn.execute(stmt)).all()]
