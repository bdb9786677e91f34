"""GET /metrics: text 0.0.4 and OpenMetrics parse back to the values sent, gzip on request,
hostile label values stay valid exposition, and the real `promtool check metrics` passes."""

from __future__ import annotations

import gzip
import itertools
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import Key, make_settings, parse_metrics, report, select, total, value, wait_ready
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import money
from exporter.app import create_app
from exporter.logevents import EVENT_CLASSES
from exporter.selfmetrics import REJECT_REASONS, SelfMetrics
from exporter.store import tables
from exporter.workers import WORKER_ONLY_METRICS

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]

OPENMETRICS = "application/openmetrics-text; version=1.0.0"

#: the metric contract (ARCHITECTURE.md, docs/metrics.md): family name → type
CONTRACT = {
    "llm_requests": "counter",
    "llm_request_errors": "counter",
    "llm_input_tokens": "counter",
    "llm_output_tokens": "counter",
    "llm_cached_input_tokens": "counter",
    "llm_cache_creation_input_tokens": "counter",
    "llm_reasoning_tokens": "counter",
    "llm_cost_usd": "counter",
    "llm_request_duration_seconds": "histogram",
    "llm_time_to_first_token_seconds": "histogram",
    "llm_usage_reports_received": "counter",
    "llm_usage_reports_rejected": "counter",
    "llm_usage_reports_duplicate": "counter",
    "llm_usage_estimated_reports": "counter",
    "llm_usage_flush_duration_seconds": "histogram",
    "llm_usage_flush_failures": "counter",
    "llm_usage_last_flush_success_timestamp_seconds": "gauge",
    "llm_usage_pending_reports": "gauge",
    "llm_usage_wal_bytes": "gauge",
    "llm_usage_label_overflow": "counter",
    "llm_usage_unpriced_reports": "counter",
    "llm_usage_build_info": "gauge",
}
#: samples that background work (flusher, scrape-time gauges) may change between two scrapes
VOLATILE = (
    "llm_usage_flush",
    "llm_usage_last_flush",
    "llm_usage_pending",
    "llm_usage_wal",
    "llm_budget",
)


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> MakeClient:
    counter = itertools.count()

    async def make(client_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Any:
        overrides.setdefault("data_dir", tmp_path / f"data{next(counter)}")
        app = create_app(make_settings(tmp_path, **overrides))
        return await aiohttp_client(app, **(client_kwargs or {}))

    return make


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install Debian's `prometheus` package "
            "(apt-get install -y --no-install-recommends prometheus)"
        )
    return path


def promtool_check(text: str) -> None:
    proc = subprocess.run(
        [promtool(), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
    )
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"promtool check metrics failed ({proc.returncode}):\n{output}"


def stable(samples: dict[Key, float]) -> dict[Key, float]:
    return {k: v for k, v in samples.items() if not k[0].startswith(VOLATILE)}


async def get_text(client: Any, accept: str = "") -> tuple[str, Any]:
    resp = await client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert resp.status == 200
    return await resp.text(), resp


def parse_openmetrics(text: str) -> dict[Key, float]:
    return parse_metrics(text, openmetrics_families)


# Durations chosen against the default buckets 0.1 0.25 0.5 1 2.5 5 10 20 30 60 120 300.
DURATIONS_MS = [50, 300, 300, 4000, 400_000]
TTFTS_MS = [120, 700]
REPORTS = [
    report(
        request_id=f"d{i}",
        model="gpt-x",
        user="alice",
        input_tokens=100 * (i + 1),
        output_tokens=10 * (i + 1),
        cached_input_tokens=50 * i,
        reasoning_tokens=i,
        duration_ms=ms,
        cost_usd=0.125,
    )
    for i, ms in enumerate(DURATIONS_MS)
] + [
    report(request_id="t0", model="gpt-x", user="bob", ttft_ms=TTFTS_MS[0], output_tokens=7),
    report(
        request_id="t1",
        model="gpt-x",
        user="bob",
        ttft_ms=TTFTS_MS[1],
        status="error",
        error_type="timeout",
        cost_usd=0.25,
    ),
    report(
        request_id="e0",
        model="embed-y",
        operation="embedding",
        user="alice",
        input_tokens=64,
        cache_creation_input_tokens=32,
    ),
]


def expected_counters() -> dict[tuple[str, tuple[str, str, str]], float]:
    """Sums per (family, (model, operation, user)) computed from REPORTS directly."""
    fields = {
        "llm_input_tokens_total": "input_tokens",
        "llm_output_tokens_total": "output_tokens",
        "llm_cached_input_tokens_total": "cached_input_tokens",
        "llm_cache_creation_input_tokens_total": "cache_creation_input_tokens",
        "llm_reasoning_tokens_total": "reasoning_tokens",
        "llm_cost_usd_total": "cost_usd",
    }
    out: dict[tuple[str, tuple[str, str, str]], float] = {}
    for r in REPORTS:
        key = (r["model"], r.get("operation", "chat"), r["user"])
        out[("llm_requests_total", key)] = out.get(("llm_requests_total", key), 0) + 1
        errors = 1 if r.get("status", "success") != "success" else 0
        out[("llm_request_errors_total", key)] = (
            out.get(("llm_request_errors_total", key), 0) + errors
        )
        for family, field in fields.items():
            out[(family, key)] = out.get((family, key), 0) + r.get(field, 0)
    return out


def check_values(samples: dict[Key, float]) -> None:
    for (family, (model, operation, user)), want in expected_counters().items():
        got = value(samples, family, model=model, operation=operation, user=user)
        assert got == pytest.approx(want), (family, model, user)

    # duration histogram: cumulative buckets, count and sum, no user label
    labels = {"model": "gpt-x", "operation": "chat"}
    seconds = [ms / 1000 for ms in DURATIONS_MS]
    for le in (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0):
        bucket = value(samples, "llm_request_duration_seconds_bucket", le=str(le), **labels)
        assert bucket == sum(1 for s in seconds if s <= le), le
    assert value(samples, "llm_request_duration_seconds_bucket", le="+Inf", **labels) == 5
    assert value(samples, "llm_request_duration_seconds_count", **labels) == 5
    assert value(samples, "llm_request_duration_seconds_sum", **labels) == pytest.approx(
        sum(seconds)
    )
    assert value(samples, "llm_time_to_first_token_seconds_bucket", le="0.1", **labels) == 0
    assert value(samples, "llm_time_to_first_token_seconds_bucket", le="0.25", **labels) == 1
    assert value(samples, "llm_time_to_first_token_seconds_bucket", le="1.0", **labels) == 2
    assert value(samples, "llm_time_to_first_token_seconds_sum", **labels) == pytest.approx(0.82)
    assert not select(samples, "llm_request_duration_seconds_count", model="embed-y")
    for key in samples:
        if key[0].startswith(("llm_request_duration", "llm_time_to_first")):
            assert "user" not in dict(key[1]), key


async def send(client: Any, items: list[dict[str, Any]]) -> None:
    resp = await client.post("/v1/usage", json=items)
    body = await resp.json()
    assert resp.status == 202, body
    assert body["accepted"] == len(items), body


async def test_text_format_parses_back_to_the_values_sent(make_client: MakeClient) -> None:
    client = await make_client()
    await send(client, REPORTS)
    text, resp = await get_text(client)
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "version=0.0.4" in resp.headers["Content-Type"]
    samples = parse_metrics(text)
    check_values(samples)
    assert value(samples, "llm_usage_reports_received_total") == len(REPORTS)
    promtool_check(text)


async def test_openmetrics_parses_back_to_the_same_values(make_client: MakeClient) -> None:
    client = await make_client()
    await send(client, REPORTS)
    om_text, resp = await get_text(client, OPENMETRICS)
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om_text.endswith("# EOF\n")
    assert om_text.count("# EOF") == 1
    om = parse_openmetrics(om_text)
    check_values(om)
    text, _ = await get_text(client)
    assert stable(om) == stable(parse_metrics(text))


async def test_every_contract_family_is_exposed(make_client: MakeClient) -> None:
    client = await make_client()
    for accept in ("", OPENMETRICS):
        text, _ = await get_text(client, accept)
        parse = openmetrics_families if accept else text_string_to_metric_families
        families = {f.name: f.type for f in parse(text)}
        for name, kind in CONTRACT.items():
            assert families.get(name) == kind, (accept, name, families.get(name))
    text, _ = await get_text(client)
    promtool_check(text)  # an empty exporter is valid exposition too


async def test_render_follows_new_reports(make_client: MakeClient) -> None:
    client = await make_client()
    await send(client, [report(request_id="a", input_tokens=5)])
    for accept in ("", OPENMETRICS):
        text, _ = await get_text(client, accept)
        samples = parse_openmetrics(text) if accept else parse_metrics(text)
        assert total(samples, "llm_input_tokens_total") == 5
    await send(client, [report(request_id="b", input_tokens=7, user="zed")])
    for accept in ("", OPENMETRICS):
        text, _ = await get_text(client, accept)
        samples = parse_openmetrics(text) if accept else parse_metrics(text)
        assert total(samples, "llm_input_tokens_total") == 12
        assert (
            value(
                samples, "llm_input_tokens_total", model="test-model", operation="chat", user="zed"
            )
            == 7
        )


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
async def test_gzip_when_asked(make_client: MakeClient, accept: str) -> None:
    client = await make_client(client_kwargs={"auto_decompress": False})
    await send(client, REPORTS)
    headers = {"Accept-Encoding": "gzip"}
    if accept:
        headers["Accept"] = accept
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200
    assert resp.headers.get("Content-Encoding") == "gzip"
    raw = await resp.read()
    text = gzip.decompress(raw).decode()
    samples = parse_openmetrics(text) if accept else parse_metrics(text)
    check_values(samples)

    plain = await client.get("/metrics", headers={**headers, "Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    plain_text = (await plain.read()).decode()
    plain_samples = parse_openmetrics(plain_text) if accept else parse_metrics(plain_text)
    assert stable(plain_samples) == stable(samples)
    if not accept:
        promtool_check(text)


HOSTILE_LABELS = [
    'quote"inside',
    "back\\slash\\\\double",
    "new\nline",
    "tab\tand\rcarriage",
    "ctrl\x01\x1b[31m\x7fchars",  # (NUL is refused at ingest: tests/test_otlp_spellings.py)
    'all"of\\them\n{at}=once,',
    "unicode ✓ 用户 é",
    "trailing backslash\\",
]


async def test_hostile_label_values_render_as_valid_exposition(make_client: MakeClient) -> None:
    client = await make_client()
    items = [
        report(request_id=f"h{i}", user=label, model=f'm"{i}\\', input_tokens=i + 1)
        for i, label in enumerate(HOSTILE_LABELS)
    ]
    await send(client, items)
    text, _ = await get_text(client)
    promtool_check(text)
    om_text, _ = await get_text(client, OPENMETRICS)
    for samples in (parse_metrics(text), parse_openmetrics(om_text)):
        series = select(samples, "llm_input_tokens_total")
        assert len(series) == len(HOSTILE_LABELS)
        by_model = {dict(k[1])["model"]: (dict(k[1])["user"], v) for k, v in series.items()}
        for i, label in enumerate(HOSTILE_LABELS):
            user, tokens = by_model[f'm"{i}\\']
            assert tokens == i + 1
            # printable characters survive exactly (quotes, backslashes, unicode); control
            # characters never reach the output
            assert user == "".join(ch for ch in label if ch.isprintable()), (label, user)
    for line in text.splitlines():
        assert not any(ord(ch) < 0x20 for ch in line), repr(line)


async def test_long_label_values_are_capped_and_valid(make_client: MakeClient) -> None:
    client = await make_client()
    long_users = ["a" * 256, "a" * 255 + "b"]
    await send(client, [report(user=u, input_tokens=1) for u in long_users])
    text, _ = await get_text(client)
    promtool_check(text)
    users = [dict(k[1])["user"] for k in select(parse_metrics(text), "llm_requests_total")]
    assert users and all(len(u) <= 256 for u in users)
    assert all(long_users[0].startswith(u) or long_users[1].startswith(u) for u in users)
    assert total(parse_metrics(text), "llm_input_tokens_total") == 2


async def test_extra_labels_and_many_series_pass_promtool(make_client: MakeClient) -> None:
    client = await make_client(extra_labels=["provider", "team"])
    items = [
        report(
            request_id=f"s{i}",
            model=f"model-{i % 7}",
            user=f"user-{i}",
            provider=("openai", "anthropic", "")[i % 3],
            team=f"team-{i % 5}",
            operation=("chat", "embedding", "rerank", "responses")[i % 4],
            input_tokens=i,
            duration_ms=i * 10,
            ttft_ms=i,
        )
        for i in range(1500)
    ]
    await send(client, items)
    text, _ = await get_text(client)
    promtool_check(text)
    samples = parse_metrics(text)
    requests = select(samples, "llm_requests_total")
    assert len(requests) == 1500
    assert all({"provider", "team"} <= dict(k[1]).keys() for k in requests)
    assert total(samples, "llm_input_tokens_total") == sum(range(1500))
    assert total(samples, "llm_input_tokens_total", provider="anthropic") == sum(range(1, 1500, 3))
    om = parse_openmetrics((await get_text(client, OPENMETRICS))[0])
    assert stable(om) == stable(samples)


# -- content negotiation ----------------------------------------------------------------------

#: (Accept, Accept-Encoding) → (OpenMetrics?, gzip?), from RFC 9110 and the OpenMetrics spec
NEGOTIATION = [
    ("", "", False, False),
    ("*/*", "gzip", False, True),
    ("text/plain; version=0.0.4", "gzip;q=0", False, False),
    ("text/plain", "gzip;q=0.001", False, True),
    ("text/plain", "identity", False, False),
    ("text/plain", "*", False, True),
    ("text/plain", "*;q=0", False, False),
    ("text/plain", "gzip;q=0, *", False, False),
    ("text/plain", "identity;q=1, *;q=0.5", False, True),
    ("text/plain", "deflate, br", False, False),
    ("text/plain", "GZIP", False, True),
    ("application/openmetrics-text; version=1.0.0", "", True, False),
    ("application/openmetrics-text", "", True, False),
    ("application/openmetrics-text; version=0.0.1", "", False, False),
    (
        "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5",
        "",
        False,
        False,
    ),
    (
        "application/openmetrics-text;version=1.0.0;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        "gzip",
        True,
        True,
    ),  # what Prometheus 2.5x sends
    ("text/plain;q=0.9, application/openmetrics-text;version=1.0.0", "", True, False),
    ("application/openmetrics-text;version=1.0.0;q=0.2, text/plain;q=0.9", "", False, False),
    ("application/openmetrics-text;version=1.0.0;q=0, text/plain", "", False, False),
    ("application/openmetrics-text;version=1.0.0;q=bogus", "", False, False),
    ("application/json", "x-gzip", False, True),
]


@pytest.mark.parametrize(("accept", "encoding", "openmetrics", "gzipped"), NEGOTIATION)
async def test_metrics_negotiates_format_and_gzip_with_q_values(
    make_client: MakeClient, accept: str, encoding: str, openmetrics: bool, gzipped: bool
) -> None:
    client = await make_client(client_kwargs={"auto_decompress": False})
    await send(client, REPORTS)
    resp = await client.get("/metrics", headers={"Accept": accept, "Accept-Encoding": encoding})
    assert resp.status == 200
    assert resp.headers.get("Content-Encoding") == ("gzip" if gzipped else None)
    assert "Accept-Encoding" in resp.headers["Vary"]
    raw = await resp.read()
    text = (gzip.decompress(raw) if gzipped else raw).decode()
    if openmetrics:
        assert resp.headers["Content-Type"].startswith(
            "application/openmetrics-text; version=1.0.0"
        )
        assert text.endswith("# EOF\n")
        check_values(parse_openmetrics(text))
    else:
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "# EOF" not in text
        check_values(parse_metrics(text))


@pytest.mark.parametrize(
    "accept",
    [
        "",
        "text/plain",
        "*/*",
        "application/openmetrics-text",
        "application/openmetrics-text; version=1.0.0",
        "application/openmetrics-text; version=0.0.1",
        "application/openmetrics-text; version=0.0.1, text/plain",
        "text/plain, application/openmetrics-text; version=1.0.0",
    ],
)
async def test_without_q_values_the_format_is_prometheus_clients_choice(
    make_client: MakeClient, accept: str
) -> None:
    from prometheus_client.exposition import choose_encoder, gzip_accepted

    client = await make_client()
    resp = await client.get("/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"})
    _, theirs = choose_encoder(accept)
    assert resp.headers["Content-Type"].split(";")[0] == theirs.split(";")[0]
    assert (resp.headers.get("Content-Encoding") == "gzip") == gzip_accepted("gzip")


# -- initialised series, exact costs, no `_created` -------------------------------------------

_FAMILY_REF = re.compile(r"(?<![\w:])(llm_[a-z0-9_]+)(?![\w:])")
_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def families_used_by_dashboards_and_rules() -> set[str]:
    root = Path(__file__).resolve().parent.parent
    text = "".join(p.read_text() for p in (root / "dashboards").glob("*.json"))
    text += "".join(p.read_text() for p in (root / "rules").glob("*.yml"))
    return set(_FAMILY_REF.findall(text))


async def test_a_fresh_service_exports_every_self_metric_the_dashboards_and_rules_use(
    make_client: MakeClient,
) -> None:
    budgets = [{"name": "team-a", "team": "a", "window": "day", "limit_usd": 5.0}]
    client = await make_client(budgets=budgets, extra_labels=["team"])
    await wait_ready(client)
    text, _ = await get_text(client)
    samples = parse_metrics(text)
    names = {k[0] for k in samples}
    declared = {f.name for f in text_string_to_metric_families(text)}
    used = families_used_by_dashboards_and_rules()
    assert len(used) > 20, used
    for name in sorted(used - WORKER_ONLY_METRICS):  # those: tests/test_workers.py
        if name.startswith(("llm_usage_", "llm_budget_")):  # known label sets: at 0 from start
            assert name in names, f"{name} has no sample on a fresh scrape"
        else:  # usage families: labels come from reports; the family is declared
            base = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
            assert base in declared, name
    for reason in REJECT_REASONS:
        assert value(samples, "llm_usage_reports_rejected_total", reason=reason) == 0
    for label in ("model", "operation", "user", "team"):
        assert value(samples, "llm_usage_label_overflow_total", label=label) == 0
    for event in EVENT_CLASSES:
        assert ("llm_usage_log_events_total", (("event", event),)) in samples
        assert ("llm_usage_log_suppressed_total", (("event", event),)) in samples
    assert not [n for n in names if n.endswith("_created")]
    promtool_check(text)


def test_self_metrics_leave_prometheus_client_emitting_created_elsewhere() -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    SelfMetrics()
    registry = CollectorRegistry()
    Counter("embedder_events", "An embedding process's own counter.", registry=registry).inc()
    assert b"embedder_events_created" in generate_latest(registry)


COSTS = [0.00021, 0.00021, 0.1, 0.2, 1e-05, 3.3e-07, 0.000137, 2.5e-10]


async def test_costs_render_without_float_noise(make_client: MakeClient) -> None:
    client = await make_client()
    items = [report(request_id=f"c{i}", user="cost", cost_usd=c) for i, c in enumerate(COSTS)]
    await send(client, items)
    for accept in ("", OPENMETRICS):
        text, _ = await get_text(client, accept)
        (line,) = [ln for ln in text.splitlines() if ln.startswith("llm_cost_usd_total{")]
        exact = sum(tables.to_decimal(c) for c in COSTS)  # the store's rule, per report
        assert line.rsplit(" ", 1)[1] == repr(float(exact)), line
    naive = sum(COSTS)  # what float accumulation printed before
    assert repr(naive) != repr(float(sum(tables.to_decimal(c) for c in COSTS)))


async def test_histogram_sums_render_without_float_noise(make_client: MakeClient) -> None:
    client = await make_client()
    millis = [100, 200, 100.5, 0.001, 300]
    items = [report(request_id=f"h{i}", duration_ms=ms) for i, ms in enumerate(millis)]
    await send(client, items)
    text, _ = await get_text(client)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("llm_request_duration_seconds_sum{")]
    exact = sum(Decimal(repr(ms)) for ms in millis) / 1000
    assert line.rsplit(" ", 1)[1] == repr(float(exact)), line


def test_live_cost_units_round_like_the_store() -> None:
    """The fast float path and the Decimal fallback give the store's per-report rounding."""
    import random

    rng = random.Random(18)
    tricky = [2.5e-10, 1.5e-10, 3.5e-10, 0.00041999999999999996, 123.45678901235, 1e6, 0.1, 0.0]
    randoms = [
        rng.uniform(0, 10) ** rng.choice((1, 3, 6)) / 10 ** rng.randint(0, 9) for _ in range(5000)
    ]
    halves = [(rng.randint(0, 10**8) + 0.5) / 1e10 for _ in range(500)]
    for cost in tricky + randoms + halves:
        if cost > 1e6:
            continue
        expected = tables.to_decimal(cost).scaleb(money.COST_SCALE)
        assert money.cost_units(cost) == int(expected), cost
        assert money.cost_units(Decimal(repr(cost))) == int(expected), cost
