"""The independent oracle for stored costs: genai-prices' public `calc_price` on a report's own
billed units at its own `completed_at`, then the documented rule (docs/pricing.md): half-even
at 1e-10 USD. Nothing here imports the exporter's pricing code.

Semantics written down independently of exporter/pricing:
* counts are inclusive as genai-prices wants them (cache reads and writes inside input tokens,
  1-hour cache writes inside cache writes, reasoning/audio/image inside their direction);
* `service_tier` is the request context `{"service_tier": tier}`, except "batch", which is
  `{"processing": "batch"}`;
* a positive count of a non-token unit (web searches) the model's prices cannot price (no
  price for it nor for a more general unit) is unpriced, "unknown_unit" (token kinds follow
  genai-prices: unpriced ones cost nothing); an unknown model "unknown_model"; usage
  genai-prices refuses "invalid_usage".
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelPrice
from genai_prices.units import _get_registry

Q = Decimal("1e-10")

# report field → genai-prices usage key
REPORT_UNITS: dict[str, str] = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cached_input_tokens": "cache_read_tokens",
    "cache_creation_input_tokens": "cache_write_tokens",
    "cache_creation_1h_input_tokens": "cache_write_1h_tokens",
    "reasoning_tokens": "output_reasoning_tokens",
    "input_audio_tokens": "input_audio_tokens",
    "cached_audio_input_tokens": "cache_audio_read_tokens",
    "output_audio_tokens": "output_audio_tokens",
    "input_image_tokens": "input_image_tokens",
    "output_image_tokens": "output_image_tokens",
    "web_search_requests": "web_searches",
}


def usage_of(report: Mapping[str, Any]) -> Usage:
    return Usage(**{key: int(report.get(field) or 0) for field, key in REPORT_UNITS.items()})


def context_of(tier: str) -> dict[str, str] | None:
    if not tier:
        return None
    return {"processing": "batch"} if tier == "batch" else {"service_tier": tier}


def rounded(value: Decimal) -> Decimal:
    return value.quantize(Q, rounding=ROUND_HALF_EVEN)


def _unpriceable(report: Mapping[str, Any], model_price: ModelPrice) -> bool:
    registry = _get_registry()
    priced = []
    for key, value in model_price.__dict__.items():
        if value is None or key.startswith("_"):
            continue
        try:
            priced.append(registry.unit_for_price_key(key))
        except KeyError:
            continue
    for field, key in REPORT_UNITS.items():
        if not report.get(field):
            continue
        unit = registry.units[key]
        if unit.dimensions.get("family") == "tokens":
            continue
        if not any(p.dimensions.items() <= unit.dimensions.items() for p in priced):
            return True
    return False


def expected_cost(report: Mapping[str, Any]) -> Decimal | str:
    """The stored cost a report must get: a Decimal at 1e-10, or the unpriced reason."""
    at: datetime = report["completed_at"]
    provider = report.get("provider") or None
    model_ref = report["model"]
    try:
        _, info = get_snapshot().find_provider_model(model_ref, None, provider, None)
    except LookupError:
        return "unknown_model"
    usage = usage_of(report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            calc = calc_price(
                usage,
                model_ref,
                provider_id=provider,
                genai_request_timestamp=at,
                price_context=context_of(report.get("service_tier") or ""),
            )
        except ValueError:
            calc = None
    model_price = calc.model_price if calc is not None else info.get_prices(at)
    if _unpriceable(report, model_price):
        return "unknown_unit"
    if calc is None:
        return "invalid_usage"
    return rounded(calc.total_price)


def expected_with_prices(report: Mapping[str, Any], model_price: ModelPrice) -> Decimal | str:
    """The same rule for a user price (a price file entry), via genai-prices' ModelPrice."""
    if _unpriceable(report, model_price):
        return "unknown_unit"
    return rounded(model_price.calc_price(usage_of(report))["total_price"])
