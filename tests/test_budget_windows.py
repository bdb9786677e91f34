"""UTC calendar windows roll over exactly at the end of a day, a week and a month."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.budgets import window_bounds

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
