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


def _get(obj: Any, key: str) -> Any:
    """`obj[key]` of a mapping or `obj.key` of an SDK object: reading attributes avoids
    `model_dump()`, which costs tens of microseconds on the caller's path."""
    if isinstance(obj, dict):  # a concrete class check: isinstance(x, Mapping) costs ~1 µs
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None and isinstance(obj, Mapping):
        return obj.get(key)
    return value


def _has(obj: Any, key: str) -> bool:
    if isinstance(obj, dict):
        return key in obj
    return _get(obj, key) is not None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_fields(usage: Any) -> dict[str, int]:
    """Canonical token fields of one usage object (dict or SDK object), whichever provider's
    shape it has."""
    if _has(usage, "prompt_tokens") or _has(usage, "completion_tokens"):  # OpenAI chat, embed
        prompt = _get(usage, "prompt_tokens_details")
        completion = _get(usage, "completion_tokens_details")
        return {
            "input_tokens": _int(_get(usage, "prompt_tokens")),
            "output_tokens": _int(_get(usage, "completion_tokens")),
            "cached_input_tokens": _int(_get(prompt, "cached_tokens")),
            "cache_creation_input_tokens": _int(_get(prompt, "cache_write_tokens")),
            "reasoning_tokens": _int(_get(completion, "reasoning_tokens")),
        }
    anthropic = _has(usage, "cache_read_input_tokens") or _has(usage, "cache_creation_input_tokens")
    if anthropic and not _has(usage, "input_tokens_details"):
        # Anthropic: input_tokens excludes cache reads and writes
        read = _int(_get(usage, "cache_read_input_tokens"))
        write = _int(_get(usage, "cache_creation_input_tokens"))
        return {
            "input_tokens": _int(_get(usage, "input_tokens")) + read + write,
            "output_tokens": _int(_get(usage, "output_tokens")),
            "cached_input_tokens": read,
            "cache_creation_input_tokens": write,
            "reasoning_tokens": 0,
        }
    # OpenAI Responses API
    inp = _get(usage, "input_tokens_details")
    out = _get(usage, "output_tokens_details")
    return {
        "input_tokens": _int(_get(usage, "input_tokens")),
        "output_tokens": _int(_get(usage, "output_tokens")),
        "cached_input_tokens": _int(_get(inp, "cached_tokens")),
        "cache_creation_input_tokens": _int(_get(inp, "cache_write_tokens")),
        "reasoning_tokens": _int(_get(out, "reasoning_tokens")),
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
    if response is None:
        return {}
    usage = _get(response, "usage")
    fields: dict[str, Any] = usage_fields(usage) if usage is not None else {}
    kind = _get(response, "object") or _get(response, "type")
    model = _get(response, "model")
    if isinstance(model, str):
        fields["model"] = model
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
        kind = _get(event, "type") or _get(event, "object")
        if kind == "message_start":
            self.fields.update(usage_from_response(_get(event, "message")))
        elif kind == "message_delta":
            usage = _get(event, "usage")
            if _has(usage, "output_tokens"):
                self.fields["output_tokens"] = _int(_get(usage, "output_tokens"))
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.fields.update(usage_from_response(_get(event, "response")))
        elif _get(event, "usage") is not None or (
            "model" not in self.fields and isinstance(_get(event, "model"), str)
        ):
            self.fields.update(usage_from_response(event))
