"""Provider shapes → the canonical report dict (validated afterwards by UsageReport).

Each adapter only renames and does token arithmetic; types are left for pydantic to judge, so
a wrong type anywhere surfaces as one clear validation error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from exporter.usage import (
    OPERATION_VALUES,
    STATUS_VALUES,
    normalize_operation,
    normalize_status,
)

Raw = Mapping[str, Any]

#: Envelope fields we carry over as they are (all canonical field names).
_ENVELOPE_FIELDS = (
    "request_id",
    "model",
    "provider",
    "operation",
    "user",
    "team",
    "api_key_id",
    "trace_id",
    "parent_id",
    "node",
    "status",
    "error_type",
    "stream",
    "completed",
    "output_chunk_count",
    "request_content_bytes",
    "started_at",
    "completed_at",
    "duration_ms",
    "ttft_ms",
    "cost_usd",
)
#: Fields of provider response bodies that carry no usage; accepted and ignored so a gateway
#: can post the response object as it is.
_RESPONSE_BODY_FIELDS = frozenset(
    {
        "id",
        "object",
        "type",
        "created",
        "created_at",
        "choices",
        "system_fingerprint",
        "service_tier",
        "content",
        "role",
        "stop_reason",
        "stop_sequence",
        "output",
        "data",
        "instructions",
        "metadata",
        "incomplete_details",
        "error",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "previous_response_id",
        "reasoning",
        "text",
        "truncation",
        "max_output_tokens",
        "container",
        "format",
        # Responses API objects carry these too (documented response shape)
        "store",
        "background",
        "max_tool_calls",
        "top_logprobs",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "conversation",
        "billing",
    }
)
_OBJECT_OPERATIONS = {
    "chat.completion": "chat",
    "chat.completion.chunk": "chat",
    "text_completion": "completion",
    "response": "responses",
    "list": "embedding",
    "embedding": "embedding",
    "message": "chat",
}


class ShapeError(ValueError):
    """The item matches no known shape, or mixes shapes."""


def _names(keys: set[str], limit: int = 10) -> str:
    """Field names for an error message, bounded: a hostile body must not echo megabytes."""
    shown = [k if len(k) <= 64 else k[:64] + "…" for k in sorted(keys)[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{shown}{more}"


def _int(value: Any) -> Any:
    """Pass-through that treats a JSON null token count as 0 (providers send null)."""
    return 0 if value is None else value


def _usage_object(raw: Raw) -> Mapping[str, Any]:
    usage = raw["usage"]
    if not isinstance(usage, Mapping):
        raise ShapeError("usage must be an object")
    return usage


def _envelope(raw: Raw, source: str) -> dict[str, Any]:
    unknown = set(raw) - set(_ENVELOPE_FIELDS) - _RESPONSE_BODY_FIELDS - {"usage"}
    if unknown:
        raise ShapeError(f"unknown field(s) for a {source} usage envelope: {_names(unknown)}")
    # providers send null for absent values (a Responses object has "user": null)
    out: dict[str, Any] = {k: raw[k] for k in _ENVELOPE_FIELDS if raw.get(k) is not None}
    if "request_id" not in out and isinstance(raw.get("id"), str):
        out["request_id"] = raw["id"]
    if "operation" not in out:
        kind = raw.get("object", raw.get("type"))
        if isinstance(kind, str) and kind in _OBJECT_OPERATIONS:
            out["operation"] = _OBJECT_OPERATIONS[kind]
    out["source"] = source
    return out


def _details(usage: Mapping[str, Any], key: str, field: str) -> Any:
    details = usage.get(key)
    if details is None:
        return 0
    if not isinstance(details, Mapping):
        raise ShapeError(f"usage.{key} must be an object")
    return _int(details.get(field))


def _openai_tokens(
    out: dict[str, Any],
    usage: Mapping[str, Any],
    names: tuple[str, str, str, str],
) -> dict[str, Any]:
    """Both OpenAI APIs count cached input inside input and reasoning inside output; audio and
    image tokens (realtime, audio and image models) are parts of input/output too."""
    input_key, output_key, input_details, output_details = names
    out.setdefault("provider", "openai")
    out["input_tokens"] = _int(usage.get(input_key))
    out["output_tokens"] = _int(usage.get(output_key))
    out["cached_input_tokens"] = _details(usage, input_details, "cached_tokens")
    out["reasoning_tokens"] = _details(usage, output_details, "reasoning_tokens")
    for details, field, canon in (
        (input_details, "cache_write_tokens", "cache_creation_input_tokens"),
        (input_details, "audio_tokens", "input_audio_tokens"),
        (input_details, "image_tokens", "input_image_tokens"),
        (output_details, "audio_tokens", "output_audio_tokens"),
        (output_details, "image_tokens", "output_image_tokens"),
    ):
        value = _details(usage, details, field)
        if value:
            out[canon] = value
    cached = usage.get(input_details)
    if isinstance(cached, Mapping) and cached.get("cached_tokens_details") is not None:
        value = _details(cached, "cached_tokens_details", "audio_tokens")
        if value:
            out["cached_audio_input_tokens"] = value
    if usage.get("total_tokens") is not None:
        out["total_tokens"] = usage["total_tokens"]
    return out


def _service_tier(out: dict[str, Any], raw: Raw, usage: Mapping[str, Any]) -> None:
    """The tier the provider actually served (it prices flex, priority and batch apart)."""
    tier = usage.get("service_tier", raw.get("service_tier"))
    if tier is not None:
        out["service_tier"] = tier


def from_openai_chat(raw: Raw) -> dict[str, Any]:
    """Chat Completions / Completions / Embeddings `usage` (prompt_tokens, completion_tokens)."""
    names = ("prompt_tokens", "completion_tokens", "prompt_tokens_details",
             "completion_tokens_details")  # fmt: skip
    out = _openai_tokens(_envelope(raw, "openai"), _usage_object(raw), names)
    _service_tier(out, raw, {})
    return out


def from_openai_responses(raw: Raw) -> dict[str, Any]:
    """Responses API `usage` (input_tokens, output_tokens and their *_details)."""
    out = _envelope(raw, "openai")
    out.setdefault("operation", "responses")
    if out.get("status") == "incomplete":
        out["status"] = "success"  # stopped at max_output_tokens or a filter: still billed
    names = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
    out = _openai_tokens(out, _usage_object(raw), names)
    _service_tier(out, raw, {})
    return out


def from_anthropic(raw: Raw) -> dict[str, Any]:
    """Messages API `usage`: input_tokens EXCLUDE cache reads and writes, so add them back.

    `cache_creation` splits the writes by TTL (5-minute and 1-hour writes are priced apart),
    `server_tool_use.web_search_requests` counts billed web searches, `service_tier` the tier.
    """
    usage = _usage_object(raw)
    out = _envelope(raw, "anthropic")
    out.setdefault("provider", "anthropic")
    uncached = _int(usage.get("input_tokens"))
    created = usage.get("cache_creation_input_tokens")
    read = _int(usage.get("cache_read_input_tokens"))
    by_ttl = usage.get("cache_creation")
    if by_ttl is not None:
        if not isinstance(by_ttl, Mapping):
            raise ShapeError("usage.cache_creation must be an object")
        one_hour = _int(by_ttl.get("ephemeral_1h_input_tokens"))
        if one_hour:
            out["cache_creation_1h_input_tokens"] = one_hour
        if created is None:
            five_minutes = _int(by_ttl.get("ephemeral_5m_input_tokens"))
            if _ints(five_minutes, one_hour):
                created = five_minutes + one_hour
    created = _int(created)
    if _ints(uncached, created, read):
        out["input_tokens"] = uncached + created + read
    else:
        out["input_tokens"] = uncached  # let validation name the wrong type
    out["cached_input_tokens"] = read
    out["cache_creation_input_tokens"] = created
    out["output_tokens"] = _int(usage.get("output_tokens"))
    searches = _details(usage, "server_tool_use", "web_search_requests")
    if searches:
        out["web_search_requests"] = searches
    _service_tier(out, raw, usage)
    return out


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


_GPUSTACK_FIELDS = {
    "model": "model",
    "provider": "provider",
    "operation": "operation",
    "request_id": "request_id",
    "user_id": "user",
    "user": "user",
    "team": "team",
    "input_token": "input_tokens",
    "output_token": "output_tokens",
    "total_token": "total_tokens",
    "input_cached_token": "cached_input_tokens",
    "output_chunk_count": "output_chunk_count",
    "request_content_bytes": "request_content_bytes",
    "completed": "completed",
    "stream": "stream",
    "started_at": "started_at",
    "completed_at": "completed_at",
    "status": "status",
    "error_type": "error_type",
}
_GPUSTACK_IGNORED = frozenset(
    {"id", "model_id", "model_name", "cluster_id", "provider_id", "route", "worker_id"}
)


def from_gpustack(raw: Raw, key_alias: Callable[[str], str]) -> dict[str, Any]:
    """GPUStack gateway-metrics body. `access_key` is replaced by a short, stable alias."""
    unknown = set(raw) - set(_GPUSTACK_FIELDS) - _GPUSTACK_IGNORED - {"access_key", "request_count"}
    if unknown:
        raise ShapeError(f"unknown field(s) for a GPUStack gateway-metrics body: {_names(unknown)}")
    out: dict[str, Any] = {canon: raw[key] for key, canon in _GPUSTACK_FIELDS.items() if key in raw}
    for tokens in ("input_tokens", "output_tokens", "cached_input_tokens"):
        if tokens in out:
            out[tokens] = _int(out[tokens])
    if out.get("total_tokens") is None or out.get("total_tokens") == 0:
        out.pop("total_tokens", None)  # GPUStack sends 0 for unfinished streams
    count = raw.get("request_count", 1)
    if count != 1:
        raise ShapeError("request_count must be 1: send one report per model call")
    key = raw.get("access_key")
    if key is not None:
        if not isinstance(key, str) or not key:
            raise ShapeError("access_key must be a non-empty string")
        out["api_key_id"] = key_alias(key)
    if "completed" in out and out["completed"] is False and "stream" not in out:
        out["stream"] = True
    out["source"] = "gpustack"
    return out


_OTEL_FIELDS = {
    "gen_ai.request.model": "model",
    "gen_ai.response.model": "model",
    "gen_ai.provider.name": "provider",
    "gen_ai.system": "provider",
    "gen_ai.operation.name": "operation",
    "gen_ai.usage.input_tokens": "input_tokens",
    "gen_ai.usage.output_tokens": "output_tokens",
    "gen_ai.usage.cache_read.input_tokens": "cached_input_tokens",
    "gen_ai.usage.cache_read_input_tokens": "cached_input_tokens",
    "gen_ai.usage.cache_creation.input_tokens": "cache_creation_input_tokens",
    "gen_ai.usage.cache_creation_input_tokens": "cache_creation_input_tokens",
    "gen_ai.usage.reasoning_tokens": "reasoning_tokens",
    "gen_ai.usage.reasoning.output_tokens": "reasoning_tokens",
    "gen_ai.response.id": "request_id",
    "gen_ai.conversation.id": "trace_id",
    "gen_ai.agent.name": "node",
    "error.type": "error_type",
    "user.id": "user",
    "enduser.id": "user",
}


def from_otel_attributes(raw: Raw) -> dict[str, Any]:
    """A flat dict of OpenTelemetry GenAI span attributes (semconv `gen_ai.*`)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        canon = _OTEL_FIELDS.get(key)
        if canon is not None:
            if canon == "model" and "model" in out and key == "gen_ai.request.model":
                continue  # the response model is the more precise one
            out[canon] = value
        elif key in _ENVELOPE_FIELDS:
            out[key] = value
        elif not key.startswith(("gen_ai.", "server.", "http.", "url.")):
            raise ShapeError(f"unknown attribute for an OpenTelemetry GenAI item: {_names({key})}")
    if out.get("error_type"):
        out.setdefault("status", "error")
    out["source"] = "otel"
    return out


_GPUSTACK_MARKERS = frozenset({"input_token", "output_token", "access_key", "request_count"})


def adapt(raw: Any, key_alias: Callable[[str], str]) -> Mapping[str, Any]:
    """Recognize an item's shape; return the canonical mapping, aliases of operation and status
    mapped (so the model validates both enums natively)."""
    out = _adapt(raw, key_alias)
    op = out.get("operation")
    if isinstance(op, str) and op not in OPERATION_VALUES:
        out = {**out, "operation": normalize_operation(op)}
    status = out.get("status")
    if isinstance(status, str) and status not in STATUS_VALUES:
        out = {**out, "status": normalize_status(status)}
    return out


def _adapt(raw: Any, key_alias: Callable[[str], str]) -> Mapping[str, Any]:
    """Recognize an item's shape and return the canonical mapping.

    The canonical shape (a `model` key, no provider markers) is returned as it is: it is the
    hot path, and pydantic does not mutate its input.
    """
    if type(raw) is not dict:
        if not isinstance(raw, Mapping):
            raise ShapeError("each report must be a JSON object")
        raw = dict(raw)
    item: dict[str, Any] = raw
    if "usage" in item:
        usage = _usage_object(item)
        if "prompt_tokens" in usage or "completion_tokens" in usage:
            return from_openai_chat(item)
        if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:
            return from_anthropic(item)
        if "input_tokens_details" in usage or "output_tokens_details" in usage:
            return from_openai_responses(item)
        provider = str(item.get("provider", "")).lower()
        kind = item.get("type")
        model = str(item.get("model", "")).lower()
        if provider == "anthropic" or kind == "message" or model.startswith("claude"):
            return from_anthropic(item)
        return from_openai_responses(item)
    if not _GPUSTACK_MARKERS.isdisjoint(item):
        return from_gpustack(item, key_alias)
    if "model" not in item and any(isinstance(k, str) and k.startswith("gen_ai.") for k in item):
        return from_otel_attributes(item)
    return item
