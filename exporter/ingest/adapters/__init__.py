"""Provider shapes → the canonical report dict (validated afterwards by UsageReport).

Each adapter only renames and does token arithmetic; types are left for pydantic to judge, so
a wrong type anywhere surfaces as one clear validation error. Provider shapes ignore body keys
they do not know (providers add fields all the time); the canonical shape stays strict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from exporter.ingest.adapters.common import ShapeError
from exporter.ingest.adapters.gpustack import GPUSTACK_MARKERS, from_gpustack
from exporter.ingest.adapters.litellm import LITELLM_MARKERS, from_litellm
from exporter.ingest.adapters.otel import DEFAULT_USER_ATTRIBUTES, from_otel_attributes
from exporter.ingest.adapters.providers import canonical_provider, infer
from exporter.ingest.adapters.sdk import (
    UNKNOWN_USAGE_FIELDS,
    adapt_usage_body,
    from_anthropic,
    from_openai_chat,
    from_openai_responses,
)
from exporter.usage import (
    OPERATION_VALUES,
    STATUS_VALUES,
    normalize_operation,
    normalize_status,
)

__all__ = [
    "FALLBACK_COST",
    "UNKNOWN_USAGE_FIELDS",
    "ShapeError",
    "adapt",
    "from_anthropic",
    "from_gpustack",
    "from_litellm",
    "from_openai_chat",
    "from_openai_responses",
    "from_otel_attributes",
    "inferred",
]

#: key an adapter sets for a client-computed cost that counts only when we cannot price
FALLBACK_COST = "fallback_cost_usd"
_MARKERS = LITELLM_MARKERS | GPUSTACK_MARKERS
#: provider spellings already canonical: the hot path skips inference for them
_CANONICAL_PROVIDERS = frozenset({"openai", "anthropic", "google", "aws", "azure", "mistral",
                                  "groq", "deepseek", "cohere", "x-ai", "openrouter"})  # fmt: skip


def adapt(
    raw: Any,
    key_alias: Callable[[str], str],
    user_attributes: Sequence[str] = DEFAULT_USER_ATTRIBUTES,
) -> Mapping[str, Any]:
    """Recognize an item's shape; return the canonical mapping with operation and status
    aliases mapped (so the model validates both enums natively) and the provider inferred
    from the model id when the report does not name it."""
    out = _adapt(raw, key_alias, user_attributes)
    op = out.get("operation")
    if isinstance(op, str) and op not in OPERATION_VALUES:
        out = {**out, "operation": normalize_operation(op)}
    status = out.get("status")
    if isinstance(status, str) and status not in STATUS_VALUES:
        out = {**out, "status": normalize_status(status)}
    model = out.get("model")
    provider = out.get("provider", "")
    if type(model) is str and type(provider) is str:
        changed = inferred(model, provider)
        if changed is not None:
            out = {**out, "model": changed[0], "provider": changed[1]}
    return out


def inferred(model: str, provider: str) -> tuple[str, str] | None:
    """The (model, provider) inferred from the model id, or None when they stay as sent (the
    hot path: a canonical provider spelling and no prefix in the model id)."""
    if provider in _CANONICAL_PROVIDERS and "/" not in model:
        return None
    new = infer(model, provider)
    return None if new == (model, provider) else new


def _adapt(
    raw: Any, key_alias: Callable[[str], str], user_attributes: Sequence[str]
) -> Mapping[str, Any]:
    """The canonical shape (a `model` key, no provider markers) is returned as it is: it is the
    hot path, and pydantic does not mutate its input."""
    if type(raw) is not dict:
        if not isinstance(raw, Mapping):
            raise ShapeError("each report must be a JSON object")
        raw = dict(raw)
    item: dict[str, Any] = raw
    if "usage" in item:
        return adapt_usage_body(item)
    if not _MARKERS.isdisjoint(item):  # one set test on the (canonical) hot path
        if not LITELLM_MARKERS.isdisjoint(item):
            return from_litellm(item)
        return from_gpustack(item, key_alias)
    if "model" not in item and any(
        isinstance(k, str) and k.startswith(("gen_ai.", "ai.usage.", "ai.model.")) for k in item
    ):
        return from_otel_attributes(item, user_attributes)
    return item


def provider_label(provider: str) -> str:
    """The canonical spelling of a provider name (for callers outside the adapters)."""
    return canonical_provider(provider)
