"""POST /v1/usage over real HTTP: body formats, partial acceptance, duplicates, auth, limits,
secrecy of raw API keys, label overflow, backpressure."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from helpers import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    READ_TOKEN,
    bearer,
    report,
    scrape,
    select,
    total,
    value,
    wait_ready,
)

from exporter.app import WAL

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


async def post(client: Any, body: Any, **headers: str) -> tuple[int, Any]:
    if isinstance(body, bytes):
        resp = await client.post("/v1/usage", data=body, headers=headers)
    else:
        resp = await client.post("/v1/usage", json=body, headers=headers)
    text = await resp.text()
    return resp.status, orjson.loads(text) if text else None


def ndjson(items: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(i) for i in items) + b"\n"


THREE = [
    report(request_id="r1", user="u1", input_tokens=100, output_tokens=10),
    report(request_id="r2", user="u2", input_tokens=200, output_tokens=20),
    report(request_id="r3", user="u1", input_tokens=300, output_tokens=30),
]


async def assert_three_counted(client: Any) -> None:
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 3
    assert value(m, "llm_input_tokens_total", model="test-model", operation="chat", user="u1") == (
        400
    )
    assert value(m, "llm_output_tokens_total", model="test-model", operation="chat", user="u2") == (
        20
    )
    assert value(m, "llm_usage_reports_received_total") == 3


# -- body formats -----------------------------------------------------------------------------


async def test_single_object(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await post(client, THREE[0])
    assert status == 202
    assert body == {"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []}
    m = await scrape(client)
    assert value(m, "llm_requests_total", model="test-model", operation="chat", user="u1") == 1


async def test_json_array(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await post(client, THREE)
    assert (status, body["accepted"]) == (202, 3)
    await assert_three_counted(client)


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/json"])
async def test_ndjson(make_client: MakeClient, content_type: str) -> None:
    client = await make_client()
    data = b"\n" + ndjson(THREE).replace(b"\n", b"\n\n", 1)  # blank lines are skipped
    status, body = await post(client, data, **{"Content-Type": content_type})
    assert (status, body["accepted"]) == (202, 3), body
    await assert_three_counted(client)


async def test_ndjson_bad_line_reports_its_index(make_client: MakeClient) -> None:
    client = await make_client()
    data = orjson.dumps(THREE[0]) + b"\n{not json\n" + orjson.dumps(THREE[1]) + b"\n"
    status, body = await post(client, data, **{"Content-Type": "application/x-ndjson"})
    assert status == 202
    assert body["accepted"] == 2
    assert [e["index"] for e in body["errors"]] == [1]
    assert "JSON" in body["errors"][0]["error"]


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("x-gzip", gzip.compress)],
)
async def test_compressed_bodies(
    make_client: MakeClient, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    client = await make_client()
    status, body = await post(
        client,
        compress(orjson.dumps(THREE)),
        **{"Content-Encoding": encoding, "Content-Type": "application/json"},
    )
    assert (status, body["accepted"]) == (202, 3), body
    await assert_three_counted(client)


async def test_gzip_ndjson(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await post(
        client,
        gzip.compress(ndjson(THREE)),
        **{"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson"},
    )
    assert (status, body["accepted"]) == (202, 3), body
    await assert_three_counted(client)


async def test_unknown_content_encoding_is_415(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await post(client, orjson.dumps(THREE), **{"Content-Encoding": "compress"})
    assert status == 415
    assert "Content-Encoding" in body["error"]
    # brotli is decoded (or refused) by aiohttp's parser before our handler: still a 4xx
    resp = await client.post(
        "/v1/usage", data=b"abc", headers={"Content-Encoding": "br", "Connection": "close"}
    )
    assert 400 <= resp.status < 500
    assert total(await scrape(client), "llm_requests_total") == 0


# -- partial acceptance -----------------------------------------------------------------------


async def test_partial_acceptance(make_client: MakeClient) -> None:
    client = await make_client()
    batch = [
        report(request_id="ok-1", input_tokens=5),
        report(request_id="bad-1", input_tokens=-1),
        report(request_id="ok-2", input_tokens=7),
        report(request_id="bad-2", colour="blue"),
        "not an object",
    ]
    status, body = await post(client, batch)
    assert status == 202
    assert (body["accepted"], body["rejected"]) == (2, 3)
    errors = {e["index"]: e["error"] for e in body["errors"]}
    assert set(errors) == {1, 3, 4}
    assert "input_tokens" in errors[1]
    assert "colour" in errors[3]
    assert "object" in errors[4]
    m = await scrape(client)
    assert total(m, "llm_input_tokens_total") == 12
    assert value(m, "llm_usage_reports_rejected_total", reason="invalid") == 3


async def test_all_invalid_is_422(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await post(client, [report(input_tokens=-5), report(model="")])
    assert status == 422
    assert body["accepted"] == 0
    assert [e["index"] for e in body["errors"]] == [0, 1]
    assert "model" in body["errors"][1]["error"]
    assert total(await scrape(client), "llm_requests_total") == 0


# -- duplicates -------------------------------------------------------------------------------


async def test_duplicates_in_one_batch(make_client: MakeClient) -> None:
    client = await make_client()
    batch = [
        report(request_id="dup", input_tokens=100),
        report(request_id="dup", input_tokens=100),
        report(request_id="other", input_tokens=1),
    ]
    status, body = await post(client, batch)
    assert status == 202
    assert (body["accepted"], body["duplicates"]) == (2, 1)
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 2
    assert total(m, "llm_input_tokens_total") == 101
    assert value(m, "llm_usage_reports_duplicate_total") == 1


async def test_duplicates_across_requests(make_client: MakeClient) -> None:
    client = await make_client()
    first = report(request_id="retry-me", input_tokens=100, output_tokens=9)
    assert (await post(client, first))[0] == 202
    # a retry (even with different numbers) is acknowledged but not counted again
    status, body = await post(client, {**first, "input_tokens": 5000})
    assert status == 202
    assert (body["accepted"], body["duplicates"], body["errors"]) == (0, 1, [])
    status, body = await post(client, [first, first])
    assert (status, body["accepted"], body["duplicates"]) == (202, 0, 2)
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 1
    assert total(m, "llm_input_tokens_total") == 100
    assert value(m, "llm_usage_reports_duplicate_total") == 3
    assert value(m, "llm_usage_reports_received_total") == 1


async def test_concurrent_retries_count_once(make_client: MakeClient) -> None:
    """A retry racing its first copy is answered only once that copy is on disk (when the
    write fails the retry becomes the accepted copy: tests/test_faults_disk.py)."""
    client = await make_client()
    wal = client.app[WAL]
    one = report(request_id="raced", input_tokens=42)

    async def post_and_look() -> tuple[int, dict[str, Any], int]:
        status, answer = await post(client, one)
        return status, answer, wal.pending_reports  # what was durable when it was answered

    results = await asyncio.gather(*(post_and_look() for _ in range(25)))
    assert all(durable == 1 for _, _, durable in results)
    results = [(status, answer) for status, answer, _ in results]
    assert all(status == 202 for status, _ in results)
    assert sum(body["accepted"] for _, body in results) == 1
    assert sum(body["duplicates"] for _, body in results) == 24
    assert total(await scrape(client), "llm_input_tokens_total") == 42


async def test_reports_without_request_id_are_not_deduplicated(make_client: MakeClient) -> None:
    client = await make_client()
    one = report(input_tokens=3)
    assert (await post(client, [one, one]))[1]["accepted"] == 2
    assert (await post(client, one))[1]["accepted"] == 1
    assert total(await scrape(client), "llm_input_tokens_total") == 9


# -- auth -------------------------------------------------------------------------------------


async def test_ingest_auth_matrix(make_client: MakeClient) -> None:
    client = await make_client(with_tokens=True)
    data = orjson.dumps(report(input_tokens=1))
    json_ct = {"Content-Type": "application/json"}

    resp = await client.post("/v1/usage", data=data, headers=json_ct)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "error" in await resp.json()

    for header in ("Bearer wrong-token-0123456789abcdef", f"Basic {INGEST_TOKEN}", "Bearer "):
        resp = await client.post(
            "/v1/usage", data=data, headers={**json_ct, "Authorization": header}
        )
        assert resp.status == 401, header
        assert "WWW-Authenticate" in resp.headers

    resp = await client.post("/v1/usage", data=data, headers={**json_ct, **bearer(READ_TOKEN)})
    assert resp.status == 403
    assert "ingest" in (await resp.json())["error"]

    for token in (INGEST_TOKEN, ADMIN_TOKEN):
        resp = await client.post(
            "/v1/usage",
            data=orjson.dumps(report(input_tokens=1)),
            headers={**json_ct, **bearer(token)},
        )
        assert resp.status == 202, token
    resp = await client.post(
        "/v2/usage/gateway-metrics",
        json={"model": "m", "input_token": 1, "output_token": 1},
        headers=bearer(INGEST_TOKEN),
    )
    assert resp.status == 202
    resp = await client.post(
        "/v2/usage/gateway-metrics", json={"model": "m", "input_token": 1, "output_token": 1}
    )
    assert resp.status == 401

    # /metrics stays open by default, health endpoints always
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 3  # only the authorized reports count
    assert value(m, "llm_usage_reports_rejected_total", reason="unauthorized") == 5
    assert value(m, "llm_usage_reports_rejected_total", reason="forbidden") == 1
    assert (await wait_ready(client))["status"] == "ready"  # no token needed
    for path in ("/healthz", "/"):
        assert (await client.get(path)).status == 200, path


async def test_metrics_auth(make_client: MakeClient) -> None:
    client = await make_client(with_tokens=True, metrics_auth=True)
    resp = await client.get("/metrics")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await client.get("/metrics", headers=bearer("nope-0123456789abcdef"))).status == 401
    assert (await client.get("/metrics", headers=bearer(INGEST_TOKEN))).status == 403
    for token in (READ_TOKEN, ADMIN_TOKEN):
        resp = await client.get("/metrics", headers=bearer(token))
        assert resp.status == 200
        assert "llm_usage_build_info" in await resp.text()
    assert (await client.get("/healthz")).status == 200


# -- raw API keys never leak ------------------------------------------------------------------

SECRET = "gpustack_ak_SUPERSECRET_7f3c9e1d2b4a"


async def test_access_key_never_leaks(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "secret-data"
    client = await make_client(data_dir=data_dir)
    gpustack = {
        "model": "unpriced-model-xyz",
        "input_token": 10,
        "output_token": 2,
        "total_token": 12,
        "request_count": 1,
        "completed": True,
        "user_id": "u1",
        "access_key": SECRET,
        "operation": "chat_completion",
    }
    bodies: list[str] = []
    for path, body in [
        ("/v2/usage/gateway-metrics", gpustack),
        ("/v1/usage", {**gpustack, "request_id": "second"}),
        ("/v1/usage", [{**gpustack, "input_token": "ten"}, {**gpustack, "access_key": 5}]),
        ("/v1/usage", {**gpustack, "surprise": SECRET}),
        ("/v1/usage", {"model": "m", "access_key": SECRET, "input_tokens": 1}),
        ("/v1/usage", {"model": "m", "api_key_id": SECRET * 20}),
        ("/v2/usage/gateway-metrics", {**gpustack, "request_count": 2}),
    ]:
        resp = await client.post(path, json=body)
        assert resp.status < 500
        bodies.append(await resp.text())
    # the valid ones were accepted (so the key went through the whole path)
    assert orjson.loads(bodies[0])["accepted"] == 1
    assert orjson.loads(bodies[1])["accepted"] == 1
    for text in bodies:
        assert SECRET not in text, text

    for accept in ("", "application/openmetrics-text"):
        resp = await client.get("/metrics", headers={"Accept": accept})
        text = await resp.text()
        assert "unpriced-model-xyz" in text
        assert SECRET not in text
        assert "SUPERSECRET" not in text

    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.stat().st_size > 0 for p in files), "nothing written to the data dir"
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    await client.close()  # shutdown logs too
    for p in (q for q in data_dir.rglob("*") if q.is_file()):
        assert SECRET.encode() not in p.read_bytes(), p
    assert caplog.records, "expected some log output (e.g. the unpriced-model warning)"
    assert SECRET not in caplog.text
    assert "SUPERSECRET" not in caplog.text


# -- limits -----------------------------------------------------------------------------------


async def test_body_over_limit_is_413(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=64 * 1024)
    big = [report(request_id=f"id-{i:06d}", user="u" * 200) for i in range(400)]
    data = orjson.dumps(big)
    assert len(data) > 64 * 1024
    status, body = await post(client, data, **{"Content-Type": "application/json"})
    assert status == 413
    assert "error" in body
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 0
    assert value(m, "llm_usage_reports_rejected_total", reason="too_large") == 1
    # just under the limit is fine
    status, _ = await post(client, big[:100])
    assert status == 202


async def test_batch_over_limit_is_413(make_client: MakeClient) -> None:
    client = await make_client(max_batch_items=5)
    six = [report(request_id=f"b{i}") for i in range(6)]
    status, body = await post(client, six)
    assert status == 413
    assert "5" in body["error"]
    status, body = await post(client, ndjson(six), **{"Content-Type": "application/x-ndjson"})
    assert status == 413
    status, body = await post(client, six[:5])
    assert (status, body["accepted"]) == (202, 5)
    m = await scrape(client)
    assert value(m, "llm_usage_reports_rejected_total", reason="batch_too_large") == 2


@pytest.mark.parametrize(
    ("field", "limit"),
    [("user", 256), ("model", 256), ("team", 256), ("node", 256), ("request_id", 128)],
)
async def test_long_strings_are_422_naming_the_field(
    make_client: MakeClient, field: str, limit: int
) -> None:
    client = await make_client()
    status, body = await post(client, report(**{field: "x" * (limit + 1)}))
    assert status == 422
    assert body["errors"][0]["index"] == 0
    assert body["errors"][0]["error"].startswith(field)
    status, body = await post(client, report(**{field: "y" * limit}))
    assert status == 202, body


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_compression_bomb_is_413(
    make_client: MakeClient, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    client = await make_client(max_body_bytes=64 * 1024)
    bomb = compress(b"[" + b" " * (50 * 1024 * 1024) + b"]")
    assert len(bomb) < 64 * 1024  # small on the wire
    status, body = await post(
        client, bomb, **{"Content-Encoding": encoding, "Content-Type": "application/json"}
    )
    assert status == 413
    assert "exceeds" in body["error"]
    assert (await client.get("/healthz")).status == 200


# -- label overflow ---------------------------------------------------------------------------


async def test_label_overflow_folds_into_other(make_client: MakeClient) -> None:
    client = await make_client(max_users=3)
    for i in range(1, 6):
        status, _ = await post(client, report(user=f"user-{i}", input_tokens=i * 10))
        assert status == 202
    status, _ = await post(client, report(user="user-1", input_tokens=1))  # still its own series
    assert status == 202

    m = await scrape(client)
    users = {dict(k[1])["user"]: v for k, v in select(m, "llm_requests_total").items()}
    assert users == {"user-1": 2, "user-2": 1, "user-3": 1, "__other__": 2}
    assert (
        value(m, "llm_input_tokens_total", model="test-model", operation="chat", user="__other__")
        == 40 + 50
    )
    assert total(m, "llm_input_tokens_total") == 10 + 20 + 30 + 40 + 50 + 1
    assert value(m, "llm_usage_label_overflow_total", label="user") == 2
    assert total(m, "llm_usage_label_overflow_total", label="model") == 0


async def test_model_cap_applies_too(make_client: MakeClient) -> None:
    client = await make_client(max_models=2)
    status, _ = await post(client, [report(model=f"model-{i}", input_tokens=1) for i in range(4)])
    assert status == 202
    m = await scrape(client)
    models = {dict(k[1])["model"] for k in select(m, "llm_requests_total")}
    assert models == {"model-0", "model-1", "__other__"}
    assert value(m, "llm_usage_label_overflow_total", label="model") == 2


# -- backpressure -----------------------------------------------------------------------------


async def test_full_wal_answers_503_and_counts_nothing(make_client: MakeClient) -> None:
    client = await make_client(wal_max_bytes=1024)
    batch = [report(request_id=f"bp-{i}", input_tokens=1) for i in range(10)]
    resp = await client.post("/v1/usage", json=batch)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    assert "error" in await resp.json()
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 0
    assert value(m, "llm_usage_reports_rejected_total", reason="backpressure") == 10
    # the refused ids were not remembered: a retry that fits is accepted, not a "duplicate"
    status, body = await post(client, batch[0])
    assert (status, body["accepted"], body["duplicates"]) == (202, 1, 0)


# -- other endpoints --------------------------------------------------------------------------


async def test_landing_health_and_errors_are_well_formed(make_client: MakeClient) -> None:
    client = await make_client()
    resp = await client.get("/")
    assert resp.status == 200
    assert "/metrics" in await resp.text()
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"
    resp = await client.get("/readyz")
    assert resp.status in (200, 503)  # 503 only while start-up work is still running
    assert (await wait_ready(client))["status"] == "ready"
    resp = await client.get("/no/such/path")
    assert resp.status == 404
    assert "error" in await resp.json()
    resp = await client.get("/v1/usage")
    assert resp.status == 405
    assert "error" in await resp.json()
