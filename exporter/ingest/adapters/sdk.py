"""OpenAI and Anthropic response bodies (what their SDKs' `model_dump()` returns) → canonical.

OpenAI counts cached input inside input and reasoning inside output, like we do; Anthropic
reports input, cache reads and cache writes disjointly, so they are added back. Usage keys we
do not map are counted in `UNKNOWN_USAGE_FIELDS` (exposed as a self-metric) and logged once:
a new usage number a provider starts sending must be visible, not silently dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily

from exporter.ingest.adapters.common import (
    Raw,
    ShapeError,
    details,
    envelope,
    int_or_zero,
    usage_object,
)

__all__ = [
    "UNKNOWN_USAGE_FIELDS",
    "UnknownUsageCollector",
    "from_anthropic",
    "from_openai_chat",
    "from_openai_responses",
]

log = logging.getLogger(__name__)

#: (shape, usage key) → count of reports carrying it; bounded so hostile keys cannot grow it
UNKNOWN_USAGE_FIELDS: Counter[tuple[str, str]] = Counter()
_MAX_UNKNOWN = 50

#: usage keys each shape documents (read, or known to carry no token count we bill)
_KNOWN_USAGE = {
    "openai": frozenset(
        {
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "prompt_tokens_details",
            "completion_tokens_details",
            "input_tokens",
            "output_tokens",
            "input_tokens_details",
            "output_tokens_details",
            "cost",  # OpenRouter and LiteLLM proxies add it; we price ourselves
            "cost_details",
            "is_byok",
        }
    ),
    "anthropic": frozenset(
        {
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "cache_creation",  # writes split by TTL (ephemeral_5m/1h): the sum is above
            "server_tool_use",
            "service_tier",
            "inference_geo",
        }
    ),
}


class UnknownUsageCollector:
    """`llm_usage_unknown_usage_fields_total{shape}`: reports whose usage block carried a key
    no adapter reads (the key names go to the log once, never to labels: they are input)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "llm_usage_unknown_usage_fields",
            "Usage keys seen that no adapter reads, by provider shape (names in the log).",
            labels=["shape"],
        )
        by_shape: Counter[str] = Counter(dict.fromkeys(_KNOWN_USAGE, 0))
        for (shape, _key), n in UNKNOWN_USAGE_FIELDS.items():
            by_shape[shape] += n
        for shape, n in sorted(by_shape.items()):
            family.add_metric([shape], n)
        yield family


def _note_unknown(shape: str, usage: Mapping[str, Any]) -> None:
    known = _KNOWN_USAGE[shape]
    for key in usage:
        if key in known or not isinstance(key, str):
            continue
        item = (shape, key[:64])
        if item in UNKNOWN_USAGE_FIELDS:
            UNKNOWN_USAGE_FIELDS[item] += 1
        elif len(UNKNOWN_USAGE_FIELDS) < _MAX_UNKNOWN:
            UNKNOWN_USAGE_FIELDS[item] = 1
            log.warning("%s usage carries a field we do not read: %r (counted)", shape, key[:64])
        else:  # past the bound: still counted, no longer named
            UNKNOWN_USAGE_FIELDS[(shape, "__other__")] += 1


def _openai_tokens(
    out: dict[str, Any], usage: Mapping[str, Any], names: tuple[str, str, str, str]
) -> dict[str, Any]:
    input_key, output_key, input_details, output_details = names
    _note_unknown("openai", usage)
    out["input_tokens"] = int_or_zero(usage.get(input_key))
    out["output_tokens"] = int_or_zero(usage.get(output_key))
    out["cached_input_tokens"] = details(usage, input_details, "cached_tokens")
    # cache writes (prompt caching with explicit breakpoints) are counted inside input too
    out["cache_creation_input_tokens"] = details(usage, input_details, "cache_write_tokens")
    out["reasoning_tokens"] = details(usage, output_details, "reasoning_tokens")
    # audio and image tokens (realtime, audio and image models) are parts of input/output too
    for part, field, canon in (
        (input_details, "audio_tokens", "input_audio_tokens"),
        (input_details, "image_tokens", "input_image_tokens"),
        (output_details, "audio_tokens", "output_audio_tokens"),
        (output_details, "image_tokens", "output_image_tokens"),
    ):
        value = details(usage, part, field)
        if value:
            out[canon] = value
    cached = usage.get(input_details)
    if isinstance(cached, Mapping) and cached.get("cached_tokens_details") is not None:
        value = details(cached, "cached_tokens_details", "audio_tokens")
        if value:
            out["cached_audio_input_tokens"] = value
    if usage.get("total_tokens") is not None:
        out["total_tokens"] = usage["total_tokens"]
    return out


def _service_tier(out: dict[str, Any], raw: Raw, usage: Mapping[str, Any]) -> dict[str, Any]:
    """The tier the provider actually served (flex, priority and batch are priced apart)."""
    tier = usage.get("service_tier", raw.get("service_tier"))
    if tier is not None:
        out["service_tier"] = tier
    return out


_CHAT_NAMES = ("prompt_tokens", "completion_tokens", "prompt_tokens_details",
               "completion_tokens_details")  # fmt: skip
_RESPONSES_NAMES = ("input_tokens", "output_tokens", "input_tokens_details",
                    "output_tokens_details")  # fmt: skip


def from_openai_chat(raw: Raw) -> dict[str, Any]:
    """Chat Completions / Completions / Embeddings `usage` (prompt_tokens, completion_tokens).

    No provider is assumed: OpenAI-compatible gateways (LiteLLM, OpenRouter, vLLM) serve Claude
    and Llama in this shape; the provider is inferred from the model id afterwards."""
    out = _openai_tokens(envelope(raw, "openai"), usage_object(raw), _CHAT_NAMES)
    return _service_tier(out, raw, {})


def from_openai_responses(raw: Raw) -> dict[str, Any]:
    """Responses API `usage` (input_tokens, output_tokens and their *_details)."""
    out = envelope(raw, "openai")
    out.setdefault("operation", "responses")
    if out.get("status") in ("incomplete", "in_progress", "queued"):
        out["status"] = "success"  # stopped at max_output_tokens or a filter: still billed
    return _service_tier(_openai_tokens(out, usage_object(raw), _RESPONSES_NAMES), raw, {})


def from_anthropic(raw: Raw) -> dict[str, Any]:
    """Messages API `usage`: input_tokens EXCLUDE cache reads and writes, so add them back.

    `cache_creation` splits the writes by TTL (1-hour writes are priced apart from 5-minute
    ones), `server_tool_use.web_search_requests` counts billed searches, `service_tier` the tier.
    """
    usage = usage_object(raw)
    _note_unknown("anthropic", usage)
    out = envelope(raw, "anthropic")
    out.setdefault("provider", "anthropic")
    uncached = int_or_zero(usage.get("input_tokens"))
    created = int_or_zero(usage.get("cache_creation_input_tokens"))
    read = int_or_zero(usage.get("cache_read_input_tokens"))
    by_ttl = usage.get("cache_creation")
    if isinstance(by_ttl, Mapping):
        one_hour = int_or_zero(by_ttl.get("ephemeral_1h_input_tokens"))
        if one_hour:
            out["cache_creation_1h_input_tokens"] = one_hour
        if not created:
            parts = [int_or_zero(v) for v in by_ttl.values()]
            if all(type(v) is int for v in parts):
                created = sum(parts)
    if all(type(v) is int for v in (uncached, created, read)):
        out["input_tokens"] = uncached + created + read
    else:
        out["input_tokens"] = uncached  # let validation name the wrong type
    out["cached_input_tokens"] = read
    out["cache_creation_input_tokens"] = created
    out["output_tokens"] = int_or_zero(usage.get("output_tokens"))
    searches = details(usage, "server_tool_use", "web_search_requests")
    if searches:
        out["web_search_requests"] = searches
    return _service_tier(out, raw, usage)


def looks_anthropic(item: Raw, usage: Mapping[str, Any]) -> bool:
    if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:
        return True
    provider = str(item.get("provider", "")).lower()
    model = str(item.get("model", "")).lower()
    return provider == "anthropic" or item.get("type") == "message" or model.startswith("claude")


def adapt_usage_body(item: Raw) -> dict[str, Any]:
    """A body with a `usage` object: OpenAI Chat/Embeddings, OpenAI Responses or Anthropic."""
    usage = usage_object(item)
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return from_openai_chat(item)
    if looks_anthropic(item, usage):
        return from_anthropic(item)
    if "input_tokens" in usage or "output_tokens" in usage or not usage:
        return from_openai_responses(item)
    raise ShapeError("usage object has none of the token fields of a known provider shape")
