"""The one UTC normaliser and the one backoff rule that the service's parts share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from exporter.backoff import backoff_delay
from exporter.timeutil import as_utc


def test_naive_is_utc_and_aware_is_converted() -> None:
    naive = datetime(2026, 3, 1, 12, 30)
    assert as_utc(naive) == datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    assert as_utc(naive).tzinfo is UTC
    plus2 = datetime(2026, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    assert as_utc(plus2) == as_utc(naive) and as_utc(plus2).tzinfo is UTC
    zero_offset = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(0), "GMT"))
    assert as_utc(zero_offset).tzinfo is UTC
    already = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    assert as_utc(already) is already
    assert as_utc(datetime.max).year == 9999  # naive max: no overflow


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    base, cap = 0.5, 20.0
    for attempt in range(1, 12):
        undithered = min(cap, base * 2 ** (attempt - 1))
        for _ in range(50):
            delay = backoff_delay(attempt, base=base, cap=cap)
            assert 0.8 * undithered <= delay <= 1.2 * undithered, (attempt, delay)
    assert backoff_delay(0, base=1.0, cap=5.0, jitter=0) == 1.0  # before any failure: the base
    assert backoff_delay(100, base=1.0, cap=5.0, jitter=0) == 5.0  # no overflow far out
