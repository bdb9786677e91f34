"""Every GenAI span spelling in the wild, through POST /v1/traces: the real Vercel AI SDK's
export (captured, tests/payloads/vercel-ai-6.0.326-otlp.json), OpenLIT's attribute names
(openlit 1.45.0's semcov module; the package pins openai<3 and pulls boto3, too heavy here),
pre-1.0 OpenLLMetry names, LiteLLM's operation names; id-less spans, NUL ids, configurable
user attributes, and the answer to OTLP metrics."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from clientcheck import Expected, assert_metrics, assert_stored, from_call, stored_rows
from helpers import scrape

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
VERCEL = Path(__file__).parent / "payloads" / "vercel-ai-6.0.326-otlp.json"
JSON = {"Content-Type": "application/json"}
_ids = itertools.count(1)


def any_value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": v}


def span(attrs: Mapping[str, Any], *, ids: bool = True, error: bool = False,
         parent: str = "", start: int = 1_767_225_600_000_000_000) -> dict[str, Any]:  # fmt: skip
    n = next(_ids)
    out: dict[str, Any] = {
        "name": f"chat {attrs.get('gen_ai.request.model', '')}",
        "startTimeUnixNano": str(start + n * 1_000_000),
        "endTimeUnixNano": str(start + n * 1_000_000 + 900_000_000),
        "attributes": [{"key": k, "value": any_value(v)} for k, v in attrs.items()],
        "status": {"code": 2, "message": "boom"} if error else {},
    }
    if ids:
        out["traceId"] = f"{n:032x}"
        out["spanId"] = f"{n:016x}"
    if parent:
        out["parentSpanId"] = parent
    return out


def body(spans: list[dict[str, Any]], resource: Mapping[str, Any] | None = None) -> bytes:
    attrs = [{"key": k, "value": any_value(v)} for k, v in (resource or {}).items()]
    return orjson.dumps({"resourceSpans": [{"resource": {"attributes": attrs},
                                            "scopeSpans": [{"spans": spans}]}]})  # fmt: skip


async def send(client: TestClient[Any, Any], data: bytes) -> dict[str, Any]:
    resp = await client.post("/v1/traces", data=data, headers=JSON)
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def test_vercel_ai_sdk_export_counts_provider_calls_once(make_client: MakeClient) -> None:
    capture = orjson.loads(VERCEL.read_bytes())
    client = await make_client()
    for export in capture["exports"]:
        for _ in range(2):  # a re-export changes nothing
            assert await send(client, orjson.dumps(export)) == {}
    calls = capture["calls"]
    providers = {"chat": "openai", "anthropic": "anthropic", "embedding": "openai"}
    users = {"gpt-4o-mini": "alice", "claude-sonnet-4-5": "bob",
             "text-embedding-3-small": "carol", "gpt-4o-broken": "alice"}  # fmt: skip
    expected = [from_call(c, providers[c["kind"]], users[c["model"]]) for c in calls]
    # the outer ai.generateText / ai.streamText / ai.embed spans repeat their children: not counted
    assert_metrics(await scrape(client), expected)
    rows = await stored_rows(client)
    assert_stored(rows, expected)
    assert {r["operation"] for r in rows} == {"chat", "embedding"}
    assert {r["source"] for r in rows} == {"otel"}
    assert all(r["tags"] == {"feature": "faq"} for r in rows)  # ai.telemetry.metadata.*


def openlit_anthropic(uncached: int, read: int, write: int, out: int, user: str) -> dict[str, Any]:
    """OpenLIT's Anthropic spans before it added the cache to input (Anthropic semantics)."""
    return {
        "gen_ai.system": "anthropic",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.request.user": user,
        "gen_ai.usage.input_tokens": uncached,
        "gen_ai.usage.cache_read.input_tokens": read,
        "gen_ai.usage.cache_creation.input_tokens": write,
        "gen_ai.usage.output_tokens": out,
        "gen_ai.usage.cost": 0.5,  # OpenLIT's own estimate: not ours
        "gen_ai.client.token.usage": uncached + out,
    }


async def test_openlit_and_pre_1_0_spellings(make_client: MakeClient) -> None:
    client = await make_client()
    spans = [span(openlit_anthropic(40, 2048, 512, 120, "alice"))]
    # pre-1.0 OpenLLMetry: prompt/completion tokens, llm.* and traceloop association properties
    old = [
        span({"gen_ai.system": "openai", "llm.request.type": "chat",
              "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.prompt_tokens": 100 + i,
              "gen_ai.usage.completion_tokens": 10 + i, "llm.usage.total_tokens": 110 + 2 * i,
              "traceloop.association.properties.user_id": "bob",
              "traceloop.association.properties.project": "faq"})
        for i in range(8)
    ]  # fmt: skip
    # LiteLLM's OTel spans name operations after its call types
    litellm = [
        span({"gen_ai.system": "openai", "gen_ai.operation.name": "acompletion",
              "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 500,
              "gen_ai.usage.output_tokens": 50, "llm.user": "carol"}),
        span({"gen_ai.system": "openai", "gen_ai.operation.name": "aembedding",
              "gen_ai.request.model": "text-embedding-3-small",
              "gen_ai.usage.input_tokens": 800, "llm.user": "carol"}),
    ]  # fmt: skip
    assert await send(client, body(spans + old + litellm)) == {}
    expected = [
        Expected("claude-sonnet-4-5", "anthropic", 40 + 2048 + 512, 120, 2048, 512, user="alice"),
        *[Expected("gpt-4o-mini", "openai", 100 + i, 10 + i, user="bob") for i in range(8)],
        Expected("gpt-4o", "openai", 500, 50, user="carol"),
        Expected("text-embedding-3-small", "openai", 800, 0, user="carol"),
    ]
    assert_metrics(await scrape(client), expected)
    rows = await stored_rows(client)
    assert_stored(rows, expected)
    ops = {r["model"]: r["operation"] for r in rows}
    assert ops == {"claude-sonnet-4-5": "chat", "gpt-4o-mini": "chat", "gpt-4o": "chat",
                   "text-embedding-3-small": "embedding"}  # fmt: skip


async def test_spans_without_ids_are_never_merged(make_client: MakeClient) -> None:
    client = await make_client()
    spans = [span({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 10 * (i + 1),
                   "gen_ai.usage.output_tokens": 1}, ids=False) for i in range(3)]  # fmt: skip
    same_content = dict(spans[0])
    spans.append({**same_content, "startTimeUnixNano": "1767225601000000001"})
    assert await send(client, body(spans)) == {}
    assert await send(client, body(spans)) == {}  # a re-export: the content ids are stable
    expected = [Expected("gpt-4o", "openai", t, 1) for t in (10, 20, 30, 10)]
    assert_metrics(await scrape(client), expected)
    rows = await stored_rows(client)
    assert_stored(rows, expected)
    assert len({r["request_id"] for r in rows}) == 4


async def test_unusable_spans_are_named_and_identities_must_store_identically(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    good = span({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5,
                 "user.id": "alice"})  # fmt: skip
    nul = span({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7,
                "user.id": "al\x00ice"})  # fmt: skip
    nul["name"] = "nul user"
    answer = await send(client, body([good, nul]))
    partial = answer["partialSuccess"]
    assert partial["rejectedSpans"] == "1"
    assert "'nul user'" in partial["errorMessage"] and "NUL" in partial["errorMessage"]
    # the same rule on /v1/usage: a clear 422, and two ids that differ only by NUL vs U+FFFD
    # cannot both be answered accepted
    resp = await client.post("/v1/usage", json=[
        {"model": "gpt-4o", "request_id": "r\x00", "input_tokens": 1},
        {"model": "gpt-4o", "request_id": "r\ufffd", "input_tokens": 1},
    ])  # fmt: skip
    result = await resp.json()
    assert resp.status == 202 and result["accepted"] == 1
    assert "request_id" in result["errors"][0]["error"] and "NUL" in result["errors"][0]["error"]
    rows = await stored_rows(client)  # the database holds exactly what was answered accepted
    assert sorted((r["user"], r["input_tokens"]) for r in rows) == [("", 1), ("alice", 5)]
    assert "r\ufffd" in {r["request_id"] for r in rows}


async def test_user_from_configured_attribute_or_resource(make_client: MakeClient) -> None:
    client = await make_client(otel_user_attributes=["app.customer", "user.id"])
    spans = [
        span({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 3,
              "app.customer": "acme", "user.id": "ignored"}),
        span({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 4}),
    ]  # fmt: skip
    assert await send(client, body(spans, {"service.name": "svc", "user.id": "team-bot"})) == {}
    rows = await stored_rows(client)
    assert sorted(r["user"] for r in rows) == ["acme", "team-bot"]


async def test_otlp_metrics_are_answered_with_what_to_send(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.post("/v1/metrics", data=b"{}", headers=JSON)
    assert resp.status == 404
    assert "/v1/traces" in (await resp.json())["message"]


async def test_free_form_metadata_is_bounded_into_tags_not_refused(make_client: MakeClient) -> None:
    client = await make_client()
    metadata = {f"ai.telemetry.metadata.key {i:02d}": "v" * 300 for i in range(30)}
    attrs = {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 9, **metadata}
    assert await send(client, body([span(attrs)])) == {}
    (row,) = await stored_rows(client)
    assert row["input_tokens"] == 9
    assert sorted(row["tags"]) == [f"key_{i:02d}" for i in range(16)]
    assert {len(v) for v in row["tags"].values()} == {256}
