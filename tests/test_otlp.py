"""POST /v1/traces with the real OpenTelemetry SDK and OTLP/HTTP exporter on a real loopback
port: GenAI usage spans are counted exactly once, other spans are ignored, OTLP JSON works,
garbage is a 400 (never a 5xx), auth applies."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from google.protobuf import json_format
from helpers import (
    INGEST_TOKEN,
    READ_TOKEN,
    bearer,
    scrape,
    total,
    value,
)
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from exporter.ingest.otlp import usage_items
from exporter.ingest.otlp_decode import parse_protobuf

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}


def endpoint(client: TestClient[Any, Any]) -> str:
    return f"http://127.0.0.1:{client.server.port}/v1/traces"


def chat_attrs(model: str, inp: int, out: int, **extra: Any) -> dict[str, Any]:
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": model,
        "gen_ai.provider.name": "openai",
        "gen_ai.usage.input_tokens": inp,
        "gen_ai.usage.output_tokens": out,
        **extra,
    }


def emit_spans(exporter: SpanExporter) -> list[ReadableSpan]:
    """Runs in a thread (the SDK exporter is blocking); returns the finished spans.

    A root chat span (100/20, with a response id) holding a nested chat span (30/5, no response
    id), a tool span without usage, and an error span (7/0, error.type=timeout)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "support-bot"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test_otlp")
    root_attrs = chat_attrs("gpt-4o", 100, 20, **{"gen_ai.response.id": "chatcmpl-root"})
    with tracer.start_as_current_span("chat gpt-4o", attributes=root_attrs):
        child_attrs = chat_attrs("gpt-4o-mini", 30, 5, **{"user.id": "alice"})
        with tracer.start_as_current_span("chat gpt-4o-mini", attributes=child_attrs):
            pass
        with tracer.start_as_current_span("execute_tool lookup") as tool:
            tool.set_attribute("gen_ai.operation.name", "execute_tool")
            tool.set_attribute("gen_ai.tool.name", "lookup")
    with tracer.start_as_current_span(
        "chat gpt-4o",
        attributes=chat_attrs("gpt-4o", 7, 0, **{"error.type": "timeout"}),
    ) as failing:
        failing.set_status(Status(StatusCode.ERROR, "upstream timed out"))
    provider.shutdown()
    return list(memory.get_finished_spans())


async def assert_sdk_spans_counted(client: TestClient[Any, Any]) -> None:
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 3  # the tool span carries no usage
    assert total(m, "llm_input_tokens_total") == 137
    assert total(m, "llm_output_tokens_total") == 25
    assert value(m, "llm_input_tokens_total", model="gpt-4o", operation="chat", user="") == 107
    assert value(m, "llm_output_tokens_total", model="gpt-4o", operation="chat", user="") == 20
    assert (
        value(m, "llm_input_tokens_total", model="gpt-4o-mini", operation="chat", user="alice")
        == 30
    )
    assert total(m, "llm_request_errors_total") == 1
    assert value(m, "llm_request_errors_total", model="gpt-4o", operation="chat", user="") == 1


async def test_sdk_export_counts_exactly_the_usage_spans_once(make_client: MakeClient) -> None:
    client = await make_client()
    exporter = OTLPSpanExporter(endpoint=endpoint(client), timeout=10)
    spans = await asyncio.to_thread(emit_spans, exporter)
    assert len(spans) == 4
    await assert_sdk_spans_counted(client)

    # the SDK retrying the same export (or a collector re-sending it) is counted once
    again = OTLPSpanExporter(endpoint=endpoint(client), timeout=10)
    assert await asyncio.to_thread(again.export, spans) is SpanExportResult.SUCCESS
    gzipped = OTLPSpanExporter(endpoint=endpoint(client), timeout=10, compression=Compression.Gzip)
    assert await asyncio.to_thread(gzipped.export, spans) is SpanExportResult.SUCCESS
    await assert_sdk_spans_counted(client)
    m = await scrape(client)
    assert value(m, "llm_usage_reports_duplicate_total") == 6
    assert value(m, "llm_usage_reports_received_total") == 3


def test_span_fields_become_report_fields() -> None:
    spans = emit_spans(InMemorySpanExporter())
    request = encode_spans(spans)
    items, errors, _names = usage_items(parse_protobuf(request.SerializeToString()))
    assert errors == {}
    assert len(items) == 3
    by_model = {(i["model"], i["input_tokens"]): i for i in items}
    root, child, failing = (
        by_model["gpt-4o", 100],
        by_model["gpt-4o-mini", 30],
        by_model["gpt-4o", 7],
    )
    span = {s.name + str(s.attributes.get("gen_ai.usage.input_tokens")): s for s in spans}
    root_span, child_span = span["chat gpt-4o100"], span["chat gpt-4o-mini30"]
    trace_hex = f"{root_span.context.trace_id:032x}"

    assert root["request_id"] == "chatcmpl-root"  # gen_ai.response.id is the request id
    assert root["trace_id"] == trace_hex
    assert "parent_id" not in root
    assert root["node"] == "support-bot"  # resource service.name
    assert child["request_id"] == f"{trace_hex}-{child_span.context.span_id:016x}"
    assert child["parent_id"] == f"{root_span.context.span_id:016x}"
    assert child["user"] == "alice"
    assert child["started_at"] == datetime.fromtimestamp(child_span.start_time // 1000 / 1e6, UTC)
    assert child["duration_ms"] == (child_span.end_time - child_span.start_time) / 1e6
    assert failing["status"] == "error"
    assert failing["error_type"] == "timeout"
    assert "status" not in root and "status" not in child


# -- OTLP JSON --------------------------------------------------------------------------------

TRACE = "5b8efff798038103d269b633813fc60c"


def json_span(span_id: str, parent: str = "", **attrs: Any) -> dict[str, Any]:
    def any_value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}  # int64 is a string in proto3 JSON
        if isinstance(v, float):
            return {"doubleValue": v}
        if isinstance(v, list):
            return {"arrayValue": {"values": [any_value(x) for x in v]}}
        return {"stringValue": v}

    span: dict[str, Any] = {
        "traceId": TRACE,
        "spanId": span_id,
        "name": "chat",
        "kind": 3,
        "startTimeUnixNano": "1735689600000000000",  # 2025-01-01T00:00:00Z
        "endTimeUnixNano": "1735689601500000000",
        "attributes": [{"key": k, "value": any_value(v)} for k, v in attrs.items()],
        "status": {},
    }
    if parent:
        span["parentSpanId"] = parent
    return span


def json_body(spans: Sequence[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [
                            {"key": "service.name", "value": {"stringValue": "json-svc"}}
                        ]
                    },
                    "scopeSpans": [{"scope": {"name": "manual"}, "spans": list(spans)}],
                    "schemaUrl": "https://opentelemetry.io/schemas/1.30.0",
                }
            ]
        }
    )


JSON_SPANS = [
    json_span(
        "eee19b7ec3c1b174",
        **chat_attrs("claude-sonnet-4", 1000, 200, **{"gen_ai.response.id": "msg_01"}),
        **{"gen_ai.response.finish_reasons": ["stop"], "gen_ai.request.temperature": 0.5},
    ),
    json_span(
        "eee19b7ec3c1b175",
        "eee19b7ec3c1b174",
        **chat_attrs("claude-sonnet-4", 10, 2, **{"enduser.id": "bob"}),
    ),
    json_span("eee19b7ec3c1b176", **{"gen_ai.operation.name": "execute_tool"}),
]


async def test_otlp_json_is_counted_once(make_client: MakeClient) -> None:
    client = await make_client()
    body = json_body(JSON_SPANS)
    for data, headers in (
        (body, JSON),
        (gzip.compress(body), {**JSON, "Content-Encoding": "gzip"}),
    ):
        resp = await client.post("/v1/traces", data=data, headers=headers)
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        assert await resp.json() == {}  # full success: no partialSuccess
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 2
    assert (
        value(m, "llm_input_tokens_total", model="claude-sonnet-4", operation="chat", user="")
        == 1000
    )
    assert (
        value(m, "llm_output_tokens_total", model="claude-sonnet-4", operation="chat", user="bob")
        == 2
    )
    assert value(m, "llm_usage_reports_duplicate_total") == 2
    assert total(m, "llm_request_duration_seconds_count") == 2


async def test_invalid_usage_spans_are_a_partial_success(make_client: MakeClient) -> None:
    client = await make_client()
    spans = [
        json_span("aaaaaaaaaaaaaaa1", **chat_attrs("gpt-4o", 5, 1)),
        json_span("aaaaaaaaaaaaaaa2", **chat_attrs("gpt-4o", -5, 1)),  # negative tokens
        json_span("aaaaaaaaaaaaaaa3", **{"gen_ai.usage.input_tokens": 3}),  # no model
    ]
    resp = await client.post("/v1/traces", data=json_body(spans), headers=JSON)
    assert resp.status == 200
    partial = (await resp.json())["partialSuccess"]
    assert int(partial["rejectedSpans"]) == 2
    assert "input_tokens" in partial["errorMessage"]

    # the same in protobuf: the answer is a protobuf ExportTraceServiceResponse
    request = ExportTraceServiceRequest()
    doc = orjson.loads(json_body(spans))
    for span in doc["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        span["spanId"] = span["spanId"].replace("a", "b")
        for k in ("traceId", "spanId"):
            span[k] = base64.b64encode(bytes.fromhex(span[k])).decode()
    json_format.ParseDict(doc, request)
    resp = await client.post("/v1/traces", data=request.SerializeToString(), headers=PROTOBUF)
    assert resp.status == 200
    assert resp.content_type == "application/x-protobuf"
    answer = ExportTraceServiceResponse.FromString(await resp.read())
    assert answer.partial_success.rejected_spans == 2
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 2
    assert value(m, "llm_usage_reports_rejected_total", reason="invalid") == 4


# -- hostile and wrong requests ---------------------------------------------------------------


async def test_garbage_is_400_never_5xx(make_client: MakeClient) -> None:
    client = await make_client()
    rng = random.Random(1234)
    statuses = []
    bodies = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"not protobuf at all \x00\x01"]
    bodies += [rng.randbytes(rng.randrange(1, 300)) for _ in range(200)]
    bodies += [os.urandom(64)]
    for body in bodies:
        resp = await client.post("/v1/traces", data=body, headers=PROTOBUF)
        statuses.append(resp.status)
        if resp.status != 200:
            assert resp.status == 400, (resp.status, body)
            assert resp.content_type == "application/x-protobuf"
            await resp.read()
    assert all(s in (200, 400) for s in statuses)
    assert statuses[:3] == [400, 400, 400]

    cases: list[tuple[bytes, dict[str, str], int]] = [
        (b"{not json", JSON, 400),
        (b"[1, 2]", JSON, 400),
        (b'{"resourceSpans": 5}', JSON, 400),
        # a malformed span is refused by name in partial_success, the export is not
        (json_body([{**JSON_SPANS[0], "spanId": "zz"}]), JSON, 200),
        (json_body([{**JSON_SPANS[0], "startTimeUnixNano": "soon"}]), JSON, 200),
        (gzip.compress(json_body(JSON_SPANS))[:-8], {**JSON, "Content-Encoding": "gzip"}, 400),
        (json_body(JSON_SPANS), {"Content-Type": "text/plain"}, 415),
        (json_body(JSON_SPANS), {"Content-Type": "application/grpc"}, 415),
        (b"", PROTOBUF, 200),  # an empty ExportTraceServiceRequest is valid
        (b"{}", JSON, 200),
    ]
    for body, headers, expected in cases:
        resp = await client.post("/v1/traces", data=body, headers=headers)
        assert resp.status == expected, (body[:60], headers, await resp.text())
        if expected == 200 and body not in (b"", b"{}"):
            answer = await resp.json()
            assert answer["partialSuccess"]["rejectedSpans"] == "1"
            assert "'chat'" in answer["partialSuccess"]["errorMessage"]
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 0
    assert value(m, "llm_usage_reports_rejected_total", reason="unsupported_media_type") == 2


async def test_full_wal_answers_503_with_retry_after(make_client: MakeClient) -> None:
    client = await make_client(wal_max_bytes=1024)
    spans = [json_span(f"{i:016x}", **chat_attrs("gpt-4o", 1, 1)) for i in range(1, 30)]
    resp = await client.post("/v1/traces", data=json_body(spans), headers=JSON)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 0


async def test_ingest_token_required(make_client: MakeClient) -> None:
    client = await make_client(with_tokens=True)
    body = json_body(JSON_SPANS)
    resp = await client.post("/v1/traces", data=body, headers=JSON)
    assert resp.status == 401
    resp = await client.post("/v1/traces", data=body, headers={**JSON, **bearer(READ_TOKEN)})
    assert resp.status == 403

    anonymous = OTLPSpanExporter(endpoint=endpoint(client), timeout=10)
    await asyncio.to_thread(emit_spans, anonymous)
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 0
    assert value(m, "llm_usage_reports_rejected_total", reason="unauthorized") >= 5

    authorized = OTLPSpanExporter(
        endpoint=endpoint(client), timeout=10, headers=bearer(INGEST_TOKEN)
    )
    await asyncio.to_thread(emit_spans, authorized)
    await assert_sdk_spans_counted(client)


async def test_usage_spans_per_export_are_capped(make_client: MakeClient) -> None:
    """max_batch_items bounds an export like a /v1/usage batch: 413, nothing counted."""
    client = await make_client(max_batch_items=1)
    resp = await client.post("/v1/traces", data=json_body(JSON_SPANS), headers=JSON)
    assert resp.status == 413
    assert "exceed 1" in (await resp.json())["message"]
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 0
    assert value(m, "llm_usage_reports_rejected_total", reason="batch_too_large") == 1
