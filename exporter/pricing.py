"""Tokens → USD: genai-prices rates resolved once per (provider, model), then plain arithmetic.

`genai_prices.calc_price` costs ~65 µs a call, far too much for the ingest hot path, and its own
lookup caches grow with every distinct model string (a hostile client could fill memory). So we
resolve a model's prices once, turn them into per-token rates for the four token kinds a
`UsageReport` carries, and keep them in a bounded cache. The rates reproduce genai-prices
exactly (tests compare against `calc_price` on a grid and with hypothesis):

* a report's `input_tokens` includes cache reads and cache writes (genai-prices `Usage`
  semantics); each priced unit is charged for its "leaf" count (its usage minus the usage of its
  priced descendants), so cache tokens fall back to the input rate when a model has no cache
  price;
* tiered prices use the whole request's input token count: crossing a tier start applies that
  tier's rate to all tokens (`total_input_tokens > tier.start`);
* conditional prices (a start date, or an off-peak time of day) are resolved for "now"; a
  cache entry expires when the choice could change, and at least hourly so a refreshed price
  snapshot is picked up.

A user price file (YAML or TOML) adds or overrides models and always wins over genai-prices.
The class is a pure calculator: it neither logs nor counts; `None` means "unpriced".
"""

from __future__ import annotations

import math
import time
import tomllib
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, TypeGuard

import yaml
from genai_prices import data_snapshot
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["PriceEntry", "PriceFile", "Pricer"]

CACHE_MAX_ENTRIES = 10_000  # bounds memory against endless distinct (provider, model) strings
RESOLVE_TTL_SECONDS = 3600.0  # re-resolve hourly so an updated genai-prices snapshot is used
_MTOK = 1_000_000

# The four genai-prices usage keys a UsageReport fills, and how each decomposes into the
# disjoint quantities we are called with: (fresh input, cache read, cache write, output), where
# fresh input = input_tokens - cached_input_tokens - cache_creation_input_tokens.
_Vector = tuple[int, int, int, int]
_REPORTED: dict[str, _Vector] = {
    "input_tokens": (1, 1, 1, 0),
    "cache_read_tokens": (0, 1, 0, 0),
    "cache_write_tokens": (0, 0, 1, 0),
    "output_tokens": (0, 0, 0, 1),
}
_ZERO: _Vector = (0, 0, 0, 0)

# Per-token USD rates for one tier band: fresh input, cache read, cache write, output, and a
# fixed per-request amount (genai-prices `requests_kcount`).
_Band = tuple[float, float, float, float, float]


@dataclass(frozen=True, slots=True)
class _Rates:
    """Resolved rates: `bands[i]` applies when `thresholds[i-1] < input_tokens <= thresholds[i]`."""

    thresholds: tuple[int, ...]
    bands: tuple[_Band, ...]


@dataclass(slots=True)
class _Entry:
    """A cache slot; `rates is None` caches a miss so unpriced models stay cheap too."""

    rates: _Rates | None
    expires: float


# ---------------------------------------------------------------------------------------------
# user price file


NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PriceEntry(BaseModel):
    """One user-priced model; USD per million tokens, cache rates default to the input rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=256)
    provider: str | None = Field(default=None, min_length=1, max_length=256)
    input_mtok: NonNegative
    output_mtok: NonNegative
    cache_read_mtok: NonNegative | None = None
    cache_write_mtok: NonNegative | None = None

    def rates(self) -> _Rates:
        """Flat (untiered) per-token rates."""
        cache_read = self.input_mtok if self.cache_read_mtok is None else self.cache_read_mtok
        cache_write = self.input_mtok if self.cache_write_mtok is None else self.cache_write_mtok
        band: _Band = (
            self.input_mtok / _MTOK,
            cache_read / _MTOK,
            cache_write / _MTOK,
            self.output_mtok / _MTOK,
            0.0,
        )
        return _Rates(thresholds=(), bands=(band,))


class PriceFile(BaseModel):
    """The user price file: `models:` a list of entries."""

    model_config = ConfigDict(extra="forbid")

    models: list[PriceEntry] = Field(default_factory=list)


def _norm_provider(provider: str | None) -> str:
    return (provider or "").strip().lower()


def _load_price_file(path: Path) -> dict[tuple[str, str], _Rates]:
    """Parse and validate; every failure becomes a ValueError naming the file."""
    if not path.is_file():
        raise ValueError(f"price file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        raw: Any
        if suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        elif suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ValueError("the file name must end in .yaml, .yml or .toml")
        if not isinstance(raw, Mapping):
            raise ValueError("expected a mapping with a 'models' list at the top level")
        parsed = PriceFile.model_validate(raw)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read price file {path}: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"invalid price file {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"invalid price file {path}: {exc}") from exc
    table: dict[tuple[str, str], _Rates] = {}
    for entry in parsed.models:
        key = (_norm_provider(entry.provider), entry.model)
        if key in table:
            who = f"provider {entry.provider!r}" if entry.provider else "any provider"
            raise ValueError(
                f"invalid price file {path}: model {entry.model!r} for {who} is listed twice"
            )
        table[key] = entry.rates()
    return table


# ---------------------------------------------------------------------------------------------
# genai-prices → linear rates


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


def _find_model(
    providers: list[Provider], provider_id: str | None, model_ref: str
) -> ModelInfo | None:
    """Mirror `DataSnapshot.find_provider_model` (litellm prefixes, fallbacks, dated refs)."""
    model_ref = model_ref.lower()
    if provider_id and provider_id.lower() == "litellm" and "/" in model_ref:
        actual_provider, actual_ref = model_ref.split("/", 1)
        if actual_provider and find_provider_by_id(providers, actual_provider):
            provider_id, model_ref = actual_provider, actual_ref
    provider = _find_provider(providers, model_ref, provider_id)
    if provider is None:
        return None
    return provider.find_model(model_ref, all_providers=providers)


def _next_change(model: ModelInfo, now: datetime) -> float:
    """Unix time when `model.get_prices` may pick a different conditional price."""
    if isinstance(model.prices, ModelPrice):
        return math.inf
    candidates: list[datetime] = []
    for conditional in model.prices:
        constraint = conditional.constraint
        if isinstance(constraint, StartDateConstraint):
            start = datetime.combine(constraint.start_date, datetime.min.time(), UTC)
            if start > now:
                candidates.append(start)
        elif isinstance(constraint, TimeOfDateConstraint):
            for moment in (constraint.start_time, constraint.end_time):
                # as genai-prices does: naive times are UTC, aware ones converted to UTC
                if moment.tzinfo is None:
                    utc_moment = moment.replace(tzinfo=UTC)
                else:
                    utc_moment = datetime.combine(date(1970, 1, 1), moment).astimezone(UTC).timetz()
                at = datetime.combine(now.date(), utc_moment)
                while at <= now:
                    at += timedelta(days=1)
                candidates.append(at)
    return min(candidates).timestamp() if candidates else math.inf


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


def _valid_decimal(value: object) -> bool:
    return isinstance(value, Decimal) and value.is_finite() and value >= 0


def _valid_price(value: object) -> TypeGuard[Decimal | TieredPrices]:
    """genai-prices' `_validate_model_price_value`: finite, non-negative, ordered int tiers."""
    if isinstance(value, TieredPrices):
        previous = -1
        for tier in value.tiers:
            if (
                type(tier.start) is not int
                or tier.start < previous
                or not _valid_decimal(tier.price)
            ):
                return False
            previous = tier.start
        return _valid_decimal(value.base)
    return _valid_decimal(value)


def _leaf_vectors(units: Sequence[UnitDef]) -> dict[str, _Vector]:
    """genai-prices' `compute_leaf_values`, symbolically over our four disjoint quantities.

    A unit is charged for its usage minus what its priced descendants already charged. Usage keys
    a report never fills are zero (genai-prices infers 0 for them here).
    """
    ordered = sorted(units, key=lambda unit: (-len(unit.dimensions), unit.usage_key))
    leaves: dict[str, _Vector] = {}
    for unit in ordered:
        vector = list(_REPORTED.get(unit.usage_key, _ZERO))
        for other in ordered:
            if other is not unit and is_descendant_or_self(unit, other):
                for i, value in enumerate(leaves[other.usage_key]):
                    vector[i] -= value
        if any(value < 0 for value in vector):
            raise ValueError(f"cannot decompose usage for {unit.usage_key}")
        leaves[unit.usage_key] = (vector[0], vector[1], vector[2], vector[3])
    return leaves


def _tier_price(price: Decimal | TieredPrices, input_tokens: int) -> Decimal:
    """genai-prices' `calc_unit_price` rule: the highest tier whose start is below the input."""
    if not isinstance(price, TieredPrices):
        return price
    applicable = price.base
    for tier in reversed(price.tiers):
        if input_tokens > tier.start:
            applicable = tier.price
            break
    return applicable


def _rates_from_model_price(model_price: ModelPrice) -> _Rates:
    registry = _get_registry()
    priced = _priced_units(model_price, registry)
    validate_priced_units(tuple(unit for unit, _ in priced), registry)
    leaves = _leaf_vectors([unit for unit, _ in priced])
    starts: set[int] = set()
    for _, price in priced:
        if isinstance(price, TieredPrices):
            starts.update(tier.start for tier in price.tiers)
    thresholds = tuple(sorted(starts))
    # one representative input count per band: band 0 is input <= thresholds[0], band i is
    # thresholds[i-1] < input <= thresholds[i]
    representatives = [0, *(start + 1 for start in thresholds)]
    bands: list[_Band] = []
    for input_tokens in representatives:
        sums = [Decimal(0)] * 5
        for unit, price in priced:
            rate = _tier_price(price, input_tokens) / unit.per
            if unit.usage_key == "requests":
                sums[4] += rate  # genai-prices counts one request per call
                continue
            for i, coefficient in enumerate(leaves[unit.usage_key]):
                if coefficient:
                    sums[i] += rate * coefficient
        bands.append(
            (float(sums[0]), float(sums[1]), float(sums[2]), float(sums[3]), float(sums[4]))
        )
    return _Rates(thresholds=thresholds, bands=tuple(bands))


def _resolve_genai(provider: str, model: str, now: float) -> tuple[_Rates | None, float]:
    """Rates for "now" and when they expire; unknown or unusable price data → None."""
    expires = now + RESOLVE_TTL_SECONDS
    providers = data_snapshot.get_snapshot().providers
    info = _find_model(providers, provider or None, model)
    if info is None:
        return None, expires
    moment = datetime.fromtimestamp(now, UTC)
    try:
        rates = _rates_from_model_price(info.get_prices(moment))
    except (ValueError, KeyError, TypeError):
        return None, expires  # genai-prices would raise on every call for this model
    return rates, min(expires, _next_change(info, moment))


# ---------------------------------------------------------------------------------------------


class Pricer:
    """Prices token counts in USD; returns None for unpriced models (the caller counts those)."""

    def __init__(self, price_file: Path | None = None) -> None:
        self._user: dict[tuple[str, str], _Rates] = (
            _load_price_file(Path(price_file)) if price_file is not None else {}
        )
        self._user_any_provider: dict[str, _Rates] = {}
        for (provider, model), rates in self._user.items():
            # a report without a provider matches the provider-less entry, else the first one
            if provider == "" or model not in self._user_any_provider:
                self._user_any_provider[model] = rates
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._clock: Callable[[], float] = time.time

    def cost(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        cache_creation_input_tokens: int,
    ) -> float | None:
        """USD, or None when the model is unpriced."""
        fresh = input_tokens - cached_input_tokens - cache_creation_input_tokens
        if (
            fresh < 0
            or output_tokens < 0
            or cached_input_tokens < 0
            or cache_creation_input_tokens < 0
        ):
            raise ValueError(
                "token counts must be non-negative and input_tokens must include "
                "cached_input_tokens and cache_creation_input_tokens"
            )
        key = (provider, model)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is None or entry.expires <= now:
            entry = self._resolve(key, now)
        rates = entry.rates
        if rates is None:
            return None
        band = (
            rates.bands[bisect_left(rates.thresholds, input_tokens)]
            if rates.thresholds
            else rates.bands[0]
        )
        return (
            band[0] * fresh
            + band[1] * cached_input_tokens
            + band[2] * cache_creation_input_tokens
            + band[3] * output_tokens
            + band[4]
        )

    def _resolve(self, key: tuple[str, str], now: float) -> _Entry:
        provider, model = key
        rates: _Rates | None
        norm = _norm_provider(provider)
        if norm:
            rates = self._user.get((norm, model)) or self._user.get(("", model))
        else:
            rates = self._user_any_provider.get(model)
        if rates is not None:
            expires = math.inf
        else:
            rates, expires = _resolve_genai(provider, model, now)
        entry = _Entry(rates, expires)
        cache = self._cache
        if key not in cache and len(cache) >= CACHE_MAX_ENTRIES:
            del cache[next(iter(cache))]  # evict the oldest insertion; O(1), no hot-path upkeep
        cache[key] = entry
        return entry
