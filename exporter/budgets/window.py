"""Budget windows: calendar day/week/month in a time zone (UTC by default), or rolling hours.

A calendar window is [local midnight that starts it, local midnight that ends it), converted to
UTC, so a Tokyo team resets at Tokyo midnight and a DST day is 23 or 25 hours long. A rolling
window `"30d"` / `"24h"` is made of whole UTC hours, because stored spend is kept in hour
rollups: it holds the current hour and the N-1 hours before it, and slides at each full hour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

from exporter.config import CALENDAR_WINDOWS, ROLLING_WINDOW

__all__ = ["HOUR", "WindowKind", "floor_hour", "parse_window", "window_bounds"]

HOUR = timedelta(hours=1)
_ROLLING = re.compile(ROLLING_WINDOW)


@dataclass(frozen=True, slots=True)
class WindowKind:
    """`calendar` is day/week/month; otherwise `rolling` is the window length in hours."""

    calendar: str | None
    rolling: timedelta | None
    tz: tzinfo

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """The UTC window [start, end) holding `now`; `end` is when it resets (or slides)."""
        if self.rolling is not None:
            end = floor_hour(now) + HOUR
            return end - self.rolling, end
        assert self.calendar is not None
        return _calendar_bounds(self.calendar, self.tz, now)

    def key(self, at: datetime) -> datetime:
        """The ledger key of spend at `at`: its window start, or its hour for rolling windows."""
        if self.rolling is not None:
            return floor_hour(at)
        return self.bounds(at)[0]


def floor_hour(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def rolling_length(window: str) -> timedelta | None:
    """`"30d"` → 30 days, `"24h"` → 24 hours; None for a calendar window or garbage."""
    m = _ROLLING.match(window)
    if m is None:
        return None
    n = int(m.group(1))
    return timedelta(days=n) if m.group(2) == "d" else timedelta(hours=n)


@lru_cache(maxsize=1024)
def parse_window(window: str, timezone: str | None = None) -> WindowKind:
    tz: tzinfo = UTC if timezone in (None, "UTC") else ZoneInfo(str(timezone))
    if window in CALENDAR_WINDOWS:
        return WindowKind(window, None, tz)
    length = rolling_length(window)
    if length is None:
        raise ValueError(f"window must be day, week, month or a length like 30d / 24h: {window!r}")
    return WindowKind(None, length, UTC)


def _local_midnight(d: date, tz: tzinfo) -> datetime:
    """The UTC instant at which local date `d` begins. A midnight skipped by DST resolves to
    the transition itself (zoneinfo's fold=0 reads it with the offset before the change)."""
    return datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC)


def _calendar_bounds(window: str, tz: tzinfo, now: datetime) -> tuple[datetime, datetime]:
    today = now.astimezone(tz).date()
    if window == "day":
        first, after = today, today + timedelta(days=1)
    elif window == "week":  # weeks start on Monday
        first = today - timedelta(days=today.weekday())
        after = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        after = (
            first.replace(year=first.year + 1, month=1)
            if first.month == 12
            else first.replace(month=first.month + 1)
        )
    return _local_midnight(first, tz), _local_midnight(after, tz)


def window_bounds(
    window: str, now: datetime, timezone: str | None = None
) -> tuple[datetime, datetime]:
    """The window of kind `window` (in `timezone`, UTC by default) that holds `now`."""
    return parse_window(window, timezone).bounds(now)
