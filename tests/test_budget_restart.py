"""Budgets across a restart while Postgres is down: the spend already flushed (known only from
the state file) and the spend still in the WAL read back identical, and the check's verdict
does not flip."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from budget_support import Replica, make_report, total, write_config
from pgcluster import start_cluster

USERS = ("alice", "bob")


def _spent(replica: Replica) -> dict[str, dict[str, str]]:
    check = replica.get("/v1/budgets/check", user="alice", team="t")
    return {b["budget"]: b for b in check["budgets"]} | {"_": {"allowed": check["allowed"]}}


def test_restart_with_database_down_keeps_spend_identical(tmp_path: Path) -> None:
    rng = random.Random(3)
    flushed = [make_report(rng.choice(USERS), "t", rng) for _ in range(40)]
    unflushed = [make_report(rng.choice(USERS), "t", rng) for _ in range(25)]
    everything = flushed + unflushed
    alice = total(everything, lambda r: r.user == "alice")
    today = datetime.now(UTC).date()
    in_day = lambda r: r.at.date() == today  # noqa: E731
    # the day budget is exceeded by the whole, not by the flushed part alone
    limit = total(everything, in_day) - Decimal("0.5")
    assert total(flushed, in_day) < limit
    config = write_config(
        tmp_path / "budgets.toml",
        [
            {"name": "day", "window": "day", "limit_usd": str(limit)},
            {"name": "per-user", "per": "user", "window": "30d", "limit_usd": 1000},
        ],
    )
    cluster = start_cluster()
    try:
        url = cluster.url(cluster.create_database("budgets"))
        # a long refresh interval: the flushed spend is known only as "dropped, not yet seen"
        env = {"LLM_USAGE_FLUSH_INTERVAL": "0.2", "LLM_USAGE_FLUSH_MAX_BACKOFF": "0.5",
               "LLM_USAGE_BUDGET_REFRESH_INTERVAL": "3600"}  # fmt: skip
        replica = Replica(tmp_path / "r", url, config, env=env)
        replica.start()
        for i in range(0, len(flushed), 10):
            assert replica.post(flushed[i : i + 10]) == 202
        deadline = time.monotonic() + 30
        while replica.metrics()[("llm_usage_pending_reports", ())] > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.stop()
        assert replica.post(unflushed) == 202
        before = _spent(replica)
        assert Decimal(before["day"]["spent_usd"]) == total(everything, in_day)
        assert Decimal(before["per-user:alice"]["spent_usd"]) == alice
        assert before["_"]["allowed"] is False
        assert replica.stop() == 0  # the final flush fails: the WAL keeps the rest

        replica.start(wait_ready=False)  # not ready: the database is down
        after = _spent(replica)
        assert after == before
        logs = replica.proc.logs()
        assert "read back from the WAL" in logs and "restored from" in logs, logs

        cluster.start()  # the database returns: flushed, refreshed, still the same spend
        deadline = time.monotonic() + 60
        while replica.metrics()[("llm_usage_pending_reports", ())] > 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        final = _spent(replica)
        for name in ("day", "per-user:alice"):
            assert final[name]["spent_usd"] == before[name]["spent_usd"], name
        assert replica.stop() == 0
    finally:
        cluster.destroy()
