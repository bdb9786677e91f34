"""Budgets of a real service process over loopback, polled every 50 ms under load across many
flushes and refreshes: spend (check endpoint and gauges) is never below the independent sum of
the acknowledged reports in each window, and never above what had been sent (SQLite and
Postgres)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from budget_support import (
    Load,
    Poll,
    Poller,
    Replica,
    Sent,
    bracket,
    in_calendar,
    in_rolling,
    total,
    write_config,
)

LIMIT = 1_000_000
BUDGETS = [
    {"name": "global-day", "window": "day", "limit_usd": LIMIT},
    {"name": "team-a-month", "team": "a", "window": "month", "limit_usd": LIMIT},
    {"name": "per-user-24h", "per": "user", "window": "24h", "limit_usd": LIMIT},
    {"name": "tokyo-week", "window": "week", "timezone": "Asia/Tokyo", "limit_usd": LIMIT},
    {"name": "kathmandu-day", "window": "day", "timezone": "Asia/Kathmandu", "limit_usd": LIMIT},
]
USERS = [("u1", "a"), ("u2", "a"), ("u3", "b")]
CHECK = {"user": "u1", "team": "a"}


def oracle(name: str, now: datetime) -> Callable[[Sent], bool]:
    """Which reports budget `name` counts at `now` (for the check of u1 in team a)."""
    preds: dict[str, Callable[[Sent], bool]] = {
        "global-day": lambda r: in_calendar("day", "UTC", r.at, now),
        "team-a-month": lambda r: r.team == "a" and in_calendar("month", "UTC", r.at, now),
        "per-user-24h": lambda r: r.user == "u1" and in_rolling(24, r.at, now),
        "tokyo-week": lambda r: in_calendar("week", "Asia/Tokyo", r.at, now),
        "kathmandu-day": lambda r: in_calendar("day", "Asia/Kathmandu", r.at, now),
    }
    return preds[name]


GAUGE_LABEL = {b["name"]: b["name"] for b in BUDGETS} | {"per-user-24h": "per-user-24h:u1"}


def same_windows(poll: Poll) -> bool:
    """No window boundary between sending and answering this poll (else it is ambiguous)."""
    probe = Sent("u1", "a", poll.wall_sent, Decimal(0), "0")
    return all(oracle(b["name"], poll.wall_received)(probe) for b in BUDGETS)


def assert_bracketed(polls: list[Poll], batches: list[Any], lag: float = 0.0,
                     own: list[Any] | None = None) -> int:  # fmt: skip
    """Every poll's spend within [acknowledged, sent]; returns how many polls were checked.
    With `own`, the other replica's batches count as acknowledged only `lag` s later."""
    checked = 0
    for poll in polls:
        if not same_windows(poll):
            continue
        by_name = {b["name"]: b for b in poll.check["budgets"]}
        assert set(by_name) == {b["name"] for b in BUDGETS}
        for name, state in by_name.items():
            pred = oracle(name, poll.wall_sent)
            if own is None:
                low, high = bracket(batches, poll, pred)
            else:
                low_own, high_own = bracket(own, poll, pred)
                low_other, high_other = bracket(batches, poll, pred, lag=lag)
                low, high = low_own + low_other, high_own + high_other
            spent = Decimal(state["spent_usd"])
            assert low <= spent <= high, (name, poll.sent, low, spent, high, state)
            key = ("llm_budget_spent_usd", (("budget", GAUGE_LABEL[name]),))
            assert key in poll.gauges or low == 0, (name, low)  # templates: once a value is seen
            gauge = poll.gauges.get(key, 0.0)
            assert float(low) <= gauge <= float(high), (name, low, gauge, high)
        checked += 1
    return checked


def flushes_and_refreshes(polls: list[Poll]) -> tuple[int, int]:
    flushes = {p.gauges.get(("llm_usage_last_flush_success_timestamp_seconds", ())) for p in polls}
    refreshes = {b["refreshed_at"] for p in polls for b in p.check["budgets"]}
    return len(flushes), len(refreshes)


def wait_settled(replica: Replica, truth: Callable[[str, datetime], Decimal]) -> None:
    """After the load: everything flushed and refreshed, spend equal to the truth."""
    deadline = time.monotonic() + 30
    while True:
        check = replica.get("/v1/budgets/check", **CHECK)
        pending = replica.metrics()[("llm_usage_pending_reports", ())]
        now = datetime.fromisoformat(check["budgets"][0]["refreshed_at"] or "2000-01-01T00:00Z")
        if pending == 0 and all(Decimal(b["unflushed_usd"]) == 0 for b in check["budgets"]):
            for b in check["budgets"]:
                assert Decimal(b["spent_usd"]) == truth(b["name"], now), b
            return
        assert time.monotonic() < deadline, check
        time.sleep(0.1)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def test_spend_never_reads_below_acknowledged_reports_across_flushes_and_refreshes(
    tmp_path: Path, database_url: str
) -> None:
    replica = Replica(
        tmp_path / "r1",
        database_url,
        write_config(tmp_path / "budgets.toml", BUDGETS),
        env={"LLM_USAGE_FLUSH_INTERVAL": "0.4", "LLM_USAGE_BUDGET_REFRESH_INTERVAL": "0.25"},
    )
    replica.start()
    load, poller = Load([replica], USERS), Poller(replica, CHECK)
    try:
        poller.start()
        load.start()
        time.sleep(5)
        load.stop_event.set()
        load.join(30)
        time.sleep(0.5)
        poller.stop_event.set()
        poller.join(30)
        batches = load.snapshot(0)
        assert len(batches) > 50 and all(b.acked for b in batches)
        checked = assert_bracketed(poller.polls, batches)
        assert checked >= 30, checked
        flushes, refreshes = flushes_and_refreshes(poller.polls)
        assert flushes >= 5 and refreshes >= 5, (flushes, refreshes)
        states = [b for p in poller.polls for b in p.check["budgets"]]
        assert any(Decimal(b["stored_usd"]) > 0 for b in states)
        assert any(Decimal(b["unflushed_usd"]) > 0 for b in states)
        reports = [r for b in batches for r in b.reports]
        wait_settled(replica, lambda name, now: total(reports, oracle(name, now)))
    finally:
        load.stop_event.set()
        poller.stop_event.set()
        replica.stop()
