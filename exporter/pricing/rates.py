"""genai-prices data → exact integer rates over a report's billed units, and their validity.

genai-prices prices a call as Σ over priced units of price × leaf count / per, where a unit's
leaf count is its usage minus the leaf counts of its priced descendants (cache reads are a part
of input tokens, 1-hour cache writes a part of cache writes, ...). Leaf counts are linear in the
reported counts, so for one resolved `ModelPrice` the whole price is a dot product of the
report's counts with fixed coefficients. We compute those coefficients once, in Decimal, and
keep them as integers at a common power of ten: pricing a report is then a few integer
multiply-adds (exact, no float) and one half-even rounding at the storage scale.

Tiered prices switch on the whole request's input tokens (`input_tokens > tier.start`), so a
rate holds one coefficient set per tier band. Conditional prices (start dates, time of day) and
request variants (service tier, batch) are resolved for one moment; `validity` gives the
interval around that moment on which the same prices hold, the cache key of a resolved rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeGuard

from genai_prices.data_snapshot import find_provider_by_id
from genai_prices.decompose import is_descendant_or_self
from genai_prices.types import (
    ModelInfo,
    ModelPrice,
    Provider,
    StartDateConstraint,
    TieredPrices,
    TimeOfDateConstraint,
)
from genai_prices.units import UnitDef, UnitRegistry, _get_registry
from genai_prices.validation import validate_priced_units

from exporter.money import COST_SCALE

_POW10 = tuple(10**i for i in range(COST_SCALE + 1))

__all__ = [
    "USAGE_FIELDS",
    "Rates",
    "build_rates",
    "check_model_price",
    "find_model",
    "price_context",
    "validity",
]

#: genai-prices usage key → the UsageReport field that carries it (counts are inclusive, as in
#: genai-prices: cache reads are part of input tokens, 1h cache writes part of cache writes).
USAGE_FIELDS: Mapping[str, str] = {
    "input_tokens": "input_tokens",
    "cache_read_tokens": "cached_input_tokens",
    "cache_write_tokens": "cache_creation_input_tokens",
    "cache_write_1h_tokens": "cache_creation_1h_input_tokens",
    "output_tokens": "output_tokens",
    "output_reasoning_tokens": "reasoning_tokens",
    "input_audio_tokens": "input_audio_tokens",
    "cache_audio_read_tokens": "cached_audio_input_tokens",
    "output_audio_tokens": "output_audio_tokens",
    "input_image_tokens": "input_image_tokens",
    "output_image_tokens": "output_image_tokens",
    "web_searches": "web_search_requests",
}

# Inequalities UsageReport validation already guarantees (field → coefficient, value ≥ 0): a
# leaf count that is one of these plus non-negative counts can never be negative.
_VALIDATED: tuple[dict[str, int], ...] = (
    {"input_tokens": 1, "cached_input_tokens": -1, "cache_creation_input_tokens": -1},
    {"cache_creation_input_tokens": 1, "cache_creation_1h_input_tokens": -1},
    {"output_tokens": 1, "reasoning_tokens": -1},
    {"input_tokens": 1, "input_audio_tokens": -1, "input_image_tokens": -1},
    {"output_tokens": 1, "output_audio_tokens": -1, "output_image_tokens": -1},
    {"cached_input_tokens": 1, "cached_audio_input_tokens": -1},
    {"input_audio_tokens": 1, "cached_audio_input_tokens": -1},
)

Terms = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Rates:
    """Integer coefficients at scale 10**-exponent USD per unit of each report field.

    `bands[i]` applies when `thresholds[i-1] < input_tokens <= thresholds[i]`; `fixed[i]` is the
    per-request fee of that band. `unpriceable` lists non-token fields the prices cannot price
    at all (a positive count → unpriced, "unknown_unit"); `checks` are leaf counts that must not be
    negative (genai-prices refuses such usage).
    """

    exponent: int
    thresholds: tuple[int, ...]
    bands: tuple[Terms, ...]
    fixed: tuple[int, ...]
    unpriceable: tuple[str, ...]
    checks: tuple[Terms, ...]
    #: 10**(COST_SCALE - exponent) when no rounding is ever needed, else 0
    multiplier: int

    def consistent(self, counts: Mapping[str, Any]) -> bool:
        """No leaf count is negative (genai-prices refuses such usage)."""
        for check in self.checks:
            total = 0
            for name, c in check:
                total += c * counts[name]
            if total < 0:
                return False
        return True


# -- lookup ------------------------------------------------------------------------------------


def _find_provider(
    providers: list[Provider], model_ref: str, provider_id: str | None
) -> Provider | None:
    """`DataSnapshot.find_provider` without its unbounded per-model-string caches."""
    if provider_id is not None:
        if provider := find_provider_by_id(providers, provider_id):
            return provider
        if provider_id.lower() != "litellm":
            return None
    if model_ref:
        for provider in providers:
            if provider.model_match is not None and provider.model_match.is_match(model_ref):
                return provider
    return None


def find_model(
    providers: list[Provider], provider_id: str | None, model_ref: str
) -> tuple[ModelInfo, bool] | None:
    """Mirror `DataSnapshot.find_provider_model` (litellm prefixes, fallbacks, dated refs).

    The flag says whether the model is the provider's own: genai-prices applies request
    variants (service tier) only then.
    """
    model_ref = model_ref.lower()
    if provider_id and provider_id.lower() == "litellm" and "/" in model_ref:
        actual_provider, actual_ref = model_ref.split("/", 1)
        if actual_provider and find_provider_by_id(providers, actual_provider):
            provider_id, model_ref = actual_provider, actual_ref
    provider = _find_provider(providers, model_ref, provider_id)
    if provider is None:
        return None
    info = provider.find_model(model_ref, all_providers=providers)
    if info is None:
        return None
    return info, any(info is m for m in provider.models)


def price_context(service_tier: str) -> dict[str, str] | None:
    """The genai-prices request context of a report's tier ("batch" is a processing mode)."""
    if not service_tier:
        return None
    if service_tier == "batch":
        return {"processing": "batch"}
    return {"service_tier": service_tier}


# -- validity ----------------------------------------------------------------------------------


def _utc_time_of_day(moment: Any) -> Any:
    # as genai-prices does: naive times are UTC, aware ones converted to UTC
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return datetime.combine(date(1970, 1, 1), moment).astimezone(UTC).timetz()


def validity(
    info: ModelInfo, at: datetime, lo: datetime, hi: datetime
) -> tuple[datetime, datetime]:
    """The interval [start, end) around `at`, within [lo, hi), on which `info.get_prices` (with
    any context) picks the same prices: bounded by every start date and time-of-day edge."""
    start, end = lo, hi
    constraints: list[Any] = []
    if not isinstance(info.prices, ModelPrice):
        constraints += [c.constraint for c in info.prices]
    constraints += [v.constraint for v in info.price_variants or ()]
    for constraint in constraints:
        if isinstance(constraint, StartDateConstraint):
            edges = [datetime.combine(constraint.start_date, datetime.min.time(), UTC)]
        elif isinstance(constraint, TimeOfDateConstraint):
            edges = []
            for moment in (constraint.start_time, constraint.end_time):
                edge = datetime.combine(at.date(), _utc_time_of_day(moment))
                edges += [edge - timedelta(days=1), edge, edge + timedelta(days=1)]
        else:
            continue
        for edge in edges:
            if edge <= at:
                start = max(start, edge)
            else:
                end = min(end, edge)
    return start, end


# -- rates -------------------------------------------------------------------------------------


def _valid_decimal(value: object) -> bool:
    return isinstance(value, Decimal) and value.is_finite() and value >= 0


def _valid_price(value: object) -> TypeGuard[Decimal | TieredPrices]:
    """genai-prices' `_validate_model_price_value`: finite, non-negative, ordered int tiers."""
    if isinstance(value, TieredPrices):
        previous = -1
        for tier in value.tiers:
            if (
                type(tier.start) is not int
                or tier.start < max(previous, 0)
                or not _valid_decimal(tier.price)
            ):
                return False
            previous = tier.start
        return _valid_decimal(value.base)
    return _valid_decimal(value)


def _priced_units(
    model_price: ModelPrice, registry: UnitRegistry
) -> list[tuple[UnitDef, Decimal | TieredPrices]]:
    """The price keys genai-prices would use; unknown keys are ignored as it does (it warns)."""
    priced: list[tuple[UnitDef, Decimal | TieredPrices]] = []
    for key, value in model_price.__dict__.items():
        if key.startswith("_") or value is None:
            continue
        try:
            unit = registry.unit_for_price_key(key)
        except KeyError:
            continue
        if not _valid_price(value):
            raise ValueError(f"invalid price value for {key}")  # genai-prices raises too
        priced.append((unit, value))
    return priced


def check_model_price(model_price: ModelPrice) -> None:
    """ValueError if genai-prices would refuse to price with these prices."""
    registry = _get_registry()
    priced = _priced_units(model_price, registry)
    validate_priced_units(tuple(unit for unit, _ in priced), registry)


def _leaf_vectors(units: Sequence[UnitDef]) -> dict[str, dict[str, int]]:
    """genai-prices' `compute_leaf_values`, symbolically: field → coefficient per priced unit."""
    ordered = sorted(units, key=lambda unit: (-len(unit.dimensions), unit.usage_key))
    leaves: dict[str, dict[str, int]] = {}
    for unit in ordered:
        field = USAGE_FIELDS.get(unit.usage_key)
        vector = {field: 1} if field else {}
        for other in ordered:
            if other is not unit and is_descendant_or_self(unit, other):
                for name, c in leaves[other.usage_key].items():
                    vector[name] = vector.get(name, 0) - c
        leaves[unit.usage_key] = {k: c for k, c in vector.items() if c}
    return leaves


def _implied(vector: Mapping[str, int]) -> bool:
    if all(c >= 0 for c in vector.values()):
        return True
    for w in _VALIDATED:
        names = vector.keys() | w.keys()
        if all(vector.get(n, 0) - w.get(n, 0) >= 0 for n in names):
            return True
    return False


def _tier_price(price: Decimal | TieredPrices, input_tokens: int) -> Decimal:
    """genai-prices' `calc_unit_price` rule: the highest tier whose start is below the input."""
    if not isinstance(price, TieredPrices):
        return price
    for tier in reversed(price.tiers):
        if input_tokens > tier.start:
            return tier.price
    return price.base


def _exponent(values: Sequence[Decimal]) -> int:
    exponent = 0
    for value in values:
        exp = value.normalize().as_tuple().exponent
        assert isinstance(exp, int)
        exponent = max(exponent, -exp)
    return exponent


def build_rates(model_price: ModelPrice) -> Rates:
    """ValueError when genai-prices would refuse these prices (it raises on every call)."""
    registry = _get_registry()
    priced = _priced_units(model_price, registry)
    validate_priced_units(tuple(unit for unit, _ in priced), registry)
    token_units = [unit for unit, _ in priced if unit.usage_key != "requests"]
    leaves = _leaf_vectors(token_units)
    # units outside the token family (web searches, ...) that nothing prices: a positive count
    # would otherwise be silently free. Tokens keep genai-prices' rule (an unpriced token kind
    # costs nothing, e.g. output tokens of an embedding model).
    unpriceable = tuple(
        field
        for key, field in USAGE_FIELDS.items()
        if registry.units[key].dimensions.get("family") != "tokens"
        and not any(is_descendant_or_self(unit, registry.units[key]) for unit in token_units)
    )
    checks = tuple(tuple(sorted(leaf.items())) for leaf in leaves.values() if not _implied(leaf))
    thresholds = tuple(
        sorted({t.start for _, p in priced if isinstance(p, TieredPrices) for t in p.tiers})
    )
    # one representative input count per band: band 0 is input <= thresholds[0], band i is
    # thresholds[i-1] < input <= thresholds[i]
    raw_bands: list[dict[str, Decimal]] = []
    raw_fixed: list[Decimal] = []
    for input_tokens in (0, *(start + 1 for start in thresholds)):
        coefficients: dict[str, Decimal] = {}
        fixed = Decimal(0)
        for unit, price in priced:
            rate = _tier_price(price, input_tokens) / unit.per
            if unit.usage_key == "requests":
                fixed += rate  # genai-prices counts one request per call
                continue
            for name, c in leaves[unit.usage_key].items():
                coefficients[name] = coefficients.get(name, Decimal(0)) + rate * c
        raw_bands.append(coefficients)
        raw_fixed.append(fixed)
    exponent = _exponent([c for band in raw_bands for c in band.values()] + raw_fixed)
    scale = Decimal(10) ** exponent
    bands = tuple(
        tuple(sorted((name, int(c * scale)) for name, c in band.items() if c)) for band in raw_bands
    )
    fixed_ints = tuple(int(f * scale) for f in raw_fixed)
    multiplier = _POW10[COST_SCALE - exponent] if exponent <= COST_SCALE else 0
    return Rates(exponent, thresholds, bands, fixed_ints, unpriceable, checks, multiplier)
