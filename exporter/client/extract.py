"""Token usage out of OpenAI and Anthropic response objects (or their dicts), in canonical fields.

The SDK sends the canonical report shape: `input_tokens` counts ALL input tokens, cache reads
and writes included (OpenAI semantics); Anthropic reports them disjointly, so they are added
here. Objects are read through `model_dump()` when they have it (the openai/anthropic SDKs'
pydantic models), so neither SDK is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["StreamUsage", "as_dict", "usage_fields", "usage_from_response"]


def as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict of an SDK object (pydantic `model_dump`) or a mapping; {} otherwise."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        result = dump()
        return dict(result) if isinstance(result, Mapping) else {}
    return {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = usage.get(key)
    return value if isinstance(value, Mapping) else {}


def usage_fields(usage: Mapping[str, Any]) -> dict[str, int]:
    """Canonical token fields of one usage object, whichever provider's shape it has."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # OpenAI chat / embeddings
        prompt = _details(usage, "prompt_tokens_details")
        completion = _details(usage, "completion_tokens_details")
        return {
            "input_tokens": _int(usage.get("prompt_tokens")),
            "output_tokens": _int(usage.get("completion_tokens")),
            "cached_input_tokens": _int(prompt.get("cached_tokens")),
            "cache_creation_input_tokens": _int(prompt.get("cache_write_tokens")),
            "reasoning_tokens": _int(completion.get("reasoning_tokens")),
        }
    anthropic_keys = "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage
    if anthropic_keys and "input_tokens_details" not in usage:
        # Anthropic: input_tokens excludes cache reads and writes
        read = _int(usage.get("cache_read_input_tokens"))
        write = _int(usage.get("cache_creation_input_tokens"))
        return {
            "input_tokens": _int(usage.get("input_tokens")) + read + write,
            "output_tokens": _int(usage.get("output_tokens")),
            "cached_input_tokens": read,
            "cache_creation_input_tokens": write,
            "reasoning_tokens": 0,
        }
    # OpenAI Responses API
    inp = _details(usage, "input_tokens_details")
    out = _details(usage, "output_tokens_details")
    return {
        "input_tokens": _int(usage.get("input_tokens")),
        "output_tokens": _int(usage.get("output_tokens")),
        "cached_input_tokens": _int(inp.get("cached_tokens")),
        "cache_creation_input_tokens": _int(inp.get("cache_write_tokens")),
        "reasoning_tokens": _int(out.get("reasoning_tokens")),
    }


_OPERATIONS = {
    "chat.completion": "chat",
    "chat.completion.chunk": "chat",
    "text_completion": "completion",
    "response": "responses",
    "list": "embedding",
    "message": "chat",
}


def usage_from_response(response: Any) -> dict[str, Any]:
    """Canonical fields (model, provider, operation, tokens) of a finished response.

    Accepts OpenAI ChatCompletion / final stream chunk / Response / CreateEmbeddingResponse /
    Completion and Anthropic Message, as objects or dicts. Missing usage gives zero tokens.
    """
    body = as_dict(response)
    usage = body.get("usage")
    fields: dict[str, Any] = usage_fields(usage) if isinstance(usage, Mapping) else {}
    kind = body.get("object") or body.get("type")
    if isinstance(body.get("model"), str):
        fields["model"] = body["model"]
    if kind == "message":
        fields["provider"] = "anthropic"
    elif isinstance(kind, str) and kind in _OPERATIONS:
        fields["provider"] = "openai"
    if isinstance(kind, str) and kind in _OPERATIONS:
        fields["operation"] = _OPERATIONS[kind]
    return fields


class StreamUsage:
    """Accumulates usage from a stream of events or chunks, in any of the SDKs' shapes.

    OpenAI chat streams carry usage on the last chunk (with `stream_options.include_usage`);
    Responses streams on the `response.completed` event; Anthropic on `message_start` (input)
    and `message_delta` (cumulative output).
    """

    __slots__ = ("chunks", "fields")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.chunks = 0

    def observe(self, event: Any) -> None:
        self.chunks += 1
        body = as_dict(event)
        kind = body.get("type") or body.get("object")
        if kind == "message_start":
            self.fields.update(usage_from_response(body.get("message")))
        elif kind == "message_delta":
            usage = body.get("usage")
            if isinstance(usage, Mapping) and "output_tokens" in usage:
                self.fields["output_tokens"] = _int(usage.get("output_tokens"))
        elif isinstance(kind, str) and kind.startswith("response.") and "response" in body:
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.fields.update(usage_from_response(body["response"]))
        elif body.get("usage") or "model" in body:
            found = usage_from_response(body)
            if not body.get("usage"):
                found = {k: v for k, v in found.items() if not k.endswith("_tokens")}
            self.fields.update(found)
