"""LiteLLM's StandardLoggingPayload (what its `generic_api` callback posts, a JSON array of them).

Tokens come from `metadata.usage_object` when LiteLLM kept it (it has the cache details;
`prompt_tokens` there includes cache reads, OpenAI semantics, for every provider), else from the
top-level counts. Who: `end_user`, else the virtual key's user; team and key alias from the
key metadata (`user_api_key_hash` is already a hash, never the key). `response_cost` is
LiteLLM's own price: used only when we cannot price the model (`fallback_cost_usd`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from exporter.ingest.adapters.common import Raw, ShapeError, bounded_tags, details, int_or_zero

__all__ = ["LITELLM_MARKERS", "from_litellm"]

LITELLM_MARKERS = frozenset({"call_type", "litellm_call_id"})
#: spellings LiteLLM uses for cache writes, depending on the provider it normalised from
_CACHE_WRITE = ("cache_creation_tokens", "cache_write_tokens")


def _first_str(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value:
            return value
    return None


def _tokens(out: dict[str, Any], raw: Raw, metadata: Mapping[str, Any]) -> None:
    usage = metadata.get("usage_object")
    if not isinstance(usage, Mapping) or not usage:
        usage = raw
    out["input_tokens"] = int_or_zero(usage.get("prompt_tokens"))
    out["output_tokens"] = int_or_zero(usage.get("completion_tokens"))
    cached = details(usage, "prompt_tokens_details", "cached_tokens")
    if not cached:
        cached = int_or_zero(usage.get("cache_read_input_tokens"))
    written: Any = 0
    for key in _CACHE_WRITE:
        written = details(usage, "prompt_tokens_details", key)
        if written:
            break
    if not written:
        written = int_or_zero(usage.get("cache_creation_input_tokens"))
    out["cached_input_tokens"] = cached
    out["cache_creation_input_tokens"] = written
    out["reasoning_tokens"] = details(usage, "completion_tokens_details", "reasoning_tokens")


def from_litellm(raw: Raw) -> dict[str, Any]:
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise ShapeError("metadata must be an object")
    out: dict[str, Any] = {"source": "litellm"}
    request_id = _first_str(raw.get("litellm_call_id"), raw.get("id"))
    if request_id is not None:
        out["request_id"] = request_id
    if raw.get("model") is not None:
        out["model"] = raw["model"]
    provider = _first_str(raw.get("custom_llm_provider"))
    if provider is not None:
        out["provider"] = provider
    if raw.get("call_type") is not None:
        out["operation"] = raw["call_type"]
    _tokens(out, raw, metadata)
    status = raw.get("status")
    if status is not None:
        out["status"] = status
    if status == "failure":
        info = raw.get("error_information") or {}
        kind = (
            _first_str(info.get("error_class"), info.get("error_code"))
            if isinstance(info, Mapping)
            else None
        )
        out["error_type"] = kind or "error"
    user = _first_str(raw.get("end_user"), metadata.get("user_api_key_end_user_id"),
                      metadata.get("user_api_key_user_id"))  # fmt: skip
    if user is not None:
        out["user"] = user
    team = _first_str(metadata.get("user_api_key_team_id"), metadata.get("team_id"),
                      metadata.get("user_api_key_team_alias"))  # fmt: skip
    if team is not None:
        out["team"] = team
    key_hash = _first_str(metadata.get("user_api_key_hash"))
    alias = _first_str(metadata.get("user_api_key_alias"))
    if alias is not None:
        out["api_key_id"] = alias
    elif key_hash is not None:
        out["api_key_id"] = f"litellm-{key_hash[:12]}"
    trace = _first_str(raw.get("trace_id"))
    if trace is not None:
        out["trace_id"] = trace
    if raw.get("stream") is not None:
        out["stream"] = raw["stream"]
    start, end = raw.get("startTime"), raw.get("endTime")
    if start is not None:
        out["started_at"] = start
    if end is not None:
        out["completed_at"] = end
    first = raw.get("completionStartTime")
    if raw.get("stream") and isinstance(start, int | float) and isinstance(first, int | float):
        ttft = (first - start) * 1000
        if ttft >= 0:
            out["ttft_ms"] = ttft
    cost = raw.get("response_cost")
    if isinstance(cost, int | float) and not isinstance(cost, bool) and cost > 0:
        out["fallback_cost_usd"] = float(cost)
    tags = metadata.get("spend_logs_metadata")
    if isinstance(tags, Mapping) and tags:
        out["tags"] = bounded_tags(tags)
    return out
