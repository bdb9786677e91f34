"""Calendar windows roll over exactly at the end of a day, a week and a month, in UTC and in
time zones with DST; rolling windows are whole hours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.budgets import window_bounds
from exporter.budgets.window import rolling_length

T = datetime


@pytest.mark.parametrize(
    ("window", "now", "start", "end"),
    [
        (
            "day",
            T(2026, 3, 31, 23, 59, 59, 999999, UTC),
            T(2026, 3, 31, tzinfo=UTC),
            T(2026, 4, 1, tzinfo=UTC),
        ),
        (
            "day",
            T(2026, 4, 1, 0, 0, 0, tzinfo=UTC),
            T(2026, 4, 1, tzinfo=UTC),
            T(2026, 4, 2, tzinfo=UTC),
        ),
        # 2026-11-29 is a Sunday, 2026-11-30 a Monday
        (
            "week",
            T(2026, 11, 29, 23, 59, 59, tzinfo=UTC),
            T(2026, 11, 23, tzinfo=UTC),
            T(2026, 11, 30, tzinfo=UTC),
        ),
        (
            "week",
            T(2026, 11, 30, 0, 0, 0, tzinfo=UTC),
            T(2026, 11, 30, tzinfo=UTC),
            T(2026, 12, 7, tzinfo=UTC),
        ),
        (
            "month",
            T(2026, 12, 31, 23, 59, 59, tzinfo=UTC),
            T(2026, 12, 1, tzinfo=UTC),
            T(2027, 1, 1, tzinfo=UTC),
        ),
        ("month", T(2027, 1, 1, tzinfo=UTC), T(2027, 1, 1, tzinfo=UTC), T(2027, 2, 1, tzinfo=UTC)),
        (
            "month",
            T(2028, 2, 29, 12, tzinfo=UTC),
            T(2028, 2, 1, tzinfo=UTC),
            T(2028, 3, 1, tzinfo=UTC),
        ),
        # a local time just after midnight in UTC+2 is still the previous UTC day
        (
            "day",
            T(2026, 5, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))),
            T(2026, 4, 30, tzinfo=UTC),
            T(2026, 5, 1, tzinfo=UTC),
        ),
    ],
)
def test_window_edges(window: str, now: datetime, start: datetime, end: datetime) -> None:
    assert window_bounds(window, now) == (start, end)  # type: ignore[arg-type]


@given(
    st.datetimes(min_value=T(2000, 1, 1), max_value=T(2100, 1, 1), timezones=st.just(UTC)),
    st.sampled_from(["day", "week", "month"]),
)
def test_windows_tile_time(now: datetime, window: str) -> None:
    """Every instant is in exactly one window, and the next window starts where this ends."""
    start, end = window_bounds(window, now)  # type: ignore[arg-type]
    assert start <= now < end
    assert start.tzinfo is UTC and start.hour == start.minute == start.second == 0
    assert window_bounds(window, end)[0] == end  # type: ignore[arg-type]
    assert window_bounds(window, end - timedelta(microseconds=1)) == (start, end)  # type: ignore[arg-type]
    if window == "week":
        assert start.weekday() == 0 and end - start == timedelta(days=7)
    if window == "month":
        assert start.day == 1 and end.day == 1


ZONES = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin", "Asia/Kathmandu",
         "Australia/Lord_Howe", "America/Santiago", "Pacific/Apia"]  # fmt: skip


@given(
    st.datetimes(min_value=T(2000, 1, 1), max_value=T(2100, 1, 1), timezones=st.just(UTC)),
    st.sampled_from(["day", "week", "month"]),
    st.sampled_from(ZONES),
)
def test_zoned_windows_tile_time_and_start_at_local_midnight(
    now: datetime, window: str, zone: str
) -> None:
    """In any zone (DST, :45 offsets, midnights skipped by DST in Santiago): every instant is in
    one window, windows abut, and each holds exactly the instants of one local day/week/month."""
    tz = ZoneInfo(zone)
    start, end = window_bounds(window, now, zone)
    assert start <= now < end
    assert window_bounds(window, end, zone)[0] == end
    assert window_bounds(window, end - timedelta(microseconds=1), zone) == (start, end)
    local_first, local_last = start.astimezone(tz), (end - timedelta(microseconds=1)).astimezone(tz)
    n = now.astimezone(tz).date()
    if window == "day":
        assert local_first.date() == local_last.date() == n
    elif window == "week":
        assert local_first.date().isocalendar()[:2] == local_last.date().isocalendar()[:2]
        assert local_first.date().weekday() == 0 and local_last.date().weekday() == 6
    else:
        assert (local_first.year, local_first.month) == (local_last.year, local_last.month)
        assert local_first.day == 1 and (local_last + timedelta(days=1)).day == 1
    before = (start - timedelta(microseconds=1)).astimezone(tz).date()
    assert before != local_first.date()  # the window starts exactly where the local date turns


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("America/New_York", T(2026, 3, 8, 12, tzinfo=UTC), 23),  # spring forward
        ("America/New_York", T(2026, 11, 1, 12, tzinfo=UTC), 25),  # fall back
        ("Europe/Berlin", T(2026, 3, 29, 12, tzinfo=UTC), 23),
        ("Australia/Lord_Howe", T(2026, 4, 5, 2, tzinfo=UTC), 24.5),  # a 30-minute change
        ("Asia/Tokyo", T(2026, 3, 8, 12, tzinfo=UTC), 24),
    ],
)
def test_dst_days_are_23_or_25_hours_long(zone: str, day: datetime, hours: float) -> None:
    start, end = window_bounds("day", day, zone)
    assert end - start == timedelta(hours=hours)


@pytest.mark.parametrize("window", ["1h", "24h", "7d", "30d"])
def test_rolling_windows_are_whole_hours_ending_after_the_current_one(window: str) -> None:
    now = T(2026, 3, 1, 0, 30, 5, tzinfo=UTC)
    start, end = window_bounds(window, now)
    length = rolling_length(window)
    assert end == T(2026, 3, 1, 1, tzinfo=UTC) and end - start == length
    assert window_bounds(window, T(2026, 3, 1, 0, 59, 59, tzinfo=UTC)) == (start, end)
    assert window_bounds(window, T(2026, 3, 1, 1, tzinfo=UTC))[0] == start + timedelta(hours=1)
