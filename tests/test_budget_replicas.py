"""Two replicas (two service processes, own data dirs) on one Postgres: each replica's check is
database spend + its own unflushed spend, so it never reads above the truth and never below it
by more than the other replica's last flush_interval + budget_refresh_interval of traffic (the
bound in docs/operations.md; a slack covers a flush's own duration on a loaded box)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from budget_support import Load, Poller, Replica, total, write_config
from test_budget_live import BUDGETS, CHECK, USERS, assert_bracketed, oracle

FLUSH, REFRESH, SLACK = 0.4, 0.3, 1.5


def test_each_replica_within_the_documented_bound_of_the_other(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path / "budgets.toml", BUDGETS)
    env = {"LLM_USAGE_FLUSH_INTERVAL": str(FLUSH),
           "LLM_USAGE_BUDGET_REFRESH_INTERVAL": str(REFRESH)}  # fmt: skip
    replicas = [Replica(tmp_path / f"r{i}", pg_url, config, env=env) for i in range(2)]
    for r in replicas:
        r.start()
    load = Load(replicas, USERS, batch=8)
    pollers = [Poller(r, CHECK) for r in replicas]
    try:
        for p in pollers:
            p.start()
        load.start()
        time.sleep(4)
        load.stop_event.set()
        load.join(30)
        time.sleep(0.3)
        for p in pollers:
            p.stop_event.set()
            p.join(30)
        for i, poller in enumerate(pollers):
            own, other = load.snapshot(i), load.snapshot(1 - i)
            assert len(own) > 20 and len(other) > 20
            checked = assert_bracketed(poller.polls, other, lag=FLUSH + REFRESH + SLACK, own=own)
            assert checked >= 20, checked
        # settled: both replicas read exactly the whole truth
        reports = [r for i in (0, 1) for b in load.snapshot(i) for r in b.reports]
        deadline = time.monotonic() + 30
        for replica in replicas:
            while True:
                check = replica.get("/v1/budgets/check", **CHECK)
                now = datetime.now(UTC)
                if all(
                    Decimal(b["spent_usd"]) == total(reports, oracle(b["name"], now))
                    for b in check["budgets"]
                ):
                    break
                assert time.monotonic() < deadline, check
                time.sleep(0.1)
    finally:
        load.stop_event.set()
        for p in pollers:
            p.stop_event.set()
        for r in replicas:
            r.stop()
