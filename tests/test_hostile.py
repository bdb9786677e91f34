"""Malformed and hostile input: always a 4xx with a JSON error that says what is wrong,
never a 5xx, never counted, and the service keeps serving afterwards."""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import make_settings, parse_metrics, report, total, value

from exporter.app import create_app

JSON = "application/json"


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    content_type: str = JSON
    encoding: str = ""
    #: expected status; None → any 4xx
    status: int | None = None
    #: text the error message must contain (case-insensitive), to show it is clear
    mention: str = ""


def js(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()  # stdlib: big ints stay ints


def item(**fields: Any) -> bytes:
    return js({"model": "m", **fields})


_GZ = gzip.compress(js([report(request_id=f"g{i}") for i in range(50)]))

CASES = [
    # wrong types
    Case("model as number", js({"model": 5}), status=422, mention="model"),
    Case("tokens as text", item(input_tokens="10"), status=422, mention="input_tokens"),
    Case("user as list", item(user=["a"]), status=422, mention="user"),
    Case("stream as text", item(stream="yes"), status=422, mention="stream"),
    Case("usage as text", item(usage="lots"), status=422, mention="usage"),
    Case(
        "usage field as object",
        item(usage={"prompt_tokens": {"a": 1}}),
        status=422,
        mention="input_tokens",
    ),
    Case(
        "details as list",
        item(usage={"prompt_tokens": 1, "prompt_tokens_details": [1]}),
        status=422,
        mention="prompt_tokens_details",
    ),
    Case("status unknown", item(status="exploded"), status=422, mention="status"),
    Case("status as number", item(status=5), status=422, mention="status"),
    Case("operation as number", item(operation=5), status=422, mention="operation"),
    Case("operation null", item(operation=None), status=422, mention="operation"),
    Case("request_id empty", item(request_id=""), status=422, mention="request_id"),
    Case("request_id number", item(request_id=5), status=422, mention="request_id"),
    Case("timestamp text", item(started_at="yesterday"), status=422, mention="started_at"),
    Case("timestamp negative", item(completed_at=-1), status=422, mention="completed_at"),
    Case("timestamp huge", item(completed_at=10**15), status=422, mention="completed_at"),
    Case("timestamp bool", item(completed_at=True), status=422, mention="completed_at"),
    Case(
        "timestamp before year 1 in UTC",
        item(started_at="0001-01-01T00:00:00+14:00"),
        status=422,
        mention="started_at",
    ),
    Case(
        "timestamp after 9999 in UTC",
        item(completed_at="9999-12-31T23:59:59-14:00"),
        status=422,
        mention="completed_at",
    ),
    # huge numbers
    Case("10**30 tokens", item(input_tokens=10**30), status=422, mention="input_tokens"),
    Case("2**64 tokens", b'{"model":"m","input_tokens":18446744073709551616}', status=422),
    Case("past MAX_TOKENS", item(output_tokens=10**13), status=422, mention="output_tokens"),
    Case("huge cost", item(cost_usd=1e308), status=422, mention="cost_usd"),
    Case(
        "huge anthropic parts",
        js(
            {
                "model": "claude-x",
                "usage": {"input_tokens": 10**12, "cache_read_input_tokens": 10**12},
            }
        ),
        status=422,
        mention="input_tokens",
    ),
    Case(
        "huge stream estimate",
        item(stream=True, completed=False, request_content_bytes=10**13),
        status=422,
        mention="request_content_bytes",
    ),
    # negative tokens
    Case("negative input", item(input_tokens=-1), status=422, mention="input_tokens"),
    Case(
        "negative openai completion",
        item(usage={"prompt_tokens": 3, "completion_tokens": -5}),
        status=422,
        mention="output_tokens",
    ),
    Case(
        "negative anthropic cache read",
        js({"model": "claude-x", "usage": {"input_tokens": 10, "cache_read_input_tokens": -1}}),
        status=422,
        mention="cached_input_tokens",
    ),
    Case(
        "negative gpustack",
        js({"model": "m", "input_token": -3, "output_token": 1}),
        status=422,
        mention="input_tokens",
    ),
    Case("negative duration", item(duration_ms=-1), status=422, mention="duration_ms"),
    # floats and booleans for ints
    Case("float tokens", item(input_tokens=10.0), status=422, mention="input_tokens"),
    Case("fractional tokens", item(input_tokens=10.5), status=422, mention="input_tokens"),
    Case("exponent tokens", b'{"model":"m","input_tokens":1e3}', status=422),
    Case("bool tokens", item(input_tokens=True), status=422, mention="input_tokens"),
    Case(
        "bool openai tokens",
        item(usage={"prompt_tokens": True, "completion_tokens": 1}),
        status=422,
        mention="input_tokens",
    ),
    Case(
        "bool anthropic tokens",
        js({"model": "claude-x", "usage": {"input_tokens": True, "cache_read_input_tokens": 1}}),
        status=422,
        mention="input_tokens",
    ),
    # NaN / Infinity (not JSON)
    Case("NaN", b'{"model":"m","input_tokens":NaN}', status=400, mention="JSON"),
    Case("Infinity", b'{"model":"m","input_tokens":Infinity}', status=400, mention="JSON"),
    Case("-Infinity", b'{"model":"m","output_tokens":-Infinity}', status=400, mention="JSON"),
    Case("1e400", b'{"model":"m","input_tokens":1e400}', status=400, mention="JSON"),
    Case("NaN cost", b'{"model":"m","cost_usd":NaN}', status=400, mention="JSON"),
    # structure
    Case("deep arrays", b"[" * 100_000, status=400, mention="JSON"),
    Case("deep objects", b'{"a":' * 100_000, status=400, mention="JSON"),
    Case("deep valid nesting", b"[" * 500 + b"]" * 500, status=422),
    Case("deep in a field", item(usage={"prompt_tokens": [[[[[[1]]]]]]}), status=422),
    Case("empty body", b"", status=400, mention="empty"),
    Case("whitespace body", b" \n\t ", status=400, mention="empty"),
    Case("null", b"null", status=400),
    Case("string body", b'"hello"', status=400),
    Case("number body", b"42", status=400),
    Case("bool body", b"true", status=400),
    Case("array of numbers", b"[1, 2, 3]", status=422, mention="object"),
    Case("array of nulls", b"[null]", status=422, mention="object"),
    Case("nested arrays", js([[report()]]), status=422, mention="object"),
    Case("empty array", b"[]", status=400, mention="empty"),
    Case("empty object", b"{}", status=422, mention="model"),
    Case("trailing garbage", item() + b"garbage", status=400, mention="JSON"),
    Case("two objects no newline", item() + item(), status=400, mention="JSON"),
    # encodings
    Case("invalid utf-8", b'{"model":"\xff\xfe","input_tokens":1}', status=400),
    Case("lone surrogate", b'{"model":"\\ud800","input_tokens":1}', status=400),
    Case("utf-16 body", '{"model":"m"}'.encode("utf-16"), status=400),
    Case("truncated gzip", _GZ[: len(_GZ) // 2], encoding="gzip", status=400),
    Case("gzip garbage", b"\x1f\x8b\x08\x00" + b"not deflate" * 10, encoding="gzip", status=400),
    Case("gzip header says gzip, body plain garbage", b"\x00\x01\x02", encoding="gzip"),
    Case("unknown encoding", item(), encoding="compress", status=415, mention="Content-Encoding"),
    # sizes
    Case("10 MB body", b"[" + b" " * (10 * 1024 * 1024) + b"]", status=413),
    Case("10 MB string", item(user="u" * (10 * 1024 * 1024)), status=413),
    Case(
        "NDJSON past the item limit",
        b"\n".join([item()] * 10_001),
        content_type="application/x-ndjson",
        status=413,
    ),
    # content types
    Case("xml", b"<usage/>", content_type="text/xml", status=415, mention="Content-Type"),
    Case("octet-stream", item(), content_type="application/octet-stream", status=415),
    Case("multipart", item(), content_type="multipart/form-data; boundary=x", status=415),
    # unknown fields and shapes
    Case("unknown field", item(colour="blue"), status=422, mention="colour"),
    # provider shapes ignore body fields providers add, never a usage number of the wrong type
    Case(
        "openai usage number as text",
        item(usage={"prompt_tokens": "1"}, colour=1),
        status=422,
        mention="input_tokens",
    ),
    Case(
        "gpustack token count as text",
        js({"model": "m", "input_token": "1", "colour": 1}),
        status=422,
        mention="input_tokens",
    ),
    Case(
        "otel token count not a number",
        js({"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": "x", "colour": 1}),
        status=422,
        mention="input_tokens",
    ),
    Case(
        "gpustack request_count 0",
        js({"model": "m", "input_token": 1, "request_count": 0}),
        status=422,
        mention="request_count",
    ),
    Case(
        "gpustack empty access key",
        js({"model": "m", "input_token": 1, "access_key": ""}),
        status=422,
        mention="access_key",
    ),
    Case(
        "many unknown keys", js({"model": "m", **{f"k{i}": i for i in range(50_000)}}), status=422
    ),
    Case(
        "many unknown usage keys beside a bad number",
        js({"model": "m", "usage": {"prompt_tokens": "x", **{f"k{i}": i for i in range(50_000)}}}),
        status=422,
    ),
    Case("one enormous key", js({"model": "m", "k" * 1_000_000: 1}), status=422),
    Case(
        "one enormous key beside a bad number in a gpustack body",
        js({"model": "m", "input_token": -1, "k" * 1_000_000: 1}),
        status=422,
    ),
    Case("total mismatch", item(input_tokens=1, output_tokens=1, total_tokens=3), mention="total"),
    Case("ndjson all bad lines", b"{bad\n[1\n", content_type="application/x-ndjson", status=422),
    Case(
        "ndjson invalid utf-8 line",
        b'{"model":"\xff"}\n',
        content_type="application/x-ndjson",
        status=422,
    ),
]


def error_messages(body: Any) -> list[str]:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return [body["error"]]
    assert isinstance(body, dict) and body.get("errors"), body
    messages = []
    for err in body["errors"]:
        assert isinstance(err["index"], int)
        assert isinstance(err["error"], str) and err["error"]
        messages.append(err["error"])
    return messages


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    return await aiohttp_client(create_app(make_settings(tmp_path)))


async def send(client: Any, case: Case) -> tuple[int, Any]:
    headers = {"Content-Type": case.content_type, "Connection": "close"}
    if case.encoding:
        headers["Content-Encoding"] = case.encoding
    resp = await client.post("/v1/usage", data=case.body, headers=headers)
    raw = await resp.read()
    assert resp.status < 500, f"{case.name}: {resp.status} {raw[:300]!r}"
    assert resp.headers.get("Content-Type", "").startswith("application/json"), (
        f"{case.name}: {resp.headers.get('Content-Type')} {raw[:200]!r}"
    )
    return resp.status, orjson.loads(raw)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_input_gets_a_clear_4xx(client: Any, case: Case) -> None:
    status, body = await send(client, case)
    assert 400 <= status < 500, (case.name, status, body)
    if case.status is not None:
        assert status == case.status, (case.name, body)
    messages = error_messages(body)
    assert all(len(m) < 4096 for m in messages), f"{case.name}: error message not bounded"
    if case.mention:
        assert any(case.mention.lower() in m.lower() for m in messages), (case.name, messages)
    # nothing hostile is counted, and the service still answers
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert total(parse_metrics(await resp.text()), "llm_requests_total") == 0


async def test_service_keeps_serving_after_everything(client: Any) -> None:
    statuses = [(await send(client, case))[0] for case in CASES]
    assert all(400 <= s < 500 for s in statuses)
    # and the same again, all at once
    results = await asyncio.gather(*(send(client, case) for case in CASES[:40]))
    assert all(400 <= s < 500 for s, _ in results)

    resp = await client.post("/v1/usage", json=report(request_id="fine", input_tokens=11))
    assert resp.status == 202
    resp = await client.get("/healthz")
    assert resp.status == 200
    resp = await client.get("/metrics")
    samples = parse_metrics(await resp.text())
    assert total(samples, "llm_requests_total") == 1
    assert total(samples, "llm_input_tokens_total") == 11
    assert value(samples, "llm_usage_reports_received_total") == 1
    assert total(samples, "llm_usage_reports_rejected_total") >= len(CASES)


async def test_gateway_metrics_endpoint_is_as_robust(client: Any) -> None:
    for body in (b"", b"null", b"[1]", b"[" * 100_000, b'{"model":"\xff"}', b"{}", b'"x"'):
        resp = await client.post(
            "/v2/usage/gateway-metrics",
            data=body,
            headers={"Content-Type": JSON, "Connection": "close"},
        )
        assert 400 <= resp.status < 500, (body[:20], resp.status)
        assert error_messages(await resp.json())
    assert (await client.get("/healthz")).status == 200


async def test_broken_http_does_not_take_the_service_down(client: Any) -> None:
    host, port = client.server.host, client.server.port

    async def raw(data: bytes) -> bytes:
        """Send bytes, half-close, and collect whatever comes back before the server hangs up."""
        reader, writer = await asyncio.open_connection(host, port)
        received = b""
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            while chunk := await asyncio.wait_for(reader.read(65536), timeout=5):
                received += chunk
        except ConnectionError:
            pass  # the server may drop a broken connection: fine, as long as it lives
        finally:
            writer.close()
        return received

    # a body shorter than its Content-Length, then the client goes away
    answer = await raw(
        b"POST /v1/usage HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + item()
    )
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:100]
    # not HTTP at all
    answer = await raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 4") or answer == b"", answer[:100]
    # a request line from outer space
    answer = await raw(b"POST /v1/usage\x00\xff HTTP/9.9\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 4") or answer == b"", answer[:100]

    resp = await client.post("/v1/usage", json=report(request_id="after", input_tokens=3))
    assert resp.status == 202
    samples = parse_metrics(await (await client.get("/metrics")).text())
    assert total(samples, "llm_input_tokens_total") == 3


async def test_chunked_body_over_the_limit(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path, max_body_bytes=64 * 1024)))

    async def chunks() -> Any:
        for _ in range(8):
            yield b" " * 16384

    resp = await client.post(
        "/v1/usage", data=chunks(), headers={"Content-Type": JSON, "Connection": "close"}
    )
    assert resp.status == 413
    assert error_messages(await resp.json())
    resp = await client.post("/v1/usage", json=report(request_id="ok"))
    assert resp.status == 202
