"""GPUStack's gateway-metrics body (`ModelUsageMetrics`) → canonical.

GPUStack posts its pydantic model as it is: besides the token counts it carries its own ids
(`model_id`, `model_route_id`, `cluster_id`, `provider_id`, integers), `provider_name` (the
operator's name for a provider) and `provider_type` (openai, anthropic, …, what prices it).
Unknown keys are ignored, so a newer GPUStack keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporter.ingest.adapters.common import Raw, ShapeError, int_or_zero

__all__ = ["GPUSTACK_MARKERS", "from_gpustack"]

_FIELDS = {
    "model": "model",
    "provider": "provider",
    "operation": "operation",
    "request_id": "request_id",
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
    "tags": "tags",
}
#: GPUStack ids are integers; our identities are strings
_ID_FIELDS = {"user_id": "user", "organization_id": "team"}
GPUSTACK_MARKERS = frozenset(
    {"input_token", "output_token", "access_key", "request_count", "model_route_id"}
)


def _ident(value: Any) -> Any:
    return str(value) if type(value) is int else value


def from_gpustack(raw: Raw, key_alias: Callable[[str], str]) -> dict[str, Any]:
    """GPUStack gateway-metrics body. `access_key` is replaced by a short, stable alias."""
    out: dict[str, Any] = {
        canon: raw[key] for key, canon in _FIELDS.items() if raw.get(key) is not None
    }
    for key, canon in _ID_FIELDS.items():
        if raw.get(key) is not None and canon not in out:
            out[canon] = _ident(raw[key])
    if "provider" not in out and isinstance(raw.get("provider_type"), str):
        out["provider"] = raw["provider_type"]
    for tokens in ("input_tokens", "output_tokens", "cached_input_tokens"):
        if tokens in out:
            out[tokens] = int_or_zero(out[tokens])
    if not out.get("total_tokens"):
        out.pop("total_tokens", None)  # GPUStack sends 0 for unfinished streams
    for stamp in ("started_at", "completed_at"):
        if out.get(stamp) == 0:
            del out[stamp]  # legacy GPUStack sends 0 for "absent"
    count = raw.get("request_count", 1)
    if count != 1:
        raise ShapeError("request_count must be 1: send one report per model call")
    access: Any = raw.get("access_key")
    if access is not None:
        if not isinstance(access, str) or not access:
            raise ShapeError("access_key must be a non-empty string")
        out["api_key_id"] = key_alias(access)
    if out.get("completed") is False and "stream" not in out:
        out["stream"] = True
    out["source"] = "gpustack"
    return out
