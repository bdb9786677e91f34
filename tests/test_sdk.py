"""The Python SDK (exporter.client) against the real service, driving the real openai and
anthropic SDKs against a loopback fake LLM server. Expected numbers come from what the fake
server returned (its `calls` log), never from the SDK under test."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from fake_llm import Call, FakeLLM
from helpers import ServiceProcess, free_port, http, parse_metrics, start_service, total

from exporter.client import (
    SyncUsageClient,
    UsageClient,
    UsageTracker,
    current_frame,
    instrument,
    node,
)

TOKENS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceProcess]:
    port = free_port()
    svc = start_service(
        ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        tmp_path / "service.log",
        port=port,
        env={"LLM_USAGE_FLUSH_INTERVAL": "0.2"},
    )
    yield svc
    svc.stop()


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


def stored_rows(data_dir: Path, expected: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """usage_details rows read with the stdlib sqlite3 module once `expected` rows are there."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(data_dir / "usage.db") as db:
            db.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in db.execute("SELECT * FROM usage_details")]
            except sqlite3.OperationalError:  # the service is still creating its schema
                rows = []
        if len(rows) >= expected:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"{len(rows)} rows stored, expected {expected}")


def sums(calls: list[Call]) -> dict[str, int]:
    return {k: sum(getattr(c, k) for c in calls) for k in TOKENS}


def row_sums(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {k: sum(int(r[k]) for r in rows) for k in TOKENS}


async def test_instrumented_sdk_clients_report_every_call_exactly(
    service: ServiceProcess, llm: FakeLLM, tmp_path: Path
) -> None:
    usage = UsageClient(service.url, flush_interval=0.05)
    oa = instrument(
        openai.AsyncOpenAI(base_url=llm.openai_url, api_key="sk-test"),
        usage,
        user="alice",
        team="search",
    )
    an = instrument(
        anthropic.AsyncAnthropic(base_url=llm.anthropic_url, api_key="sk-ant"), usage, user="bob"
    )
    await oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    stream = await oa.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    async for _ in stream:
        pass
    await oa.responses.create(model="o3", input="hi")
    await oa.embeddings.create(model="text-embedding-3-small", input="hi")
    await an.messages.create(
        model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    astream = await an.messages.create(
        model="claude-haiku-4-5",
        max_tokens=10,
        stream=True,
        messages=[{"role": "user", "content": "hi"}],
    )
    async for _ in astream:
        pass
    # the sync SDK clients through the same async usage client's loop
    sync_oa = instrument(openai.OpenAI(base_url=llm.openai_url, api_key="sk-test"), usage)
    await asyncio.to_thread(
        sync_oa.chat.completions.create,
        model="gpt-4.1",
        messages=[{"role": "user", "content": "x"}],
    )
    await usage.close()

    assert usage.stats.accepted == len(llm.calls) == 7
    assert usage.stats.dropped == usage.stats.rejected == usage.stats.undelivered == 0
    rows = stored_rows(tmp_path / "data", len(llm.calls))
    by_model = {r["model"]: r for r in rows}
    for call in llm.calls:
        row = by_model[call.model]
        for k in TOKENS:
            assert int(row[k]) == getattr(call, k), (call.model, k)
        assert row["provider"] == call.provider
        assert row["operation"] == call.operation
    assert by_model["gpt-4o"]["user"] == "alice" and by_model["gpt-4o"]["team"] == "search"
    assert by_model["claude-sonnet-4-5"]["user"] == "bob"
    assert int(by_model["gpt-4o-mini"]["stream"]) == 1
    assert by_model["gpt-4o-mini"]["ttft_ms"] is not None

    _, body, _ = http("GET", f"{service.url}/metrics")
    samples = parse_metrics(body.decode())
    truth = sums(llm.calls)
    assert total(samples, "llm_input_tokens_total") == truth["input_tokens"]
    assert total(samples, "llm_output_tokens_total") == truth["output_tokens"]
    assert total(samples, "llm_cached_input_tokens_total") == truth["cached_input_tokens"]
    assert total(samples, "llm_requests_total") == len(llm.calls)


async def test_agent_pipeline_lands_each_call_on_its_node(
    service: ServiceProcess, llm: FakeLLM, tmp_path: Path
) -> None:
    usage = UsageClient(service.url, flush_interval=0.05)
    oa = instrument(openai.AsyncOpenAI(base_url=llm.openai_url, api_key="k", max_retries=0), usage)
    made: dict[str, str] = {}  # response id -> node path, recorded where each call is made

    async def ask(model: str = "gpt-4o-mini") -> None:
        frame = current_frame()
        assert frame is not None
        try:
            r = await oa.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "q"}]
            )
            made[r.id] = frame.node
        except openai.InternalServerError:
            made[llm.calls[-1].id] = frame.node

    @node("retriever")
    async def retrieve(i: int) -> None:
        await ask()
        async with node("rerank"):
            await ask()

    async with node("agent") as root:
        await ask("gpt-4o")
        await asyncio.gather(*(retrieve(i) for i in range(3)))  # concurrent branches
        with node("writer"):
            await ask("gpt-4o")
            await ask("boom")  # fails at the provider
    await usage.close()

    rows = stored_rows(tmp_path / "data", len(llm.calls))
    assert {r["trace_id"] for r in rows} == {root.trace_id}
    expected: dict[str, list[Call]] = defaultdict(list)
    for call in llm.calls:
        expected[made[call.id]].append(call)
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        got[r["node"]].append(r)
    assert set(got) == {"agent", "agent/retriever", "agent/retriever/rerank", "agent/writer"}
    for path, calls in expected.items():
        assert row_sums(got[path]) == sums(calls), path
        assert len(got[path]) == len(calls)
    assert Counter(r["status"] for r in got["agent/writer"]) == {"success": 1, "error": 1}
    assert [r["error_type"] for r in got["agent/writer"] if r["status"] == "error"] == [
        "InternalServerError"
    ]
    # every report's parent is the span of the node it was made in, one span per node entry
    spans = Counter((r["node"], r["parent_id"]) for r in rows)
    assert len({p for (n, p) in spans if n == "agent/retriever"}) == 3

    # the read API's per-node breakdown of the trace equals the fake provider's own numbers
    status, body, _ = http("GET", f"{service.url}/v1/traces/{root.trace_id}/usage")
    assert status == 200, body
    nodes = {n["node"]: n for n in json.loads(body)["by_node"]}
    assert set(nodes) == set(expected)
    for path in expected:
        nested = [c for p, cs in expected.items() if p == path or p.startswith(path + "/")
                  for c in cs]  # fmt: skip
        for k in TOKENS:
            assert nodes[path][k] == sums(expected[path])[k], (path, k)
            assert nodes[path]["cumulative"][k] == sums(nested)[k], (path, k)
        assert nodes[path]["requests"] == len(expected[path])
        assert nodes[path]["cumulative"]["requests"] == len(nested)


def test_usage_tracker_reads_sdk_objects_and_errors(
    service: ServiceProcess, llm: FakeLLM, tmp_path: Path
) -> None:
    client = openai.OpenAI(base_url=llm.openai_url, api_key="k", max_retries=0)
    with SyncUsageClient(service.url, flush_interval=0.05) as usage:
        tracker = UsageTracker(usage)
        request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        rid = tracker.log_request("gpt-4o", request, user="carol")
        response = client.chat.completions.create(**request)  # type: ignore[call-overload]
        report = tracker.log_response(rid, response)
        assert report["request_id"] == rid and report["user"] == "carol"
        rid2 = tracker.log_request("boom", {"model": "boom"}, user="carol")
        try:
            client.chat.completions.create(model="boom", messages=[])
        except openai.InternalServerError as exc:
            tracker.log_response(rid2, error=exc, response_time=0.25)
        # an explicit usage dict, e.g. from a provider the SDK does not know
        rid3 = tracker.log_request("llama-3", user="carol")
        tracker.log_response(rid3, usage={"prompt_tokens": 11, "completion_tokens": 4})
    rows = {r["request_id"]: r for r in stored_rows(tmp_path / "data", 3)}
    first = llm.calls[0]
    assert int(rows[rid]["input_tokens"]) == first.input_tokens
    assert int(rows[rid]["cached_input_tokens"]) == first.cached_input_tokens
    assert rows[rid2]["status"] == "error" and float(rows[rid2]["duration_ms"]) == 250.0
    assert (int(rows[rid3]["input_tokens"]), int(rows[rid3]["output_tokens"])) == (11, 4)


async def test_spool_delivers_reports_made_while_the_service_was_down(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    first = UsageClient(url, spool_dir=spool, flush_interval=0.05, close_timeout=0.5)
    ids = [first.report("gpt-4o", input_tokens=i + 1, output_tokens=1) for i in range(120)]
    await first.close()  # nobody listens: everything stays in the spool
    assert first.stats.accepted == 0 and first.stats.undelivered == 0
    assert list(spool.glob("*.ndjson"))

    svc = start_service(
        ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        tmp_path / "service.log",
        port=port,
        env={"LLM_USAGE_FLUSH_INTERVAL": "0.2"},
    )
    try:
        second = UsageClient(url, spool_dir=spool, flush_interval=0.05)
        await second.flush()
        await second.close()
        rows = stored_rows(tmp_path / "data", len(ids))
    finally:
        svc.stop()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert sum(int(r["input_tokens"]) for r in rows) == sum(range(1, 121))
    assert not list(spool.glob("*.ndjson"))


async def test_full_queue_drops_oldest_and_counts_it(tmp_path: Path) -> None:
    client = UsageClient(
        f"http://127.0.0.1:{free_port()}",
        batch_size=5,
        max_queue=10,
        close_timeout=0.1,
        flush_interval=60,
    )
    for i in range(25):
        client.report("m", input_tokens=i)
    await asyncio.sleep(0)  # the sender may take one batch before the rest arrive
    assert client.stats.reported == 25
    assert client.stats.dropped >= 10
    await client.close()
    assert client.stats.dropped + client.stats.undelivered + client.stats.accepted == 25


def test_node_contexts_nest_and_follow_an_active_opentelemetry_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        with node("plan") as plan:
            assert plan.trace_id == format(ctx.trace_id, "032x")
            assert plan.parent_span_id == format(ctx.span_id, "016x")
            with node("tool") as tool:
                assert tool.node == "plan/tool" and tool.parent_span_id == plan.span_id
    assert current_frame() is None
    with pytest.raises(ValueError):
        node("a/b")


async def test_delivery_through_backpressure_and_a_restart_loses_and_doubles_nothing(
    pg_cluster: Any, pg_url: str, tmp_path: Path
) -> None:
    """Postgres down -> the WAL fills -> 503 + Retry-After; the service restarts mid-backlog;
    the SDK keeps every report and the database ends equal to the distinct set."""
    port = free_port()
    env = {
        "LLM_USAGE_DATABASE_URL": pg_url,
        "LLM_USAGE_FLUSH_INTERVAL": "0.2",
        "LLM_USAGE_WAL_MAX_BYTES": "131072",
        "LLM_USAGE_WAL_SEGMENT_BYTES": "16384",
    }
    args = ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    svc = start_service(args, tmp_path / "service1.log", port=port, env=env)
    usage = UsageClient(svc.url, batch_size=50, flush_interval=0.02, max_backoff=0.3)
    ids: list[str] = []
    pg_down = False

    async def send(n: int) -> None:
        for i in range(n):
            ids.append(
                usage.report("gpt-4o", user=f"u{i % 7}", input_tokens=len(ids) + 1, output_tokens=2)
            )
            if i % 50 == 0:
                await asyncio.sleep(0.01)

    try:
        await send(300)
        await usage.flush()
        pg_cluster.stop()
        pg_down = True
        deadline = time.monotonic() + 30
        while usage.stats.retries == 0 and time.monotonic() < deadline:
            await send(100)  # fills the WAL until the service pushes back
            await asyncio.sleep(0.02)
        assert usage.stats.retries > 0, "the service never pushed back"
        svc_log = svc.logs()
        svc.stop()  # restart while the backlog sits in its WAL
        await send(200)
        svc = start_service(args, tmp_path / "service2.log", port=port, env=env)
        await send(200)
        pg_cluster.start()
        pg_down = False
        await usage.flush()
        await usage.close()
        rows, requests = await _stored_in_postgres(pg_url, len(ids))
    finally:
        if svc.proc.poll() is None:
            svc.stop()
        if pg_down:
            pg_cluster.start()
    assert "503" in svc_log or usage.stats.retries
    assert usage.stats.dropped == usage.stats.undelivered == usage.stats.rejected == 0
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert sum(r["input_tokens"] for r in rows) == sum(range(1, len(ids) + 1))
    assert requests == len(ids)


async def _stored_in_postgres(url: str, expected: int) -> tuple[list[Any], int]:
    """(request_id, input_tokens) of every detail row once `expected` are there, and the sum of
    hourly rollup requests, read with asyncpg directly."""
    import asyncpg

    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        deadline = time.monotonic() + 30
        rows: list[Any] = []
        while time.monotonic() < deadline:
            rows = await conn.fetch("SELECT request_id, input_tokens FROM usage_details")
            if len(rows) >= expected:
                break
            await asyncio.sleep(0.1)
        requests = await conn.fetchval(
            "SELECT sum(requests) FROM usage_rollups WHERE granularity = 'hour'"
        )
    finally:
        await conn.close()
    return list(rows), int(requests or 0)
