"""Calendar periods in a time zone, and which rollups (hour or day) cover each one.

Rollup buckets are UTC hours and UTC days. A period (a local hour, day, ISO week or month,
clipped to the asked range) is read from day rollups for the whole UTC days inside it and from
hour rollups for the rest; a bucket belongs to the period its start falls in. In a zone whose
offset is not a whole number of hours, local period edges fall inside UTC hours: the hour
bucket then counts in the period where it starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

__all__ = ["PERIOD_UNITS", "Period", "Segment", "ceil_hour", "count_periods", "periods", "segments"]

PeriodUnit = Literal["hour", "day", "week", "month"]
PERIOD_UNITS: tuple[PeriodUnit, ...] = ("hour", "day", "week", "month")
_MIN_LENGTH = {"hour": 3600, "day": 23 * 3600, "week": 7 * 23 * 3600, "month": 28 * 23 * 3600}


class Period(NamedTuple):
    """`label`: the local start of the calendar period; [start, end): its UTC part in range."""

    label: datetime | None
    start: datetime
    end: datetime


class Segment(NamedTuple):
    period: int  # index into the periods list
    granularity: Literal["hour", "day"]
    start: datetime
    end: datetime


def ceil_hour(dt: datetime) -> datetime:
    """The first whole UTC hour at or after `dt`."""
    dt = dt.astimezone(UTC)
    floor = dt.replace(minute=0, second=0, microsecond=0)
    return floor if floor == dt else floor + timedelta(hours=1)


def count_periods(since: datetime, until: datetime, unit: PeriodUnit | None) -> int:
    """An upper bound of len(periods(...)), cheap enough to check before building them."""
    if unit is None:
        return 1
    return int((until - since).total_seconds() // _MIN_LENGTH[unit]) + 2


def _local_floor(dt: datetime, unit: PeriodUnit, tz: ZoneInfo) -> datetime:
    local = dt.astimezone(tz).replace(tzinfo=None)
    if unit == "day":
        local = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif unit == "week":
        local = (local - timedelta(days=local.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
    else:
        local = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return local


def _next_local(local: datetime, unit: PeriodUnit) -> datetime:
    if unit == "day":
        return local + timedelta(days=1)
    if unit == "week":
        return local + timedelta(days=7)
    return local.replace(year=local.year + local.month // 12, month=local.month % 12 + 1)


def _walk(since: datetime, until: datetime, unit: PeriodUnit, tz: ZoneInfo) -> Iterator[Period]:
    if unit == "hour":  # hours are absolute: walk UTC, label in local time
        start = since.replace(minute=0, second=0, microsecond=0)
        while start < until:
            end = start + timedelta(hours=1)
            yield Period(start.astimezone(tz), max(start, since), min(end, until))
            start = end
        return
    local = _local_floor(since, unit, tz)
    while True:
        start = local.replace(tzinfo=tz)
        nxt = _next_local(local, unit)
        end = nxt.replace(tzinfo=tz).astimezone(UTC)
        if start.astimezone(UTC) >= until:
            return
        if end > since:
            yield Period(start, max(start.astimezone(UTC), since), min(end, until))
        local = nxt


def periods(
    since: datetime, until: datetime, unit: PeriodUnit | None, tz: ZoneInfo
) -> list[Period]:
    """The periods of [since, until) (UTC), in order; one unlabeled period without a unit."""
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    if since >= until:
        return []
    if unit is None:
        return [Period(None, since, until)]
    return list(_walk(since, until, unit, tz))


def _day_ceil(dt: datetime) -> datetime:
    floor = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    return floor if floor == dt else floor + timedelta(days=1)


def segments(ps: list[Period]) -> list[Segment]:
    """Cover each period with whole UTC days from day rollups and hours at its edges."""
    out: list[Segment] = []
    for i, p in enumerate(ps):
        first_day = _day_ceil(p.start)
        last_day = p.end.replace(hour=0, minute=0, second=0, microsecond=0)
        if first_day >= last_day:
            out.append(Segment(i, "hour", p.start, p.end))
            continue
        if p.start < first_day:
            out.append(Segment(i, "hour", p.start, first_day))
        out.append(Segment(i, "day", first_day, last_day))
        if last_day < p.end:
            out.append(Segment(i, "hour", last_day, p.end))
    return out
