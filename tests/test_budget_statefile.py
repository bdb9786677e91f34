"""The budgets state file (`<data_dir>/budgets.json`): rewritten only when the spend it holds
changed, encoded and written off the event loop, and written whole (refresh times included)
at shutdown, so a restart with the database down reads back exactly what was served."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

from budget_support import Replica, make_report, total, write_config
from pgcluster import start_cluster

from exporter.budgets import BudgetTracker, SpendQuery
from exporter.config import BudgetSpec
from exporter.store import Store
from exporter.usage import UsageReport


def _spent(replica: Replica) -> dict[str, Any]:
    check = replica.get("/v1/budgets/check", user="alice", team="t")
    return {b["budget"]: b for b in check["budgets"]} | {"_": {"allowed": check["allowed"]}}


def _wait(what: str, cond: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_state_file_rewritten_only_on_change_and_whole_at_shutdown(tmp_path: Path) -> None:
    rng = random.Random(5)
    first = [make_report("alice", "t", rng) for _ in range(12)]
    second = [make_report("alice", "t", rng) for _ in range(7)]
    config = write_config(
        tmp_path / "budgets.toml",
        [
            {"name": "day", "window": "day", "limit_usd": 1000},
            {"name": "per-user", "per": "user", "window": "30d", "limit_usd": 1000},
        ],
    )
    today = datetime.now(UTC).date()
    in_day = lambda r: r.at.date() == today  # noqa: E731
    cluster = start_cluster()
    replica: Replica | None = None
    try:
        url = cluster.url(cluster.create_database("budgets"))
        env = {"LLM_USAGE_FLUSH_INTERVAL": "0.2", "LLM_USAGE_FLUSH_MAX_BACKOFF": "0.5",
               "LLM_USAGE_BUDGET_REFRESH_INTERVAL": "0.2"}  # fmt: skip
        replica = Replica(tmp_path / "r", url, config, env=env)
        replica.start()
        state = replica.workdir / "data" / "budgets.json"

        def landed(reports: list[Any]) -> bool:  # stored (refreshed), nothing unflushed
            day = _spent(replica)["day"]
            return (Decimal(day["stored_usd"]) == total(reports, in_day)
                    and Decimal(day["unflushed_usd"]) == 0)  # fmt: skip

        assert replica.post(first) == 202
        _wait("first batch stored", lambda: landed(first) and state.exists())
        time.sleep(0.5)  # the write of the refresh that saw it has landed
        stat, text = state.stat(), state.read_bytes()
        # several refreshes that read the same spend: the file is not replaced (same inode and
        # modification time; a replace is a new file) and its content is the same
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 5:
            assert time.monotonic() < deadline, seen
            seen.add(_spent(replica)["day"]["refreshed_at"])
            time.sleep(0.05)
        now = state.stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
        assert state.read_bytes() == text
        saved = json.loads(text)
        assert Decimal(saved["budgets"]["day"]["stored"][""]) == total(first, in_day)

        # new spend: rewritten, with the new stored spend
        assert replica.post(second) == 202
        _wait("second batch stored", lambda: landed(first + second))

        def rewritten() -> bool:
            day = json.loads(state.read_bytes())["budgets"]["day"]
            return Decimal(day["stored"][""]) == total(first + second, in_day)

        _wait("rewritten", rewritten)
        # a later refresh of the same spend changes only the refresh time: not rewritten, so
        # the file's refresh time lags what a check shows…
        written = json.loads(state.read_bytes())["refreshed_at"]["day"]
        _wait("a refresh after the rewrite", lambda: _spent(replica)["day"]["refreshed_at"]
              != written)  # fmt: skip
        cluster.stop()
        time.sleep(0.5)  # a refresh in flight has failed: the served state is frozen
        before = _spent(replica)
        assert (
            json.loads(state.read_bytes())["refreshed_at"]["day"] != before["day"]["refreshed_at"]
        )
        assert Decimal(before["day"]["spent_usd"]) == total(first + second, in_day)
        assert replica.stop() == 0
        # …until shutdown, which writes the whole state; a restart with the database down
        # serves exactly what was served before
        saved = json.loads(state.read_bytes())
        assert saved["refreshed_at"]["day"] == before["day"]["refreshed_at"]
        replica.start(wait_ready=False)
        assert _spent(replica) == before
        assert replica.stop() == 0
    finally:
        if replica is not None and replica.proc is not None and replica.proc.proc.poll() is None:
            replica.stop()  # a failed assertion must not leave the service running
        cluster.destroy()


def _report(i: int, user: str, cost: str) -> UsageReport:
    return UsageReport.model_validate({
        "request_id": f"sf-{i}", "model": "m", "user": user, "team": "t", "input_tokens": 1,
        "cost_usd": float(cost), "completed_at": datetime.now(UTC).isoformat(),
    })  # fmt: skip


async def test_state_file_encoded_and_written_off_the_loop(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'u.db'}")
    await store.upgrade()
    specs = [BudgetSpec(name=f"user-{i}", user=f"u{i}", window="day", limit_usd=Decimal(50))
             for i in range(300)]  # fmt: skip
    specs.append(BudgetSpec(name="per-user", per="user", window="month", limit_usd=Decimal(9)))
    path = tmp_path / "data" / "budgets.json"
    tracker = BudgetTracker(specs, SpendQuery(store.engine), state_path=path)
    costs = {f"u{i}": Decimal(f"0.{i + 1:04d}") for i in range(300)}
    reports = [_report(i, u, str(c)) for i, (u, c) in enumerate(costs.items())]
    loop_thread = threading.get_ident()
    on_loop: set[str] = set()
    elsewhere: set[str] = set()

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        name = frame.f_code.co_filename
        if event == "call" and ("/budgets/snapshot.py" in name or "/budgets/statefile.py" in name):
            (on_loop if threading.get_ident() == loop_thread else elsewhere).add(
                frame.f_code.co_name
            )

    try:
        tracker.on_durable(1, reports[:150])
        tracker.on_durable(2, reports[150:])
        threading.setprofile(profile)  # threads started from now on (the writer's)
        sys.setprofile(profile)  # this thread: the event loop's
        try:
            async with tracker.db_lock:  # as the flusher: commit, then drop
                await store.writer.write([r.model_dump(mode="json") for r in reports[:150]])
                tracker.on_committed(1)
            await tracker.refresh()
            await tracker.close()
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
        # on the loop: only the capture of references and the hand-over; the encoding and
        # the file write on the writer's thread
        assert "capture" in on_loop and "request" in on_loop, on_loop
        assert not on_loop & {"encode", "_budget", "write", "_write"}, on_loop
        assert {"encode", "_write", "write"} <= elsewhere, elsewhere
        assert tracker.state_writes >= 1
        saved = json.loads(path.read_bytes())
        stored = {name: Decimal(b["stored"].get("", "0")) for name, b in saved["budgets"].items()
                  if name.startswith("user-")}  # fmt: skip
        assert stored == {f"user-{i}": costs[f"u{i}"] for i in range(150)} | {
            f"user-{i}": Decimal(0) for i in range(150, 300)
        }
        assert {k: Decimal(v) for k, v in saved["budgets"]["per-user"]["stored"].items()} == {
            u: c for u, c in costs.items() if int(u[1:]) < 150
        }
    finally:
        await store.close()
