"""The budget refresh on Postgres reads on the driver's own connection (exporter.budgets.spend:
one compiled statement per read, no BEGIN/ROLLBACK round trips). A backend killed in the middle
of a read costs that refresh only: the budgets keep their last values (never zero), the failure
is logged, no broken connection is handed out again (asyncpg settles a cancelled read; the
pool's pre-ping finds a dead one), and the next refresh is exact against an independent sum
of the stored reports. Real Postgres, a real lock and a real pg_terminate_backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from budget_support import cost_of
from sqlalchemy import text

from exporter.budgets import BudgetTracker, SpendQuery
from exporter.budgets import tracker as tracker_module
from exporter.config import BudgetSpec
from exporter.store import Store
from exporter.usage import UsageReport

NOW = datetime(2026, 3, 5, 12, 30, tzinfo=UTC)
USERS = ("alice", "bob", "carol")


def reports(first: int, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(first, first + n):
        r = UsageReport.model_validate({
            "request_id": f"pgread-{i}", "model": "gpt-4o", "user": USERS[i % 3],
            "team": "red" if i % 2 else "blue", "input_tokens": 10,
            "cost_usd": f"0.{(i * 7919) % 10**9:09d}3",
            "completed_at": (NOW - timedelta(minutes=7 * i if i < 150 else i - 149)).isoformat(),
        })  # fmt: skip
        out.append(r.model_dump(mode="json"))
    return out


def want(stored: list[dict[str, Any]], **match: str) -> Decimal:
    """Spend today (UTC) of the matching stored reports: plain Decimal sums."""
    day = NOW.replace(hour=0, minute=0)
    total = Decimal(0)
    for r in stored:
        at = datetime.fromisoformat(r["completed_at"])
        if day <= at < day + timedelta(days=1) and all(r[k] == v for k, v in match.items()):
            total += cost_of(str(r["cost_usd"]))
    return total


def spent(tracker: BudgetTracker) -> dict[tuple[str, str], Decimal]:
    red, per_user = tracker.budgets
    out = {("team-red", ""): tracker.view(red, "").spent}
    out |= {("per-user", u): tracker.view(per_user, u).spent for u in USERS}
    return out


def expected(stored: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    out = {("team-red", ""): want(stored, team="red")}
    out |= {("per-user", u): want(stored, user=u) for u in USERS}
    return out


async def test_a_read_killed_mid_query_keeps_the_last_values_and_the_next_refresh_is_exact(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.from_url(pg_url)
    await store.upgrade()
    specs = [
        BudgetSpec(name="team-red", team="red", window="day", limit_usd=10),
        BudgetSpec(name="per-user", per="user", window="day", limit_usd=5),
    ]
    tracker = BudgetTracker(specs, SpendQuery(store.engine), clock=lambda: NOW)
    blocker = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        stored = reports(0, 150)
        await store.writer.write(stored)
        await tracker.refresh()
        first = spent(tracker)
        assert first == expected(stored)
        assert all(v > 0 for v in first.values())

        stored += reports(150, 60)  # stored, but the next refresh will not get to read it
        await store.writer.write(stored[150:])
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE usage_rollups IN ACCESS EXCLUSIVE MODE")
        refresh = asyncio.create_task(tracker.refresh())
        waiting: list[Any] = []
        for _ in range(200):  # the refresh's read, queued behind the lock
            waiting = await blocker.fetch(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND pid <> pg_backend_pid()"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert len(waiting) == 1, waiting
        with caplog.at_level(logging.WARNING, logger="exporter.budgets.tracker"):
            assert await blocker.fetchval("SELECT pg_terminate_backend($1)", waiting[0]["pid"])
            await lock.rollback()
            await asyncio.wait_for(refresh, 30)
        assert "spend query failed" in caplog.text
        assert spent(tracker) == first  # the last values, not zero and not half a refresh

        for _ in range(8):  # every connection the pool hands out works
            async with store.engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        await tracker.refresh()
        assert spent(tracker) == expected(stored) != first
    finally:
        await blocker.close()
        await store.close()


async def test_a_read_past_its_timeout_ends_the_refresh_and_frees_the_lock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read stuck behind a lock is cancelled at QUERY_TIMEOUT_S (here 0.5 s): the refresh
    returns with the last values and `db_lock` free (the flusher's commits wait on it), the
    cancelled connection is not reused, and the next refresh is exact."""
    monkeypatch.setattr(tracker_module, "QUERY_TIMEOUT_S", 0.5)
    store = Store.from_url(pg_url, pool_size=1)
    await store.upgrade()
    specs = [
        BudgetSpec(name="team-red", team="red", window="day", limit_usd=10),
        BudgetSpec(name="per-user", per="user", window="day", limit_usd=5),
    ]
    tracker = BudgetTracker(specs, SpendQuery(store.engine), clock=lambda: NOW)
    blocker = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        stored = reports(0, 120)
        await store.writer.write(stored)
        await tracker.refresh()
        first = spent(tracker)
        assert first == expected(stored)
        stored += reports(150, 40)
        await store.writer.write(stored[120:])
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE usage_rollups IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        await asyncio.wait_for(tracker.refresh(), 10)
        assert time.monotonic() - started < 5
        assert not tracker.db_lock.locked()
        assert spent(tracker) == first
        await lock.rollback()
        for _ in range(4):  # the one pooled connection works
            async with asyncio.timeout(5), store.engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        await tracker.refresh()
        assert spent(tracker) == expected(stored) != first
    finally:
        await blocker.close()
        await store.close()
