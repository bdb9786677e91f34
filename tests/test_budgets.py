"""Budgets end to end on a real SQLite store: stored + unflushed spend, the check endpoint,
gauges, auth, and windows that roll over without stale values."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from helpers import READ_TOKEN, bearer, make_settings, scrape, token_settings, value, wait_ready

from exporter.app import create_app
from exporter.appkeys import BUDGETS, FLUSHER
from exporter.budgets import BudgetTracker
from exporter.config import BudgetSpec
from exporter.selfmetrics import SelfMetrics
from exporter.store import Store
from exporter.usage import UsageReport

_ids = itertools.count()
JSON = {"Content-Type": "application/json"}
BUDGETS_CONFIG = [
    {"name": "alice-daily", "user": "alice", "window": "day", "limit_usd": 1.0},
    {"name": "search-monthly", "team": "search", "window": "month", "limit_usd": 10.0},
    {"name": "global-weekly", "window": "week", "limit_usd": 100.0, "warn_ratios": [0.5, 0.9]},
]


def _spend(user: str, team: str, usd: float) -> dict[str, Any]:
    return {
        "request_id": f"b-{next(_ids)}",
        "model": "gpt-4o",
        "user": user,
        "team": team,
        "input_tokens": 10,
        "cost_usd": usd,
    }


async def _budgets(client: Any) -> dict[str, dict[str, Any]]:
    resp = await client.get("/v1/budgets")
    assert resp.status == 200
    return {b["name"]: b for b in (await resp.json())["budgets"]}


async def test_spend_is_stored_plus_unflushed_and_never_double_counted(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, budgets=BUDGETS_CONFIG, flush_interval=3600)
    app = create_app(settings)
    client = await aiohttp_client(app)
    await wait_ready(client)
    batch = [_spend("alice", "search", 0.25), _spend("alice", "search", 0.5),
             _spend("bob", "search", 2.0), _spend("carol", "ads", 4.0)]  # fmt: skip
    resp = await client.post("/v1/usage", data=orjson.dumps(batch), headers=JSON)
    assert resp.status == 202

    before = await _budgets(client)
    assert before["alice-daily"]["unflushed_usd"] == 0.75
    assert before["alice-daily"]["stored_usd"] == 0
    assert before["search-monthly"]["spent_usd"] == 2.75
    assert before["global-weekly"]["spent_usd"] == 6.75
    assert before["alice-daily"]["status"] == "ok"

    assert await app[FLUSHER].flush_once() == 4
    await app[BUDGETS].refresh()
    after = await _budgets(client)
    for name, state in after.items():
        assert state["unflushed_usd"] == 0, name
        assert state["stored_usd"] == before[name]["spent_usd"], name
        assert state["spent_usd"] == before[name]["spent_usd"], name

    # the same reports again are duplicates: spend must not move
    resp = await client.post("/v1/usage", data=orjson.dumps(batch), headers=JSON)
    assert (await resp.json())["duplicates"] == 4
    assert (await _budgets(client))["global-weekly"]["spent_usd"] == 6.75


async def test_check_endpoint_and_gauges(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, budgets=BUDGETS_CONFIG)))
    await wait_ready(client)
    resp = await client.get("/v1/budgets/check", params={"user": "alice", "team": "search"})
    verdict = await resp.json()
    assert verdict["allowed"] is True
    assert {b["name"] for b in verdict["budgets"]} == set(b["name"] for b in BUDGETS_CONFIG)

    await client.post("/v1/usage", data=orjson.dumps(_spend("alice", "x", 0.85)), headers=JSON)
    state = (await _budgets(client))["alice-daily"]
    assert state["status"] == "warning" and math.isclose(state["usage_ratio"], 0.85)
    await client.post("/v1/usage", data=orjson.dumps(_spend("alice", "x", 0.2)), headers=JSON)
    verdict = await (await client.get("/v1/budgets/check", params={"user": "alice"})).json()
    assert verdict["allowed"] is False and verdict["exceeded"] == ["alice-daily"]
    # another user is not blocked by alice's budget
    verdict = await (await client.get("/v1/budgets/check", params={"user": "bob"})).json()
    assert verdict["allowed"] is True
    assert [b["name"] for b in verdict["budgets"]] == ["global-weekly"]

    bad = await client.get("/v1/budgets/check", params={"usr": "alice"})
    assert bad.status == 400 and "usr" in (await bad.json())["error"]

    samples = await scrape(client)
    assert value(samples, "llm_budget_limit_usd", budget="alice-daily") == 1.0
    assert math.isclose(value(samples, "llm_budget_spent_usd", budget="alice-daily"), 1.05)
    assert math.isclose(value(samples, "llm_budget_usage_ratio", budget="alice-daily"), 1.05)
    assert value(samples, "llm_budget_warn_ratio", budget="global-weekly") == 0.5
    end = value(samples, "llm_budget_window_end_timestamp_seconds", budget="alice-daily")
    tomorrow = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert end == (tomorrow + timedelta(days=1)).timestamp()
    for (name, _labels), v in samples.items():
        if name.startswith("llm_budget_"):
            assert math.isfinite(v), name


async def test_budget_api_needs_read_scope(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(token_settings(tmp_path, budgets=BUDGETS_CONFIG)))
    assert (await client.get("/v1/budgets")).status == 401
    assert (await client.get("/v1/budgets", headers=bearer(READ_TOKEN))).status == 200


async def test_windows_roll_over_without_stale_values(tmp_path: Path) -> None:
    """Spend stored late on one day is gone from the day budget at midnight UTC, stays in the
    month budget, and the month budget empties at the month's end."""
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'u.db'}")
    await store.upgrade()
    late = datetime(2026, 1, 31, 23, 59, 30, tzinfo=UTC)
    reports = [
        UsageReport.model_validate(
            {
                "request_id": f"r{i}",
                "model": "m",
                "user": "alice",
                "cost_usd": 0.4,
                "completed_at": late.isoformat(),
            }
        ).model_dump(mode="json")
        for i in range(3)
    ]
    await store.writer.write(reports)
    now = [late]
    specs = [
        BudgetSpec(name="day", user="alice", window="day", limit_usd=1),
        BudgetSpec(name="month", window="month", limit_usd=10),
    ]

    async def spend(spec: BudgetSpec, since: datetime, until: datetime) -> Decimal:
        return await store.spend(since, until, spec.user, spec.team, spec.api_key_id, spec.model)

    metrics = SelfMetrics()
    tracker = BudgetTracker(specs, metrics, spend, clock=lambda: now[0])
    try:
        await tracker.refresh()
        states = {s.spec.name: s for s in tracker.states()}
        assert math.isclose(states["day"].spent_usd, 1.2) and states["day"].status == "exceeded"
        assert math.isclose(states["month"].spent_usd, 1.2)

        now[0] = datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC)  # a new day and a new month
        states = {s.spec.name: s for s in tracker.states()}  # before any refresh: no stale spend
        assert states["day"].spent_usd == 0 and states["day"].status == "ok"
        assert states["month"].spent_usd == 0
        assert metrics.budget_spent.labels("day")._value.get() == 0
        await tracker.refresh()
        states = {s.spec.name: s for s in tracker.states()}
        assert states["day"].spent_usd == 0 and states["month"].spent_usd == 0
        assert states["month"].window_start == datetime(2026, 2, 1, tzinfo=UTC)

        now[0] = datetime(2026, 1, 31, 12, tzinfo=UTC)  # back inside January: spend is there
        await tracker.refresh()
        assert math.isclose({s.spec.name: s for s in tracker.states()}["month"].spent_usd, 1.2)
    finally:
        await store.close()
