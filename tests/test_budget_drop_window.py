"""Budgets through a kill at every step of a flush's drop, restarted with the database down.

The flusher commits a group of WAL segments, tells the budgets (`on_committed`), waits for the
state file to hold their spend (`before_drop`), then unlinks them. A copy of the data dir taken
at each of those instants is what a SIGKILL there leaves on disk; a fresh app started on that
copy, with Postgres stopped, must read exactly the spend of the reports accepted until then:
never lower (a segment gone from the WAL before the state file holds it) and never higher (a
segment in both, counted twice)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from helpers import report, wait_ready
from pgcluster import start_cluster

from exporter.appkeys import FLUSHER

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
BUDGETS = [
    {"name": "day", "window": "day", "limit_usd": "1000"},
    {"name": "per-user", "per": "user", "window": "30d", "limit_usd": "1000"},
]


async def _spent(client: TestClient[Any, Any]) -> dict[str, Decimal]:
    resp = await client.get("/v1/budgets/check", params={"user": "alice"})
    assert resp.status == 200, await resp.text()
    return {b["budget"]: Decimal(b["spent_usd"]) for b in (await resp.json())["budgets"]}


async def test_a_kill_at_any_step_of_a_drop_keeps_spend_exact(
    make_client: MakeClient, tmp_path: Path
) -> None:
    rng = random.Random(7)
    cluster = start_cluster()
    try:
        url = cluster.url(cluster.create_database("drops"))
        common: dict[str, Any] = {
            "database_url": url,
            "budgets": BUDGETS,
            "flush_interval": 3600,
            "budget_refresh_interval": 3600,
        }
        live = await make_client(data_dir=tmp_path / "live", **common)
        await wait_ready(live)  # migrated
        flusher = live.app[FLUSHER]
        accepted: list[Decimal] = []  # costs of the reports answered 202 so far
        instants: list[tuple[str, Path, Decimal]] = []

        def kill_here(name: str) -> None:
            copy = tmp_path / f"kill-{len(instants):02d}-{name}"
            shutil.copytree(tmp_path / "live", copy)
            instants.append((name, copy, sum(accepted, Decimal(0))))

        committed, before_drop, drop = flusher.on_committed, flusher.before_drop, flusher.wal.drop
        assert committed is not None and before_drop is not None

        def on_committed(seq: int) -> None:
            kill_here(f"committed-{seq}")
            committed(seq)
            kill_here(f"told-{seq}")

        async def recorded() -> None:
            await before_drop()
            kill_here("recorded")

        def dropped(segment: Any) -> None:
            drop(segment)
            kill_here(f"unlinked-{segment.seq}")

        flusher.on_committed, flusher.before_drop = on_committed, recorded
        flusher.wal.drop = dropped  # type: ignore[method-assign]

        now = datetime.now(UTC).isoformat()
        for flush in range(3):
            for _ in range(2):  # two segments per flush: the group is committed together
                costs = [f"{rng.randint(1, 10**6)}e-6" for _ in range(5)]
                n = len(accepted)
                batch = [report(request_id=f"r{n + i}", completed_at=now, cost_usd=c)
                         for i, c in enumerate(costs)]  # fmt: skip
                resp = await live.post("/v1/usage", json=batch)
                assert resp.status == 202, await resp.text()
                accepted.extend(Decimal(r["cost_usd"]) for r in batch)
                await flusher.wal.seal()
            if flush < 2:  # the last batches stay in the WAL
                assert await flusher.flush_once() == 10
        kill_here("end")
        live_spent = await _spent(live)
        assert live_spent == {"day": sum(accepted), "per-user:alice": sum(accepted)}
        names = [name for name, _, _ in instants]
        assert names.count("recorded") == 2 and sum(n.startswith("unlinked") for n in names) == 4

        cluster.stop()  # every restart below reads spend from its data dir alone
        for name, copy, expected in instants:
            restarted = await make_client(data_dir=copy, **common)
            got = await _spent(restarted)
            assert got == {"day": expected, "per-user:alice": expected}, (name, got, expected)
            await restarted.close()
    finally:
        cluster.destroy()
