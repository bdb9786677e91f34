"""The budget refresh on Postgres reads on the driver's own connection (exporter.budgets.spend:
one compiled statement per read, no BEGIN/ROLLBACK round trips). A backend killed in the middle
of a read costs that refresh only: the budgets keep their last values (never zero), the failure
is logged, no broken connection is handed out again (asyncpg settles a cancelled read; the
pool's pre-ping finds a dead one), and the next refresh is exact against an independent sum
of the stored reports. Real Postgres, a real lock and a real pg_terminate_backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
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


@dataclass
class Setup:
    store: Store
    tracker: BudgetTracker
    blocker: Any  # an asyncpg connection of its own: the lock, the kill
    stored: list[dict[str, Any]]  # what the database holds
    first: dict[tuple[str, str], Decimal]  # the spend its first refresh read

    async def store_more(self, first: int, n: int) -> None:
        """Stored, but the next refresh will not get to read it."""
        more = reports(first, n)
        await self.store.writer.write(more)
        self.stored += more

    async def lock_rollups(self) -> Any:
        lock = self.blocker.transaction()
        await lock.start()
        await self.blocker.execute("LOCK TABLE usage_rollups IN ACCESS EXCLUSIVE MODE")
        return lock

    async def pool_works(self, times: int) -> None:
        for _ in range(times):  # every connection the pool hands out answers
            async with asyncio.timeout(5), self.store.engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1


@contextlib.asynccontextmanager
async def refreshed(pg_url: str, pool_size: int = 5) -> AsyncIterator[Setup]:
    """A store with 120 reports, a tracker that has read them once (exactly), a blocker."""
    store = Store.from_url(pg_url, pool_size=pool_size)
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
        assert all(v > 0 for v in first.values())
        yield Setup(store, tracker, blocker, stored, first)
    finally:
        await blocker.close()
        await store.close()


async def test_a_read_killed_mid_query_keeps_the_last_values_and_the_next_refresh_is_exact(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with refreshed(pg_url) as s:
        await s.store_more(150, 60)
        lock = await s.lock_rollups()
        refresh = asyncio.create_task(s.tracker.refresh())
        waiting: list[Any] = []
        for _ in range(200):  # the refresh's read, queued behind the lock
            waiting = await s.blocker.fetch(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND pid <> pg_backend_pid()"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert len(waiting) == 1, waiting
        with caplog.at_level(logging.WARNING, logger="exporter.budgets.tracker"):
            assert await s.blocker.fetchval("SELECT pg_terminate_backend($1)", waiting[0]["pid"])
            await lock.rollback()
            await asyncio.wait_for(refresh, 30)
        assert "spend query failed" in caplog.text
        assert s.tracker.queries["failed"] >= 1  # llm_usage_budget_spend_queries_total
        assert spent(s.tracker) == s.first  # the last values, not zero and not half a refresh
        await s.pool_works(8)
        await s.tracker.refresh()
        assert spent(s.tracker) == expected(s.stored) != s.first


async def test_a_read_past_its_timeout_ends_the_refresh_and_frees_the_lock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read stuck behind a lock is cancelled at QUERY_TIMEOUT_S (here 0.5 s): the refresh
    returns with the last values and `db_lock` free (the flusher's commits wait on it), the
    cancelled connection is not reused, and the next refresh is exact."""
    monkeypatch.setattr(tracker_module, "QUERY_TIMEOUT_S", 0.5)
    async with refreshed(pg_url, pool_size=1) as s:
        await s.store_more(150, 40)
        lock = await s.lock_rollups()
        started = time.monotonic()
        await asyncio.wait_for(s.tracker.refresh(), 10)
        assert time.monotonic() - started < 5
        assert not s.tracker.db_lock.locked()
        assert spent(s.tracker) == s.first
        await lock.rollback()
        await s.pool_works(4)  # the one pooled connection
        await s.tracker.refresh()
        assert spent(s.tracker) == expected(s.stored) != s.first
