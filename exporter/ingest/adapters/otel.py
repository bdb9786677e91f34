"""OpenTelemetry GenAI attributes (a span's, or a flat dict posted to /v1/usage) → canonical.

Instrumentations in the wild spell the same numbers differently; each canonical field reads
the first present of its spellings, newest semconv first:

- semconv ≥ 1.36 `gen_ai.usage.input_tokens`, `cache_read.input_tokens`,
  `cache_creation.input_tokens` (and `cache_write.input_tokens`, Anthropic's SDK spans and
  opentelemetry-util-genai), `reasoning.output_tokens`;
- pre-1.0 `gen_ai.usage.prompt_tokens` / `completion_tokens` (older OpenLLMetry);
- OpenLIT's `gen_ai.usage.prompt_tokens_details.*`;
- Vercel AI SDK's `ai.usage.*` (`promptTokens`, `inputTokens`, `cachedInputTokens`, `tokens` for
  `embed()`), `ai.model.*`, `ai.telemetry.metadata.*`.

Anthropic's semantics (input excluding the cache) are recognised by provider: a span of an
Anthropic model reporting more cache tokens than input tokens has the cache added back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from exporter.config import DEFAULT_USER_ATTRIBUTES
from exporter.ingest.adapters.common import ENVELOPE_FIELDS, Raw, bounded_tags

__all__ = [
    "DEFAULT_USER_ATTRIBUTES",
    "TAG_PREFIXES",
    "USAGE_KEYS",
    "from_otel_attributes",
    "is_genai",
    "is_usage",
]

#: attribute prefixes whose rest becomes a tag (user-set association properties / metadata)
TAG_PREFIXES = ("traceloop.association.properties.", "ai.telemetry.metadata.", "llm_usage.tag.")

_SPELLINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("gen_ai.response.model", "gen_ai.request.model", "ai.response.model",
               "ai.model.id")),
    ("provider", ("gen_ai.provider.name", "gen_ai.system", "ai.model.provider")),
    ("operation", ("gen_ai.operation.name", "llm.request.type")),
    ("input_tokens", ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens",
                      "ai.usage.inputTokens", "ai.usage.promptTokens", "ai.usage.tokens")),
    ("output_tokens", ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens",
                       "ai.usage.outputTokens", "ai.usage.completionTokens")),
    ("cached_input_tokens", ("gen_ai.usage.cache_read.input_tokens",
                             "gen_ai.usage.cache_read_input_tokens",
                             "gen_ai.usage.prompt_tokens_details.cached_tokens",
                             "ai.usage.inputTokenDetails.cacheReadTokens",
                             "ai.usage.cachedInputTokens")),
    ("cache_creation_input_tokens", ("gen_ai.usage.cache_creation.input_tokens",
                                     "gen_ai.usage.cache_write.input_tokens",
                                     "gen_ai.usage.cache_creation_input_tokens",
                                     "gen_ai.usage.prompt_tokens_details.cache_creation_tokens",
                                     "ai.usage.inputTokenDetails.cacheWriteTokens")),
    ("reasoning_tokens", ("gen_ai.usage.reasoning.output_tokens",
                          "gen_ai.usage.reasoning_tokens",
                          "gen_ai.usage.completion_tokens_details.reasoning_tokens",
                          "ai.usage.outputTokenDetails.reasoningTokens",
                          "ai.usage.reasoningTokens")),
    ("request_id", ("gen_ai.response.id", "ai.response.id")),
    ("trace_id", ("gen_ai.conversation.id",)),
    ("node", ("gen_ai.agent.name",)),
    ("error_type", ("error.type",)),
)  # fmt: skip
USAGE_KEYS = frozenset(
    k for canon, keys in _SPELLINGS if canon in ("input_tokens", "output_tokens") for k in keys
)
_GENAI_MARKERS = ("gen_ai.operation.name", "gen_ai.request.model", "gen_ai.system",
                  "gen_ai.provider.name", "ai.model.id")  # fmt: skip
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens",
                 "cache_creation_input_tokens", "reasoning_tokens")  # fmt: skip
_VERCEL_OPERATIONS = {".doGenerate": "chat", ".doStream": "chat", ".doEmbed": "embedding"}
_TTFT_SECONDS = ("gen_ai.response.time_to_first_chunk", "gen_ai.server.time_to_first_token")
_ANTHROPIC_PROVIDERS = frozenset({"anthropic", "aws.bedrock", "aws_bedrock", "gcp.vertex_ai"})


def is_usage(attrs: Mapping[str, Any]) -> bool:
    """Does this span carry token counts? Vercel's outer `ai.generateText` spans repeat the sum
    of their provider-call children (`….doGenerate`), so only the children count."""
    operation_id = attrs.get("ai.operationId")
    if isinstance(operation_id, str) and not operation_id.endswith(tuple(_VERCEL_OPERATIONS)):
        return False
    return any(k in attrs for k in USAGE_KEYS)


def is_genai(attrs: Mapping[str, Any]) -> bool:
    """A model call span (used for failed calls, which carry no usage)."""
    operation_id = attrs.get("ai.operationId")
    if isinstance(operation_id, str) and not operation_id.endswith(tuple(_VERCEL_OPERATIONS)):
        return False
    return any(k in attrs for k in _GENAI_MARKERS)


def _number(value: Any) -> Any:
    # some SDKs send every number as a double, JS ones as strings
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is str and value.isdigit():
        return int(value)
    return value


def _text(value: Any) -> Any:
    return str(value) if type(value) is int else value


def from_otel_attributes(
    raw: Raw,
    user_attributes: Sequence[str] = DEFAULT_USER_ATTRIBUTES,
    *,
    envelope: bool = True,
) -> dict[str, Any]:
    """A flat dict of OpenTelemetry GenAI attributes. Keys we do not know are ignored.

    `envelope`: canonical field names are read too (a flat dict posted to /v1/usage may carry
    `request_id`, `user`...); a span's attributes are not (an `id` or `status` there is not ours).
    """
    out: dict[str, Any] = (
        {k: raw[k] for k in ENVELOPE_FIELDS if raw.get(k) is not None} if envelope else {}
    )
    for canon, keys in _SPELLINGS:
        if canon in out:
            continue
        for key in keys:
            value = raw.get(key)
            if value is not None:
                out[canon] = value
                break
    for canon in _TOKEN_FIELDS:
        if canon in out:
            out[canon] = _number(out[canon])
    if "operation" not in out:
        operation_id = raw.get("ai.operationId")
        if isinstance(operation_id, str):
            for suffix, op in _VERCEL_OPERATIONS.items():
                if operation_id.endswith(suffix):
                    out["operation"] = op
    provider = out.get("provider")
    if isinstance(provider, str) and raw.get("ai.model.provider") == provider:
        out["provider"] = provider.split(".", 1)[0]  # Vercel: "anthropic.messages"
    if "user" not in out:
        for key in user_attributes:
            value = raw.get(key)
            if value is not None and value != "":
                out["user"] = _text(value)
                break
    for key in ("request_id", "trace_id", "node"):
        if key in out:
            out[key] = _text(out[key])
    tags = _tags(raw)
    if tags and "tags" not in out:
        out["tags"] = tags
    for key in _TTFT_SECONDS:
        ttft = raw.get(key)
        if isinstance(ttft, int | float) and not isinstance(ttft, bool) and "ttft_ms" not in out:
            out["ttft_ms"] = ttft * 1000
    if type(raw.get("ai.response.msToFirstChunk")) in (int, float):
        out.setdefault("ttft_ms", raw["ai.response.msToFirstChunk"])
    _anthropic_input(out)
    if out.get("error_type"):
        out.setdefault("status", "error")
    out["source"] = "otel"
    return out


def _tags(raw: Raw) -> dict[str, str]:
    tags: dict[str, Any] = {}
    for key, value in raw.items():
        for prefix in TAG_PREFIXES:
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if name not in ("user_id", "userId"):
                    tags[name] = value
    return bounded_tags(tags) if tags else {}


def _anthropic_input(out: dict[str, Any]) -> None:
    provider = str(out.get("provider", "")).lower()
    model = str(out.get("model", "")).lower()
    if provider not in _ANTHROPIC_PROVIDERS and "claude" not in model:
        return
    values = [out.get(k, 0) for k in ("input_tokens", "cached_input_tokens",
                                       "cache_creation_input_tokens")]  # fmt: skip
    if all(type(v) is int for v in values) and values[1] + values[2] > values[0]:
        out["input_tokens"] = values[0] + values[1] + values[2]
