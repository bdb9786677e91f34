"""Provider shapes → canonical numbers, then end to end through POST /v1/usage → /metrics.

Payloads follow the providers' documented response shapes (OpenAI Chat Completions,
Embeddings and Responses; Anthropic Messages; GPUStack gateway metrics; OpenTelemetry GenAI
semantic-convention attributes). Expected numbers are worked out by hand from the payloads.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from helpers import make_settings, scrape, total, value
from pydantic import ValidationError

from exporter.app import create_app
from exporter.ingest.adapters import ShapeError, adapt
from exporter.ingest.pipeline import key_alias
from exporter.usage import Operation, Status, UsageReport


def canonical(raw: dict[str, Any]) -> UsageReport:
    return UsageReport.model_validate(adapt(copy.deepcopy(raw), key_alias))


# -- documented payloads ----------------------------------------------------------------------

OPENAI_CHAT = {
    "id": "chatcmpl-AzVJ6uWmZ3fNnKkHxRhBz2nNEI9Ug",
    "object": "chat.completion",
    "created": 1739303784,
    "model": "o3-mini-2025-01-31",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The capital of France is Paris.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 192,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_ef58bd3122",
}

OPENAI_STREAM_LAST_CHUNK = {
    "id": "chatcmpl-stream-1",
    "object": "chat.completion.chunk",
    "created": 1739303790,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [],
    "usage": {
        "prompt_tokens": 41,
        "completion_tokens": 9,
        "total_tokens": 50,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    },
}

OPENAI_LEGACY_COMPLETION = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

OPENAI_EMBEDDINGS = {
    "object": "list",
    "data": [
        {
            "object": "embedding",
            "index": 0,
            "embedding": [0.0023064255, -0.009327292, -0.0028842222],
        }
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

OPENAI_RESPONSES = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "o4-mini-2025-04-16",
    "output": [
        {
            "type": "reasoning",
            "id": "rs_67ccd3b3e1c881908d7b4a1a8c3d5e0b",
            "summary": [],
        },
        {
            "type": "message",
            "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Paris.", "annotations": []}],
        },
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": "medium", "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {
        "input_tokens": 1500,
        "input_tokens_details": {"cached_tokens": 1024},
        "output_tokens": 950,
        "output_tokens_details": {"reasoning_tokens": 640},
        "total_tokens": 2450,
    },
    "user": None,
    "metadata": {},
}

ANTHROPIC_CACHE_WRITE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 188086,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 393,
        "server_tool_use": None,
        "service_tier": "standard",
    },
}

ANTHROPIC_CACHE_READ = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Again."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 188086,
        "output_tokens": 520,
    },
}

ANTHROPIC_NO_CACHE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-haiku-20241022",
    "content": [{"type": "text", "text": "Hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 6},
}

GPUSTACK_ACCESS_KEY = "gpustack_3f9a1c7e5b2d4f60_9e8d7c6b5a4f3e2d1c0b"

GPUSTACK = {
    "model": "qwen3-8b",
    "input_token": 512,
    "output_token": 128,
    "total_token": 640,
    "input_cached_token": 256,
    "request_count": 1,
    "completed": True,
    "output_chunk_count": 128,
    "request_content_bytes": 2048,
    "started_at": 1767225600000,  # 2026-01-01T00:00:00Z in unix ms
    "completed_at": 1767225602500,
    "user_id": "u-42",
    "access_key": GPUSTACK_ACCESS_KEY,
    "operation": "chat_completion",
}

GPUSTACK_INCOMPLETE = {
    "model": "qwen3-8b",
    "input_token": 0,
    "output_token": 0,
    "total_token": 0,
    "input_cached_token": 0,
    "request_count": 1,
    "completed": False,
    "output_chunk_count": 38,
    "request_content_bytes": 4096,
    "started_at": 1767225600000,
    "completed_at": 1767225601000,
    "user_id": "u-7",
    "access_key": GPUSTACK_ACCESS_KEY,
    "operation": "chat_completion",
}

OTEL_CHAT = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-4o",
    "gen_ai.response.model": "gpt-4o-2024-08-06",
    "gen_ai.response.id": "chatcmpl-otel-1",
    "gen_ai.response.finish_reasons": ["stop"],
    "gen_ai.request.temperature": 0.2,
    "gen_ai.usage.input_tokens": 120,
    "gen_ai.usage.output_tokens": 45,
    "gen_ai.usage.cache_read.input_tokens": 100,
    "server.address": "api.openai.com",
    "server.port": 443,
    "user.id": "otel-user",
}


# -- adapters: exact canonical numbers --------------------------------------------------------


def test_openai_chat_completion() -> None:
    r = canonical({**OPENAI_CHAT, "user": "alice", "team": "search"})
    assert r.request_id == "chatcmpl-AzVJ6uWmZ3fNnKkHxRhBz2nNEI9Ug"
    assert (r.provider, r.operation, r.model) == ("openai", Operation.CHAT, "o3-mini-2025-01-31")
    assert (r.user, r.team) == ("alice", "search")
    assert r.input_tokens == 2006  # prompt_tokens already include the cached ones
    assert r.cached_input_tokens == 1920
    assert r.cache_creation_input_tokens == 0
    assert r.output_tokens == 300
    assert r.reasoning_tokens == 192
    assert r.total_tokens == 2306
    assert r.status is Status.SUCCESS


def test_openai_stream_chunk_with_null_details() -> None:
    r = canonical(OPENAI_STREAM_LAST_CHUNK)
    assert r.operation is Operation.CHAT
    assert (r.input_tokens, r.output_tokens, r.cached_input_tokens, r.reasoning_tokens) == (
        41,
        9,
        0,
        0,
    )


def test_openai_legacy_completion_operation() -> None:
    r = canonical(OPENAI_LEGACY_COMPLETION)
    assert r.operation is Operation.COMPLETION
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (5, 7, 12)


def test_openai_embeddings() -> None:
    r = canonical(OPENAI_EMBEDDINGS)
    assert r.operation is Operation.EMBEDDING
    assert r.provider == "openai"
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (8, 0, 8)
    # no id in an embeddings response: every report gets its own server-side id
    assert r.request_id != canonical(OPENAI_EMBEDDINGS).request_id


def test_openai_responses_api_full_object() -> None:
    r = canonical(OPENAI_RESPONSES)
    assert r.request_id == OPENAI_RESPONSES["id"]
    assert (r.provider, r.operation) == ("openai", Operation.RESPONSES)
    assert r.input_tokens == 1500
    assert r.cached_input_tokens == 1024
    assert r.output_tokens == 950
    assert r.reasoning_tokens == 640
    assert r.total_tokens == 2450
    assert r.status is Status.SUCCESS  # "completed"
    assert r.user == ""  # "user": null


@pytest.mark.parametrize(
    ("response_status", "expected"),
    [("failed", Status.ERROR), ("incomplete", Status.SUCCESS), ("cancelled", Status.CANCELLED)],
)
def test_openai_responses_status(response_status: str, expected: Status) -> None:
    r = canonical({**OPENAI_RESPONSES, "status": response_status})
    assert r.status is expected


def test_anthropic_cache_write_is_added_to_input() -> None:
    r = canonical(ANTHROPIC_CACHE_WRITE)
    assert (r.provider, r.operation) == ("anthropic", Operation.CHAT)
    assert r.request_id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert r.input_tokens == 21 + 188086 + 0
    assert r.cache_creation_input_tokens == 188086
    assert r.cached_input_tokens == 0
    assert r.output_tokens == 393
    assert r.total_tokens == 21 + 188086 + 393


def test_anthropic_cache_read_is_added_to_input() -> None:
    r = canonical(ANTHROPIC_CACHE_READ)
    assert r.input_tokens == 3 + 0 + 188086
    assert r.cached_input_tokens == 188086
    assert r.cache_creation_input_tokens == 0
    assert r.output_tokens == 520


def test_anthropic_without_cache_fields_recognized_by_type() -> None:
    r = canonical(ANTHROPIC_NO_CACHE)
    assert r.provider == "anthropic"
    assert (r.input_tokens, r.output_tokens, r.cached_input_tokens) == (12, 6, 0)


def test_anthropic_null_cache_fields_count_as_zero() -> None:
    raw = copy.deepcopy(ANTHROPIC_CACHE_READ)
    raw["usage"]["cache_creation_input_tokens"] = None
    r = canonical(raw)
    assert (r.input_tokens, r.cache_creation_input_tokens) == (188089, 0)


def test_gpustack_body() -> None:
    r = canonical(GPUSTACK)
    assert r.source == "gpustack"
    assert (r.model, r.operation, r.user) == ("qwen3-8b", Operation.CHAT, "u-42")
    assert (r.input_tokens, r.output_tokens, r.cached_input_tokens, r.total_tokens) == (
        512,
        128,
        256,
        640,
    )
    assert r.started_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert r.completed_at == datetime(2026, 1, 1, 0, 0, 2, 500000, tzinfo=UTC)
    assert r.duration_ms == pytest.approx(2500)
    assert not r.estimated
    # the raw key is replaced by a stable alias that does not contain it
    assert r.api_key_id and GPUSTACK_ACCESS_KEY not in r.api_key_id
    assert r.api_key_id == canonical(GPUSTACK).api_key_id
    assert r.api_key_id != canonical({**GPUSTACK, "access_key": "another-key-abcdef"}).api_key_id
    assert GPUSTACK_ACCESS_KEY not in r.model_dump_json()


@pytest.mark.parametrize(
    ("gpustack_operation", "expected"),
    [
        ("chat_completion", Operation.CHAT),
        ("embedding", Operation.EMBEDDING),
        ("rerank", Operation.RERANK),
        ("image_generation", Operation.IMAGE_GENERATION),
        ("audio_speech", Operation.AUDIO_SPEECH),
        ("audio_transcription", Operation.AUDIO_TRANSCRIPTION),
        ("something_new", Operation.OTHER),
    ],
)
def test_gpustack_operations(gpustack_operation: str, expected: Operation) -> None:
    assert canonical({**GPUSTACK, "operation": gpustack_operation}).operation is expected


def test_gpustack_incomplete_stream_is_estimated() -> None:
    r = canonical(GPUSTACK_INCOMPLETE)
    assert r.stream and not r.completed
    r.estimate_incomplete_stream(bytes_per_input_token=4, tokens_per_output_chunk=1)
    assert r.estimated
    assert r.input_tokens == 4096 // 4
    assert r.output_tokens == 38
    assert r.total_tokens == 1024 + 38


def test_gpustack_incomplete_stream_keeps_reported_input() -> None:
    r = canonical({**GPUSTACK_INCOMPLETE, "input_token": 300})
    r.estimate_incomplete_stream(bytes_per_input_token=4, tokens_per_output_chunk=2)
    assert (r.input_tokens, r.output_tokens, r.estimated) == (300, 76, True)


def test_gpustack_request_count_other_than_one_is_refused() -> None:
    with pytest.raises(ShapeError, match="request_count"):
        canonical({**GPUSTACK, "request_count": 3})


def test_otel_attributes() -> None:
    r = canonical(OTEL_CHAT)
    assert r.source == "otel"
    assert (r.model, r.provider, r.operation) == ("gpt-4o-2024-08-06", "openai", Operation.CHAT)
    assert r.request_id == "chatcmpl-otel-1"
    assert r.user == "otel-user"
    assert (r.input_tokens, r.output_tokens, r.cached_input_tokens) == (120, 45, 100)


def test_otel_response_model_wins_in_any_order() -> None:
    reordered = {"gen_ai.response.model": "gpt-4o-2024-08-06", **OTEL_CHAT}
    reordered["gen_ai.request.model"] = "gpt-4o"
    items = list(reordered.items())
    assert canonical(dict(items)).model == "gpt-4o-2024-08-06"
    assert canonical(dict(reversed(items))).model == "gpt-4o-2024-08-06"


@pytest.mark.parametrize(
    ("otel_operation", "expected"),
    [
        ("chat", Operation.CHAT),
        ("text_completion", Operation.COMPLETION),
        ("embeddings", Operation.EMBEDDING),
        ("generate_content", Operation.CHAT),
        ("execute_tool", Operation.OTHER),
        ("invoke_agent", Operation.OTHER),
    ],
)
def test_otel_operations(otel_operation: str, expected: Operation) -> None:
    assert canonical({**OTEL_CHAT, "gen_ai.operation.name": otel_operation}).operation is expected


def test_otel_error_type_marks_error() -> None:
    r = canonical({**OTEL_CHAT, "error.type": "timeout"})
    assert r.status is Status.ERROR
    assert r.error_type == "timeout"


def test_otel_legacy_system_attribute_and_cache_creation() -> None:
    raw = {
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-3-5-haiku-20241022",
        "gen_ai.usage.input_tokens": 500,
        "gen_ai.usage.cache_creation.input_tokens": 300,
        "gen_ai.usage.output_tokens": 1,
    }
    r = canonical(raw)
    assert (r.provider, r.input_tokens, r.cache_creation_input_tokens) == ("anthropic", 500, 300)


def test_canonical_shape_and_arithmetic() -> None:
    r = canonical(
        {
            "request_id": "req-1",
            "model": "m",
            "operation": "embeddings",
            "input_tokens": 100,
            "cached_input_tokens": 60,
            "cache_creation_input_tokens": 40,
            "output_tokens": 5,
            "reasoning_tokens": 5,
            "status": "cancelled",
            "started_at": "2026-01-31T12:00:00Z",
            "completed_at": "2026-01-31T12:00:01.250+00:00",
        }
    )
    assert r.operation is Operation.EMBEDDING
    assert r.total_tokens == 105
    assert r.status is Status.CANCELLED and r.error_type == "cancelled"
    assert r.duration_ms == pytest.approx(1250)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input_tokens": 10, "cached_input_tokens": 11}, "exceed input_tokens"),
        (
            {"input_tokens": 10, "cached_input_tokens": 6, "cache_creation_input_tokens": 5},
            "exceed input_tokens",
        ),
        ({"output_tokens": 3, "reasoning_tokens": 4}, "reasoning_tokens"),
        ({"input_tokens": 3, "output_tokens": 4, "total_tokens": 8}, "total_tokens"),
        ({"status": "exploded"}, "status"),
    ],
)
def test_canonical_arithmetic_violations(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        canonical({"model": "m", **fields})


def test_openai_total_mismatch_is_rejected() -> None:
    raw = copy.deepcopy(OPENAI_CHAT)
    raw["usage"]["total_tokens"] = 9999
    with pytest.raises(ValueError, match="total_tokens"):
        canonical(raw)


def test_provider_bodies_ignore_fields_providers_add() -> None:
    plain = canonical(OPENAI_CHAT)
    added = canonical({**OPENAI_CHAT, "moderation": None, "obfuscation": "x9", "colour": "b"})
    assert added.model_dump() == {**plain.model_dump(), "request_id": added.request_id}


def test_canonical_shape_stays_strict() -> None:
    with pytest.raises(ValidationError, match="colour"):
        canonical({"model": "gpt-4o", "input_tokens": 1, "colour": "blue"})


# -- end to end: POST /v1/usage → /metrics ----------------------------------------------------


async def test_every_shape_end_to_end(aiohttp_client: Any, tmp_path: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path)))
    batch = [
        {**OPENAI_CHAT, "user": "alice"},
        {**OPENAI_STREAM_LAST_CHUNK, "user": "alice"},
        {**OPENAI_EMBEDDINGS, "user": "bob"},
        {**OPENAI_RESPONSES, "user": "carol"},
        {**ANTHROPIC_CACHE_WRITE, "user": "dave"},
        {**ANTHROPIC_CACHE_READ, "user": "dave"},
        GPUSTACK,
        OTEL_CHAT,
        {**OTEL_CHAT, "gen_ai.response.id": "chatcmpl-otel-2", "error.type": "rate_limited"},
    ]
    resp = await client.post("/v1/usage", json=batch)
    body = await resp.json()
    assert resp.status == 202, body
    assert body["accepted"] == len(batch) and body["errors"] == []

    m = await scrape(client)

    def series(name: str, model: str, operation: str, user: str) -> float:
        return value(m, name, model=model, operation=operation, user=user)

    assert series("llm_requests_total", "o3-mini-2025-01-31", "chat", "alice") == 1
    assert series("llm_input_tokens_total", "o3-mini-2025-01-31", "chat", "alice") == 2006
    assert series("llm_cached_input_tokens_total", "o3-mini-2025-01-31", "chat", "alice") == 1920
    assert series("llm_output_tokens_total", "o3-mini-2025-01-31", "chat", "alice") == 300
    assert series("llm_reasoning_tokens_total", "o3-mini-2025-01-31", "chat", "alice") == 192
    assert series("llm_input_tokens_total", "gpt-4o-mini-2024-07-18", "chat", "alice") == 41

    assert series("llm_input_tokens_total", "text-embedding-3-small", "embedding", "bob") == 8
    assert series("llm_output_tokens_total", "text-embedding-3-small", "embedding", "bob") == 0

    assert series("llm_input_tokens_total", "o4-mini-2025-04-16", "responses", "carol") == 1500
    assert series("llm_reasoning_tokens_total", "o4-mini-2025-04-16", "responses", "carol") == 640

    claude = ("claude-sonnet-4-20250514", "chat", "dave")
    assert series("llm_requests_total", *claude) == 2
    assert series("llm_input_tokens_total", *claude) == (21 + 188086) + (3 + 188086)
    assert series("llm_cache_creation_input_tokens_total", *claude) == 188086
    assert series("llm_cached_input_tokens_total", *claude) == 188086
    assert series("llm_output_tokens_total", *claude) == 393 + 520

    assert series("llm_input_tokens_total", "qwen3-8b", "chat", "u-42") == 512
    assert series("llm_cached_input_tokens_total", "qwen3-8b", "chat", "u-42") == 256
    assert series("llm_output_tokens_total", "qwen3-8b", "chat", "u-42") == 128

    otel = ("gpt-4o-2024-08-06", "chat", "otel-user")
    assert series("llm_requests_total", *otel) == 2
    assert series("llm_request_errors_total", *otel) == 1
    assert series("llm_input_tokens_total", *otel) == 240

    assert value(m, "llm_usage_reports_received_total") == len(batch)
    # GPUStack's duration (2.5 s) lands in the duration histogram, without a user label
    assert value(m, "llm_request_duration_seconds_count", model="qwen3-8b", operation="chat") == 1
    assert value(
        m, "llm_request_duration_seconds_bucket", model="qwen3-8b", operation="chat", le="2.5"
    ) == (1)
    assert value(
        m, "llm_request_duration_seconds_bucket", model="qwen3-8b", operation="chat", le="1.0"
    ) == (0)


async def test_gateway_metrics_endpoint_estimates_incomplete_stream(
    aiohttp_client: Any, tmp_path: Any
) -> None:
    settings = make_settings(tmp_path, bytes_per_input_token=2.0, tokens_per_output_chunk=1.5)
    client = await aiohttp_client(create_app(settings))

    resp = await client.post("/v2/usage/gateway-metrics", json=GPUSTACK_INCOMPLETE)
    assert resp.status == 202, await resp.text()
    resp = await client.post("/v2/usage/gateway-metrics", json=GPUSTACK)
    assert resp.status == 202, await resp.text()

    m = await scrape(client)
    assert value(m, "llm_input_tokens_total", model="qwen3-8b", operation="chat", user="u-7") == (
        4096 / 2
    )
    assert value(m, "llm_output_tokens_total", model="qwen3-8b", operation="chat", user="u-7") == (
        38 * 1.5
    )
    assert value(m, "llm_input_tokens_total", model="qwen3-8b", operation="chat", user="u-42") == (
        512
    )
    assert value(m, "llm_usage_estimated_reports_total") == 1
    assert total(m, "llm_requests_total", model="qwen3-8b") == 2


async def test_gateway_metrics_endpoint_rejects_arrays_and_bad_numbers(
    aiohttp_client: Any, tmp_path: Any
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path)))
    resp = await client.post("/v2/usage/gateway-metrics", json=[GPUSTACK, GPUSTACK])
    assert resp.status in (400, 413, 422)
    assert "error" in await resp.json()
    resp = await client.post("/v2/usage/gateway-metrics", json={"model": "m", "input_token": "7"})
    assert resp.status == 422
    body = await resp.json()
    assert "input_tokens" in body["errors"][0]["error"]
    m = await scrape(client)
    assert total(m, "llm_requests_total") == 0


@pytest.mark.parametrize(
    ("model", "provider", "want_model", "want_provider"),
    [
        ("openai/gpt-4o", "", "gpt-4o", "openai"),
        ("anthropic/claude-sonnet-4-5", "", "claude-sonnet-4-5", "anthropic"),
        ("anthropic/claude-sonnet-4-5", "litellm", "claude-sonnet-4-5", "anthropic"),
        ("bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0", "",
         "anthropic.claude-3-5-sonnet-20240620-v1:0", "aws"),
        ("anthropic.claude-3-5-sonnet-20240620-v1:0", "",
         "anthropic.claude-3-5-sonnet-20240620-v1:0", "aws"),
        ("us.anthropic.claude-3-5-sonnet-20240620-v1:0", "",
         "us.anthropic.claude-3-5-sonnet-20240620-v1:0", "aws"),
        ("claude-3-5-sonnet@20240620", "", "claude-3-5-sonnet@20240620", "google"),
        ("publishers/google/models/gemini-2.0-flash", "", "gemini-2.0-flash", "google"),
        ("vertex_ai/gemini-2.0-flash", "", "gemini-2.0-flash", "google"),
        ("azure/gpt-4o", "", "gpt-4o", "azure"),
        ("gpt-4o", "gcp.vertex_ai", "gpt-4o", "google"),
        ("claude-sonnet-4-5", "aws.bedrock", "claude-sonnet-4-5", "aws"),
        ("anthropic/claude-sonnet-4-5", "openrouter", "anthropic/claude-sonnet-4-5", "openrouter"),
        ("meta-llama/Llama-3.3-70B-Instruct", "", "meta-llama/Llama-3.3-70B-Instruct", ""),
        ("claude-sonnet-4-5", "", "claude-sonnet-4-5", "anthropic"),
    ],
)  # fmt: skip
def test_provider_is_inferred_from_the_model_id(
    model: str, provider: str, want_model: str, want_provider: str
) -> None:
    body = {"id": "x", "object": "chat.completion", "model": model,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}  # fmt: skip
    if provider:
        body["provider"] = provider
    r = canonical(body)
    assert (r.model, r.provider) == (want_model, want_provider)


def test_openai_shaped_claude_through_a_gateway_is_priced_as_claude() -> None:
    """No provider is assumed for OpenAI-shaped bodies: the Pricer sees Anthropic's rates."""
    from exporter.pricing import Pricer

    r = canonical({"id": "x", "object": "chat.completion", "model": "anthropic/claude-sonnet-4-5",
                   "usage": {"prompt_tokens": 1000, "completion_tokens": 100}})  # fmt: skip
    assert r.provider == "anthropic"
    r.__dict__["completed_at"] = datetime.now(UTC)
    cost = Pricer().price(r.__dict__)
    assert isinstance(cost, Decimal) and cost > 0


def test_new_sdk_fields_are_ignored_and_new_usage_fields_read() -> None:
    chat = canonical({**OPENAI_CHAT, "moderation": None, "obfuscation": "k2",
                      "usage": {**OPENAI_CHAT["usage"], "prompt_tokens_details":
                                {"cached_tokens": 1000, "cache_write_tokens": 900}}})  # fmt: skip
    assert (chat.cached_input_tokens, chat.cache_creation_input_tokens) == (1000, 900)
    by_ttl = {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 70}
    message = canonical({"id": "msg_1", "type": "message", "model": "claude-sonnet-4-5",
                         "stop_details": None, "diagnostics": {"x": 1},
                         "usage": {"input_tokens": 5, "output_tokens": 2,
                                   "cache_creation": by_ttl}})  # fmt: skip
    assert (message.input_tokens, message.cache_creation_input_tokens) == (105, 100)


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"a b": "x"}, "pattern"),
        ({f"k{i}": "x" for i in range(17)}, "at most 16"),
        ({"k": "x" * 257}, "at most 256"),
        ({"k": 5}, "valid string"),
        ({"k": "a\x00b"}, "NUL"),
    ],
)
def test_canonical_tags_outside_the_bounds_are_refused(tags: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        canonical({"model": "gpt-4o", "tags": tags})
