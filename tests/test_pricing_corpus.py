"""A seeded corpus through the real HTTP ingest and flush, on Postgres and SQLite: every stored
cost equals genai-prices' `calc_price` at that report's own time, exactly, and `reprice` after a
price-file change makes details and rollups equal the oracle again (a second run: no change).

The corpus spans providers and shapes (canonical, OpenAI chat and Responses usage, Anthropic
usage), o3 before/after its 2025-06-10 price cut, deepseek's time-of-day prices, service tiers,
Anthropic cache writes by TTL and web searches, audio and image tokens, tiered prices, request
fees, unknown models and units, client-sent costs (exact text), price-file models with validity
intervals and half-way ties, and duplicates. Expected values come from tests/pricing_oracle.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
import storequeries as queries
from conftest import MakeClient
from genai_prices.types import ModelPrice
from helpers import parse_metrics
from pricing_oracle import Q, expected_cost, expected_with_prices
from sqlalchemy import select

from exporter.app import FLUSHER, STORE
from exporter.store import Store
from exporter.store.tables import usage_details

N_REPORTS = 2400
D = Decimal

#: the price file before and after the "correction" (model → [(from, to, prices)])
PRICES_V1: dict[str, list[tuple[datetime | None, datetime | None, dict[str, str]]]] = {
    "tie-model": [(None, None, {"input_mtok": "0.00005", "output_mtok": "0.00015"})],
    "house-model": [
        (None, datetime(2025, 6, 1, tzinfo=UTC), {"input_mtok": "1.25", "output_mtok": "5"}),
        (datetime(2025, 6, 1, tzinfo=UTC), None,
         {"input_mtok": "0.8", "output_mtok": "3.2", "cache_read_mtok": "0.08",
          "web_searches_kcount": "12.5"}),
    ],
}  # fmt: skip
PRICES_V2 = {
    **PRICES_V1,
    "tie-model": [(None, None, {"input_mtok": "0.00007", "output_mtok": "0.00011"})],
    "acme-late-model": [(None, None, {"input_mtok": "3", "output_mtok": "9"})],  # added later
}


def write_price_file(path: Path, prices: dict[str, Any]) -> Path:
    lines = ["models:"]
    for model, entries in prices.items():
        for start, end, values in entries:
            lines.append(f"  - model: {model}")
            for k, v in values.items():
                lines.append(f'    {k}: "{v}"')
            if start:
                lines.append(f"    valid_from: {start.isoformat()}")
            if end:
                lines.append(f"    valid_to: {end.isoformat()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def oracle(report: dict[str, Any], prices: dict[str, Any]) -> Decimal | str:
    """The cost the store must hold for one canonical report (None-cost → reason)."""
    if report.get("cost_usd") is not None:
        return D(str(report["cost_usd"])).quantize(Q, rounding=ROUND_HALF_EVEN)
    entries = prices.get(report["model"])
    if entries is not None:
        at = report["completed_at"]
        for start, end, values in entries:
            if (start is None or start <= at) and (end is None or at < end):
                mp = ModelPrice(**{k: D(v) for k, v in values.items()})
                return expected_with_prices(report, mp)
    return expected_cost(report)


# -- the corpus --------------------------------------------------------------------------------


def _tokens(rng: random.Random, top: int) -> int:
    return int(rng.paretovariate(1.2) * top / 20) % top


def _report(rng: random.Random, i: int) -> dict[str, Any]:
    kind = rng.choice(KINDS)
    r: dict[str, Any] = {"request_id": f"c-{i:05d}", "user": rng.choice(["ann", "bob", ""])}
    inp = _tokens(rng, 300_000) + 1
    out = _tokens(rng, 20_000)
    r.update(input_tokens=inp, output_tokens=out)
    at = datetime(2025, 3, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(200 * 86400))
    if kind == "o3":
        at = datetime(2025, 5, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(80 * 86400))
        r.update(model="o3", provider="openai", cached_input_tokens=rng.randrange(inp // 2 + 1),
                 reasoning_tokens=rng.randrange(out + 1),
                 web_search_requests=rng.choice([0, 0, 1, 3]))  # fmt: skip
    elif kind == "o3-tier":
        at = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(20 * 86400))
        tiers = ["default", "flex", "priority", "batch", "scale"]
        r.update(model="o3", provider="openai", service_tier=rng.choice(tiers))
    elif kind == "deepseek":
        r.update(model="deepseek-chat", provider="deepseek",
                 cached_input_tokens=rng.randrange(inp + 1))  # fmt: skip
    elif kind == "deepseek-search":
        r.update(model="deepseek-chat", provider="deepseek", web_search_requests=2)
    elif kind in ("claude", "claude-shape"):
        write = rng.randrange(inp // 2 + 1)
        claude = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-3-5-haiku-latest"]
        r.update(model=rng.choice(claude), provider="anthropic", cache_creation_input_tokens=write,
                 cache_creation_1h_input_tokens=rng.choice([0, write, write // 3]),
                 cached_input_tokens=rng.randrange(inp - write + 1),
                 web_search_requests=rng.choice([0, 0, 0, 2]),
                 service_tier=rng.choice(["", "standard"]))  # fmt: skip
    elif kind == "openai-chat":
        r.update(model=rng.choice(["gpt-4o", "gpt-4o-mini", "gpt-4.1"]), provider="openai",
                 cached_input_tokens=rng.randrange(inp + 1))  # fmt: skip
    elif kind == "audio":
        audio = rng.randrange(inp + 1)
        r.update(model=rng.choice(["gpt-4o-audio-preview", "gpt-realtime"]), provider="openai",
                 input_audio_tokens=audio, output_audio_tokens=rng.randrange(out + 1),
                 cached_input_tokens=0)  # fmt: skip
    elif kind == "image":
        r.update(model="gpt-image-1", provider="openai", input_image_tokens=rng.randrange(inp + 1),
                 output_image_tokens=rng.randrange(out + 1))  # fmt: skip
    elif kind == "gemini":
        r.update(model="gemini-2.5-pro", provider="google",
                 input_tokens=rng.choice([199_999, 200_000, 200_001, inp]),
                 cached_input_tokens=rng.randrange(1000))  # fmt: skip
    elif kind == "sonar":
        r.update(model="sonar", provider="perplexity")
    elif kind == "unknown":
        r.update(model=rng.choice(["mystery-model", "acme-late-model"]), provider="")
    elif kind == "sent":
        many_digits = f"{rng.randrange(10**4)}.{rng.randrange(10**16):016d}"
        r.update(model="whatever",
                 cost_usd=rng.choice([many_digits, rng.random() * 3, "0.00000000005"]))  # fmt: skip
    elif kind == "tie":
        r.update(model="tie-model", input_tokens=rng.randrange(1, 99) * 2 + 1,
                 output_tokens=rng.randrange(50))  # fmt: skip
    elif kind == "house":
        r.update(model="house-model", cached_input_tokens=rng.randrange(inp + 1),
                 web_search_requests=rng.choice([0, 1]))  # fmt: skip
    r["completed_at"] = at
    return r


KINDS = (["o3"] * 4 + ["o3-tier"] * 2 + ["deepseek"] * 3 + ["deepseek-search"] + ["claude"] * 2
         + ["claude-shape"] * 2 + ["openai-chat"] * 2 + ["audio"] * 2 + ["image", "gemini",
         "sonar", "unknown", "sent", "tie", "tie", "house", "house"])  # fmt: skip


def corpus(seed: int = 20261201) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [_report(rng, i) for i in range(N_REPORTS)]


def body_of(report: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The report as a client sends it: canonical, or a provider's usage object."""
    r = {k: v for k, v in report.items() if v not in (0, "", None) or k in ("input_tokens",)}
    r["completed_at"] = report["completed_at"].isoformat()
    model = report["model"]
    env = {k: r[k] for k in ("request_id", "completed_at", "user") if k in r}
    if model.startswith("claude") and rng.random() < 0.6:
        write = report.get("cache_creation_input_tokens", 0)
        one_hour = report.get("cache_creation_1h_input_tokens", 0)
        read = report.get("cached_input_tokens", 0)
        usage: dict[str, Any] = {
            "input_tokens": report["input_tokens"] - write - read,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": write - one_hour,
                               "ephemeral_1h_input_tokens": one_hour},
            "output_tokens": report["output_tokens"],
            "server_tool_use": {"web_search_requests": report.get("web_search_requests", 0)},
        }  # fmt: skip
        if report.get("service_tier"):
            usage["service_tier"] = report["service_tier"]
        return {**env, "type": "message", "role": "assistant", "model": model, "usage": usage}
    if model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4o-audio-preview") and rng.random() < 0.7:
        return {**env, "object": "chat.completion", "model": model, "usage": {
            "prompt_tokens": report["input_tokens"], "completion_tokens": report["output_tokens"],
            "total_tokens": report["input_tokens"] + report["output_tokens"],
            "prompt_tokens_details": {"cached_tokens": report.get("cached_input_tokens", 0),
                                      "audio_tokens": report.get("input_audio_tokens", 0)},
            "completion_tokens_details": {"reasoning_tokens": 0,
                                          "audio_tokens": report.get("output_audio_tokens", 0)},
        }}  # fmt: skip
    if model in ("o3", "gpt-image-1") and rng.random() < 0.5:
        body = {**env, "object": "response", "model": model, "usage": {
            "input_tokens": report["input_tokens"], "output_tokens": report["output_tokens"],
            "input_tokens_details": {"cached_tokens": report.get("cached_input_tokens", 0),
                                     "image_tokens": report.get("input_image_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": report.get("reasoning_tokens", 0),
                                      "image_tokens": report.get("output_image_tokens", 0)},
        }}  # fmt: skip
        if report.get("service_tier"):
            body["service_tier"] = report["service_tier"]
        if not report.get("web_search_requests"):
            return body
    return r


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- checks ------------------------------------------------------------------------------------


async def stored_costs(store: Store) -> dict[str, tuple[Decimal | None, str]]:
    t = usage_details
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(t.c.request_id, t.c.cost_usd, t.c.unpriced_reason))
        return {rid: (cost, reason) for rid, cost, reason in rows}


async def assert_store_equals_oracle(
    store: Store, reports: list[dict[str, Any]], prices: dict[str, Any]
) -> Counter[str]:
    want = {r["request_id"]: oracle(r, prices) for r in reports}
    stored = await stored_costs(store)
    assert stored.keys() == want.keys()
    wrong = [
        (rid, stored[rid], w)
        for rid, w in want.items()
        if stored[rid] != ((w, "") if isinstance(w, Decimal) else (None, w))
    ]
    assert not wrong, f"{len(wrong)} wrong, e.g. {wrong[:5]}"
    # rollups: per (granularity, bucket, model), exact cost and unpriced count
    exp: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [D(0), 0])
    for r in reports:
        hour = r["completed_at"].replace(minute=0, second=0, microsecond=0)
        for key in (("hour", hour), ("day", hour.replace(hour=0))):
            acc = exp[(*key, r["model"])]
            w = want[r["request_id"]]
            if isinstance(w, Decimal):
                acc[0] += w
            else:
                acc[1] += 1
    got: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [D(0), 0])
    for key, totals in (await queries.rollup_rows(store.engine)).items():
        acc = got[(key[0], key[1], key[2])]
        acc[0] += totals.cost_usd
        acc[1] += totals.unpriced
    assert dict(got) == dict(exp)
    return Counter(w for w in want.values() if isinstance(w, str))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite+aiosqlite:///{tmp_path / 'corpus.sqlite'}"


def run_reprice(tmp_path: Path, url: str, price_file: Path, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "exporter", "reprice", "--data-dir", str(tmp_path / "cli"),
           "--database-url", url, "--price-file", str(price_file), "--from", "2025-01-01",
           "--to", "2027-01-01", "--format", "json", "--batch-size", "500", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_corpus_costs_equal_calc_price_and_reprice_restores_the_oracle(
    make_client: MakeClient, tmp_path: Path, database_url: str
) -> None:
    reports = corpus()
    kinds = Counter(r["model"] for r in reports)
    assert kinds["o3"] > 200 and kinds["deepseek-chat"] > 200 and kinds["tie-model"] > 100
    v1 = write_price_file(tmp_path / "prices-v1.yaml", PRICES_V1)
    client = await make_client(database_url=database_url, price_file=v1, retention_days=3650)
    for _ in range(300):  # the app migrates in the background; wait for it (bounded)
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    rng = random.Random(7)
    bodies = [body_of(r, rng) for r in reports]
    resent = rng.sample(bodies, 300)  # duplicates: acknowledged, stored and counted once
    answers = Counter[str]()
    for chunk in batches(bodies + resent, 400):
        resp = await client.post("/v1/usage", json=chunk)
        answer = await resp.json()
        assert resp.status == 202, answer
        assert answer["rejected"] == 0, answer["errors"][:3]
        answers.update(accepted=answer["accepted"], duplicates=answer["duplicates"])
    assert answers == {"accepted": N_REPORTS, "duplicates": len(resent)}
    app = client.server.app
    for _ in range(10):  # the background flusher may have taken a part already
        if not await app[FLUSHER].flush_once():
            break
    store = app[STORE]
    reasons = await assert_store_equals_oracle(store, reports, PRICES_V1)
    assert {"unknown_model", "unknown_unit"} <= reasons.keys()
    # the unpriced counter: once per distinct report, by reason
    metrics = parse_metrics(await (await client.get("/metrics")).text())
    for reason, n in reasons.items():
        assert metrics[("llm_usage_unpriced_reports_total", (("reason", reason),))] == n

    # a corrected price file, applied to last year's rows by the real CLI
    v2 = write_price_file(tmp_path / "prices-v2.yaml", PRICES_V2)
    dry = run_reprice(tmp_path, database_url, v2, "--dry-run")
    assert dry["changed"] > 100
    await assert_store_equals_oracle(store, reports, PRICES_V1)  # a dry run changes nothing
    only = run_reprice(tmp_path, database_url, v2, "--dry-run", "--model", "tie-model")
    assert set(only["models"]) == {"tie-model"}
    assert only["models"]["tie-model"] == dry["models"]["tie-model"]
    first = run_reprice(tmp_path, database_url, v2)
    assert first["changed"] == dry["changed"]
    assert first["models"]["acme-late-model"]["newly_priced"] == kinds["acme-late-model"]
    await assert_store_equals_oracle(store, reports, PRICES_V2)
    want_delta = sum(
        (
            (w if isinstance(w, Decimal) else D(0))
            - (v if isinstance(v := oracle(r, PRICES_V1), Decimal) else D(0))
            for r in reports
            for w in [oracle(r, PRICES_V2)]
        ),
        D(0),
    )
    assert D(first["delta_usd"]) == want_delta
    second = run_reprice(tmp_path, database_url, v2)
    assert second["changed"] == 0 and second["scanned"] == first["scanned"]
    await assert_store_equals_oracle(store, reports, PRICES_V2)


async def test_cost_above_the_cap_is_refused_with_a_reason(make_client: MakeClient) -> None:
    client = await make_client()
    items = [
        {"model": "o1-pro", "provider": "openai", "input_tokens": 10**12, "output_tokens": 10**12},
        {"model": "m", "cost_usd": "10000.0000000001"},
        {"model": "m", "cost_usd": 1e7},
        {"model": "m", "cost_usd": "10000"},  # the cap itself is allowed
    ]
    resp = await client.post("/v1/usage", json=items)
    answer = await resp.json()
    assert resp.status == 202
    assert answer["accepted"] == 1
    assert [e["index"] for e in answer["errors"]] == [0, 1, 2]
    assert all("cap" in e["error"] for e in answer["errors"])
    resp = await client.post("/v1/usage", json=items[0])
    assert resp.status == 422
    assert "cap" in (await resp.json())["errors"][0]["error"]
