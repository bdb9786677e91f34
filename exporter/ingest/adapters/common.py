"""What every provider shape shares: the error type, the envelope, null-tolerant numbers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from exporter.usage import MAX_TAG_KEY, MAX_TAG_VALUE, MAX_TAGS

__all__ = [
    "ENVELOPE_FIELDS",
    "Raw",
    "ShapeError",
    "bounded_tags",
    "details",
    "envelope",
    "int_or_zero",
    "names",
    "usage_object",
]

Raw = Mapping[str, Any]

#: Canonical fields a provider body may carry next to its own (a gateway adds who and when).
ENVELOPE_FIELDS = (
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
    "tags",
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


def names(keys: set[str], limit: int = 10) -> str:
    """Field names for an error message, bounded: a hostile body must not echo megabytes."""
    shown = [k if len(k) <= 64 else k[:64] + "…" for k in sorted(keys)[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{shown}{more}"


def int_or_zero(value: Any) -> Any:
    """Pass-through that treats a JSON null token count as 0 (providers send null)."""
    return 0 if value is None else value


def usage_object(raw: Raw, key: str = "usage") -> Mapping[str, Any]:
    usage = raw[key]
    if not isinstance(usage, Mapping):
        raise ShapeError(f"{key} must be an object")
    return usage


def details(usage: Mapping[str, Any], key: str, field: str) -> Any:
    """`usage[key][field]`, 0 when either is absent or null."""
    value = usage.get(key)
    if value is None:
        return 0
    if not isinstance(value, Mapping):
        raise ShapeError(f"usage.{key} must be an object")
    return int_or_zero(value.get(field))


def envelope(raw: Raw, source: str) -> dict[str, Any]:
    """The canonical fields of a provider body. Every other body key is ignored: providers add
    fields every month (`moderation`, `obfuscation`, `stop_details`...) and a gateway must be
    able to post the object its SDK returned as it is. Usage numbers are read by the caller."""
    # providers send null for absent values (a Responses object has "user": null)
    out: dict[str, Any] = {k: raw[k] for k in ENVELOPE_FIELDS if raw.get(k) is not None}
    if "request_id" not in out and isinstance(raw.get("id"), str):
        out["request_id"] = raw["id"]
    if "operation" not in out:
        kind = raw.get("object", raw.get("type"))
        if isinstance(kind, str) and kind in _OBJECT_OPERATIONS:
            out["operation"] = _OBJECT_OPERATIONS[kind]
    out["source"] = source
    return out


_NOT_TAG_KEY = re.compile(r"[^A-Za-z0-9_.-]")


def bounded_tags(raw: Mapping[Any, Any]) -> dict[str, str]:
    """Tags taken from a client's free-form metadata (LiteLLM, OTel attributes), made to fit
    the canonical bounds instead of refusing the usage they come with: keys sanitized and cut,
    values cut, NUL replaced, the first `MAX_TAGS` keys in sorted order kept."""
    out: dict[str, str] = {}
    for key in sorted(str(k) for k in raw)[: MAX_TAGS * 4]:
        name = _NOT_TAG_KEY.sub("_", key)[:MAX_TAG_KEY]
        value = raw.get(key)
        if not name or name in out or not isinstance(value, str | int | float | bool):
            continue
        out[name] = str(value).replace("\x00", "\ufffd")[:MAX_TAG_VALUE]
        if len(out) == MAX_TAGS:
            break
    return out
