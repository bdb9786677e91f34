"""A refresh reads stored spend again only for what may have changed: the tracker probes the
database's version first (exporter.budgets.spend.SpendSession.version: Postgres' snapshot,
SQLite's data_version + total_changes) and a kind of budget read at the same version is not
read again. These tests hold the probe to what it promises, on both backends: an idle
database costs no spend query; a commit by another connection, by the refresh's own pooled
connection, or by a transaction that was already open at the probe is read at the next
refresh, exactly (against plain Decimal sums of the reports).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from budget_support import cost_of
from sqlalchemy.engine import make_url

from exporter.budgets import BudgetTracker, SpendQuery
from exporter.budgets import spend as spend_module
from exporter.config import BudgetSpec
from exporter.store import Store
from exporter.usage import UsageReport

NOW = datetime(2026, 3, 5, 12, 30, tzinfo=UTC)
USERS = ("alice", "bob", "carol")
SPECS = [
    BudgetSpec(name="team-red", team="red", window="day", limit_usd=10),
    BudgetSpec(name="per-user", per="user", window="day", limit_usd=5),
    BudgetSpec(name="all-30d", window="30d", limit_usd=1000),
]


def reports(first: int, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(first, first + n):
        r = UsageReport.model_validate({
            "request_id": f"ver-{i}", "model": "gpt-4o", "user": USERS[i % 3],
            "team": "red" if i % 2 else "blue", "input_tokens": 10,
            "cost_usd": f"0.{(i * 7919) % 10**9:09d}7",
            "completed_at": (NOW - timedelta(minutes=11 * i)).isoformat(),
        })  # fmt: skip
        out.append(r.model_dump(mode="json"))
    return out


def expected(stored: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """Spend per budget (and template value) from the raw reports: UTC day, last 30 days."""
    day = NOW.replace(hour=0, minute=0)
    out: dict[tuple[str, str], Decimal] = {
        ("team-red", ""): Decimal(0),
        ("all-30d", ""): Decimal(0),
    }
    for u in USERS:
        out[("per-user", u)] = Decimal(0)
    for r in stored:
        at, cost = datetime.fromisoformat(r["completed_at"]), cost_of(str(r["cost_usd"]))
        if day <= at < day + timedelta(days=1):
            out[("per-user", r["user"])] += cost
            if r["team"] == "red":
                out[("team-red", "")] += cost
        if NOW - timedelta(days=30) <= at <= NOW:
            out[("all-30d", "")] += cost
    return out


def spent(tracker: BudgetTracker) -> dict[tuple[str, str], Decimal]:
    out = {}
    for b in tracker.budgets:
        for v in USERS if b.spec.per else ("",):
            out[(b.name, v)] = tracker.view(b, v).spent
    return out


@dataclass
class Setup:
    backend: str
    url: str
    store: Store
    tracker: BudgetTracker
    stored: list[dict[str, Any]]
    reads: list[int]  # spend queries run so far (one entry per query)

    async def refreshed(self) -> int:
        """Refresh; the spend queries it ran."""
        before = len(self.reads)
        await self.tracker.refresh()
        return len(self.reads) - before


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("pg_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"


@contextlib.asynccontextmanager
async def setup(url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    """One pooled connection, shared by the writer and the refresh: on SQLite the refresh's
    own connection then commits the flushes (data_version alone would not see them)."""
    store = Store.from_url(url, pool_size=1)
    await store.upgrade()
    reads: list[int] = []
    real = spend_module._spend_on

    async def counted(*args: Any) -> dict[tuple[str, ...], Decimal]:
        reads.append(1)
        return await real(*args)

    monkeypatch.setattr(spend_module, "_spend_on", counted)
    tracker = BudgetTracker(SPECS, SpendQuery(store.engine), clock=lambda: NOW)
    try:
        stored = reports(0, 90)
        await store.writer.write(stored)
        s = Setup(store.backend, url, store, tracker, stored, reads)
        assert await s.refreshed() == 4  # three kinds, the rolling one with its head hour
        assert tracker.queries == {"read": 3, "skipped": 0, "failed": 0}
        assert spent(tracker) == expected(stored)
        assert all(v > 0 for v in spent(tracker).values())
        yield s
    finally:
        await store.close()


async def test_an_idle_database_costs_no_spend_query_and_the_values_stay_exact(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with setup(database_url, monkeypatch) as s:
        first = s.tracker.budgets[0].epoch
        for _ in range(3):
            assert await s.refreshed() == 0
        assert s.tracker.queries == {"read": 3, "skipped": 9, "failed": 0}
        assert spent(s.tracker) == expected(s.stored)
        assert all(b.epoch > first for b in s.tracker.budgets)  # landed, as of the probe
        more = reports(90, 30)  # the refresh's own pooled connection commits them
        await s.store.writer.write(more)
        s.stored += more
        assert await s.refreshed() == 4
        assert spent(s.tracker) == expected(s.stored)
        assert await s.refreshed() == 0


async def test_a_commit_by_another_replica_is_read_at_the_next_refresh(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with setup(database_url, monkeypatch) as s:
        other = Store.from_url(database_url, pool_size=1)  # a second replica's writer
        try:
            for first in (120, 150):
                more = reports(first, 25)
                await other.writer.write(more)
                s.stored += more
                assert await s.refreshed() == 4
                assert spent(s.tracker) == expected(s.stored)
                assert await s.refreshed() == 0
        finally:
            await other.close()


#: red's day rollups of the last day once more, as users '<user>+zed' (no per-user view reads
#: them): of the three budgets only team-red reads that day's rollups (all-30d: its hours)
COPY_RED = """
INSERT INTO usage_rollups (granularity, bucket_start, model, provider, operation, "user",
    team, api_key_id, node, dims, requests, cost_usd)
SELECT granularity, bucket_start, model, provider, operation, "user" || '+zed', team,
    api_key_id, node,
    dims, requests, cost_usd
FROM usage_rollups WHERE granularity = 'day' AND team = 'red'
    AND bucket_start = (SELECT max(bucket_start) FROM usage_rollups WHERE granularity = 'day')
"""


async def open_write(url: str) -> tuple[Callable[[], Awaitable[None]], Callable[[], None]]:
    """COPY_RED in a transaction of its own connection, left open: (commit, close)."""
    if url.startswith("postgresql"):
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        tx = conn.transaction()
        await tx.start()
        await conn.execute(COPY_RED)

        async def pg_commit() -> None:
            await tx.commit()
            await conn.close()

        return pg_commit, lambda: None
    path = make_url(url).database
    assert path is not None
    lite = sqlite3.connect(path, isolation_level=None)
    lite.execute("BEGIN IMMEDIATE")
    lite.execute(COPY_RED)

    async def lite_commit() -> None:
        lite.execute("COMMIT")

    return lite_commit, lite.close


async def test_a_transaction_open_at_the_probe_and_committed_after_it_is_read(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres: the open transaction's xid stays in the probe's snapshot while a later one
    commits (so the snapshot's xmax has moved past it), and leaves it at its own commit, which
    moves nothing else. SQLite: the other connection's commit moves data_version."""
    async with setup(database_url, monkeypatch) as s:
        commit, close = await open_write(s.url)
        try:
            pg = s.backend == "postgresql"
            if pg:  # SQLite: the open write holds the one write lock
                more = reports(200, 20)
                await s.store.writer.write(more)
                s.stored += more
            assert await s.refreshed() == (4 if pg else 0)  # SQLite: nothing committed yet
            assert spent(s.tracker) == expected(s.stored)  # the open write is not visible
            assert await s.refreshed() == 0
            await commit()
            assert await s.refreshed() == 4
            want = expected(s.stored)
            want[("team-red", "")] *= 2
            assert spent(s.tracker) == want
        finally:
            close()


async def test_without_the_snapshot_function_every_refresh_reads_everything(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres < 13 has no pg_current_snapshot(): the probe says "unknown" (SQLSTATE 42883)
    and each refresh reads every kind, as before the probe existed; nothing counts as failed."""
    monkeypatch.setattr(spend_module, "_PG_VERSION", "SELECT pg_no_such_snapshot()::text")
    async with setup(pg_url, monkeypatch) as s:
        for _ in range(2):
            assert await s.refreshed() == 4
        assert spent(s.tracker) == expected(s.stored)
        assert s.tracker.queries == {"read": 9, "skipped": 0, "failed": 0}
