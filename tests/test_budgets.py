"""Budgets end to end in one app on a real SQLite store: stored + unflushed spend in exact
decimals, the check endpoint (who refused, when it resets), templates past the gauge cap,
the index matching only what it should, gauges, auth and hostile parameters."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from budget_support import cost_of
from helpers import READ_TOKEN, bearer, make_settings, scrape, token_settings, value, wait_ready
from pydantic import ValidationError

from exporter.app import create_app
from exporter.appkeys import BUDGETS, FLUSHER
from exporter.budgets.index import SpecIndex
from exporter.budgets.model import Budget
from exporter.config import BudgetSpec

_ids = itertools.count()
JSON = {"Content-Type": "application/json"}
BUDGETS_CONFIG = [
    {"name": "alice-daily", "user": "alice", "window": "day", "limit_usd": "1"},
    {"name": "search-monthly", "team": "search", "window": "month", "limit_usd": "10"},
    {"name": "global-weekly", "window": "week", "limit_usd": "100", "warn_ratios": [0.5, 0.9]},
]


def _spend(user: str, team: str, usd: str) -> dict[str, Any]:
    return {"request_id": f"b-{next(_ids)}", "model": "gpt-4o", "user": user, "team": team,
            "input_tokens": 10, "cost_usd": float(usd)}  # fmt: skip


async def _budgets(client: Any) -> dict[str, dict[str, Any]]:
    resp = await client.get("/v1/budgets")
    assert resp.status == 200
    return {b["budget"]: b for b in (await resp.json())["budgets"]}


async def test_spend_is_stored_plus_unflushed_and_never_double_counted(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, budgets=BUDGETS_CONFIG, flush_interval=3600)
    app = create_app(settings)
    client = await aiohttp_client(app)
    await wait_ready(client)
    costs = [("alice", "search", "0.25"), ("alice", "search", "0.1"),
             ("bob", "search", "2.0000000001"), ("carol", "ads", "4.3")]  # fmt: skip
    batch = [_spend(*c) for c in costs]
    resp = await client.post("/v1/usage", data=orjson.dumps(batch), headers=JSON)
    assert resp.status == 202

    def want(pred: Any) -> Decimal:
        return sum((cost_of(c[2]) for c in costs if pred(c)), Decimal(0))

    expected = {
        "alice-daily": want(lambda c: c[0] == "alice"),
        "search-monthly": want(lambda c: c[1] == "search"),
        "global-weekly": want(lambda c: True),
    }
    before = await _budgets(client)
    for name, amount in expected.items():
        assert Decimal(before[name]["unflushed_usd"]) == amount, name
        assert Decimal(before[name]["stored_usd"]) == 0
        assert Decimal(before[name]["spent_usd"]) == amount

    assert await app[FLUSHER].flush_once() == 4
    between = await _budgets(client)  # flushed, not yet refreshed: still the same spend
    for name, amount in expected.items():
        assert Decimal(between[name]["spent_usd"]) == amount, name
    await app[BUDGETS].refresh()
    after = await _budgets(client)
    for name, amount in expected.items():
        assert Decimal(after[name]["unflushed_usd"]) == 0, name
        assert Decimal(after[name]["stored_usd"]) == amount, name

    resp = await client.post("/v1/usage", data=orjson.dumps(batch), headers=JSON)
    assert (await resp.json())["duplicates"] == 4  # the same reports again: spend stays
    assert (
        Decimal((await _budgets(client))["global-weekly"]["spent_usd"]) == expected["global-weekly"]
    )


async def test_check_says_who_refused_and_when_it_resets(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, budgets=BUDGETS_CONFIG)))
    await wait_ready(client)
    params = {"user": "alice", "team": "search"}
    verdict = await (await client.get("/v1/budgets/check", params=params)).json()
    assert verdict["allowed"] is True and verdict["refused_by"] == []
    assert {b["name"] for b in verdict["budgets"]} == {b["name"] for b in BUDGETS_CONFIG}

    await client.post("/v1/usage", data=orjson.dumps(_spend("alice", "x", "0.85")), headers=JSON)
    state = (await _budgets(client))["alice-daily"]
    assert state["status"] == "warning" and state["usage_ratio"] == 0.85
    await client.post("/v1/usage", data=orjson.dumps(_spend("alice", "x", "0.15")), headers=JSON)
    verdict = await (await client.get("/v1/budgets/check", params={"user": "alice"})).json()
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    tomorrow = midnight + timedelta(days=1)
    assert verdict["allowed"] is False and verdict["exceeded"] == ["alice-daily"]
    assert verdict["refused_by"] == [{"budget": "alice-daily", "resets_at": tomorrow.isoformat()}]
    verdict = await (await client.get("/v1/budgets/check", params={"user": "bob"})).json()
    assert verdict["allowed"] is True
    assert [b["name"] for b in verdict["budgets"]] == ["global-weekly"]

    for params in ({"usr": "alice"}, {"user": "x" * 300}):
        bad = await client.get("/v1/budgets/check", params=params)
        assert bad.status == 400

    samples = await scrape(client)
    assert value(samples, "llm_budget_limit_usd", budget="alice-daily") == 1.0
    assert value(samples, "llm_budget_spent_usd", budget="alice-daily") == 1.0
    assert value(samples, "llm_budget_usage_ratio", budget="alice-daily") == 1.0
    assert value(samples, "llm_budget_warn_ratio", budget="global-weekly") == 0.5
    end = value(samples, "llm_budget_window_end_timestamp_seconds", budget="alice-daily")
    assert end == tomorrow.timestamp()


async def test_template_budgets_are_exact_for_every_value_past_the_gauge_cap(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    budgets = [{"name": "per-user", "per": "user", "window": "month", "limit_usd": "1"},
               {"name": "team-keys", "per": "api_key_id", "team": "t", "window": "7d",
                "limit_usd": "2"}]  # fmt: skip
    app = create_app(make_settings(tmp_path, budgets=budgets, max_users=3))
    client = await aiohttp_client(app)
    await wait_ready(client)
    rng = random.Random(5)
    sent: list[tuple[str, str, str]] = []
    for i in range(60):
        user, cost = f"user-{rng.randrange(8)}", f"0.{rng.randrange(10**6):06d}"
        sent.append((user, f"key-{i % 4}", cost))
        item = {**_spend(user, "t", cost), "api_key_id": f"key-{i % 4}"}
        assert (await client.post("/v1/usage", data=orjson.dumps(item), headers=JSON)).status == 202
        if i == 30:
            await app[FLUSHER].flush_once()
        if i == 40:
            await app[BUDGETS].refresh()
    users = sorted({s[0] for s in sent})
    assert len(users) > 3
    for user in users:
        verdict = await (
            await client.get("/v1/budgets/check", params={"user": user, "team": "t"})
        ).json()
        by = {b["name"]: b for b in verdict["budgets"]}
        want = sum((cost_of(c) for u, _k, c in sent if u == user), Decimal(0))
        assert Decimal(by["per-user"]["spent_usd"]) == want, user
        assert by["per-user"]["match"] == {"user": user}
        assert verdict["allowed"] is (want < 1)
        assert "team-keys" in by  # api_key_id '' is a value of its own
    verdict = await (
        await client.get("/v1/budgets/check", params={"api_key_id": "key-1", "team": "t"})
    ).json()
    keys = {b["name"]: b for b in verdict["budgets"]}["team-keys"]
    assert Decimal(keys["spent_usd"]) == sum(
        (cost_of(c) for _u, k, c in sent if k == "key-1"), Decimal(0)
    )
    unseen = await (await client.get("/v1/budgets/check", params={"user": "nobody"})).json()
    assert unseen["allowed"] is True and Decimal(unseen["budgets"][0]["spent_usd"]) == 0

    samples = await scrape(client)
    series = [k for k in samples if k[0] == "llm_budget_spent_usd" and "per-user:" in k[1][0][1]]
    assert len(series) == 3  # capped like the user label
    assert value(samples, "llm_usage_label_overflow_total", label="budget") >= len(users) - 3
    assert len(await _budgets(client)) == len(users) + 4  # the list shows every value


def test_index_finds_exactly_the_matching_budgets() -> None:
    rng = random.Random(1)
    dims = ("user", "team", "api_key_id", "model")
    specs = []
    for i in range(300):
        fixed = {d: f"{d}{rng.randrange(3)}" for d in dims if rng.random() < 0.4}
        specs.append(Budget(i, BudgetSpec(name=f"b{i}", limit_usd=1, **fixed)))
    index = SpecIndex(specs)
    for ids in itertools.product(*[[f"{d}{v}" for v in range(4)] for d in dims]):
        got = {b.name for b in index.matching(*ids)}
        want = {
            b.name for b in specs if all(f is None or f == ids[j] for j, f in enumerate(b.fixed))
        }
        assert got == want


async def test_budget_api_needs_read_scope(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(token_settings(tmp_path, budgets=BUDGETS_CONFIG)))
    assert (await client.get("/v1/budgets")).status == 401
    assert (await client.get("/v1/budgets/check")).status == 401
    assert (await client.get("/v1/budgets", headers=bearer(READ_TOKEN))).status == 200


def test_budget_config_refuses_bad_windows_zones_and_templates() -> None:
    for bad in ({"window": "fortnight"}, {"window": "0d"}, {"timezone": "Mars/Olympus"},
                {"window": "24h", "timezone": "Asia/Tokyo"}, {"per": "user", "user": "alice"},
                {"per": "tenant"}, {"limit_usd": 0}):  # fmt: skip
        with pytest.raises(ValidationError):
            BudgetSpec(name="x", **{"limit_usd": 1, **bad})
    assert BudgetSpec(name="x", window="30d", limit_usd="0.1").limit_usd == Decimal("0.1")
