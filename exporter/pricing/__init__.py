"""Billed units → USD at the report's own time: exact, cached on each rate's validity interval.

`genai_prices.calc_price` costs ~65 µs a call, far too much for the ingest hot path, and its own
lookup caches grow with every distinct model string (a hostile client could fill memory). So a
(provider, model, service tier) is resolved once per validity interval of its prices into
integer rates (`rates.Rates`), kept in a bounded cache: the hot path is a dict hit, two
datetime comparisons and a few integer multiply-adds. The result equals genai-prices'
`calc_price(...).total_price` at the report's `completed_at`, exactly, after the one rounding
rule of `exporter.money` (tests compare on a seeded corpus and on the whole snapshot).

* Event time: prices are those of `completed_at` (start-date changes such as o3's 2025-06-10
  cut, time-of-day prices such as deepseek's off-peak hours);
* tier: `service_tier` selects genai-prices request variants (flex, priority, batch, ...);
* every billed unit a report carries is priced (cache writes by TTL, audio and image tokens,
  reasoning tokens, web searches); a positive count of a non-token unit the prices cannot
  price makes the report unpriced ("unknown_unit") rather than silently cheaper;
* a user price file (YAML or TOML) adds or overrides models, per validity interval, and always
  wins over genai-prices inside its entries' intervals.

The class is a pure calculator: it neither logs nor counts. It returns a Decimal at the storage
scale or an `Unpriced` reason, and raises `CostOverCap` above the per-report cap.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from genai_prices import data_snapshot

from exporter.money import (
    COST_QUANTUM,
    MAX_COST_UNITS,
    MAX_COST_USD,
    CostOverCap,
    from_units,
    round_units,
)
from exporter.pricing.pricefile import (
    EARLIEST,
    LATEST,
    PriceEntry,
    PriceFile,
    UserPrice,
    load_price_file,
    norm_provider,
)
from exporter.pricing.rates import (
    USAGE_FIELDS,
    Rates,
    build_rates,
    check_model_price,
    find_model,
    price_context,
    validity,
)

__all__ = ["USAGE_FIELDS", "PriceEntry", "PriceFile", "Pricer", "Unpriced"]

CACHE_MAX_KEYS = 10_000  # bounds memory against endless distinct (provider, model) strings
INTERVALS_PER_KEY = 8  # resolved intervals kept per key (historical reports, time of day)
REFRESH_SECONDS = 3600.0  # drop resolved rates hourly so a refreshed genai-prices snapshot is used


class Unpriced(StrEnum):
    """Why a report has no cost (the `reason` label of llm_usage_unpriced_reports_total)."""

    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_UNIT = "unknown_unit"
    INVALID_USAGE = "invalid_usage"


@dataclass(frozen=True, slots=True)
class _Entry:
    """Resolved prices of one key on [start, end); `rates is None` caches a miss."""

    start: datetime
    end: datetime
    rates: Rates | None
    miss: Unpriced


class Pricer:
    """Prices a report's billed units at its `completed_at`."""

    def __init__(self, price_file: Path | None = None) -> None:
        self._user: dict[tuple[str, str], tuple[UserPrice, ...]] = (
            load_price_file(Path(price_file), check_model_price) if price_file is not None else {}
        )
        # a report without a provider matches the provider-less entry, else the first one
        self._user_any_provider: dict[str, tuple[UserPrice, ...]] = {}
        for (provider, model), prices in self._user.items():
            if provider == "" or model not in self._user_any_provider:
                self._user_any_provider[model] = prices
        self._cache: dict[tuple[str, str, str], list[_Entry]] = {}
        self._clock: Callable[[], float] = time.monotonic
        self._refresh_at = self._clock() + REFRESH_SECONDS

    def refresh_if_due(self) -> None:
        """Called once per batch: drop resolved rates hourly (a new snapshot may be in use)."""
        now = self._clock()
        if now >= self._refresh_at:
            self._cache.clear()
            self._refresh_at = now + REFRESH_SECONDS

    def price(self, report: Mapping[str, Any]) -> Decimal | Unpriced:
        """USD at the storage scale, or why not. `report`: UsageReport fields (its __dict__ or
        an audit row), `completed_at` an aware UTC datetime. CostOverCap above the cap."""
        at: datetime = report["completed_at"]
        key = (report["provider"], report["model"], report.get("service_tier") or "")
        entries = self._cache.get(key)
        entry = None
        if entries is not None:
            first = entries[0]
            if first.start <= at < first.end:
                entry = first
            else:
                for candidate in entries:
                    if candidate.start <= at < candidate.end:
                        entry = candidate
                        break
        if entry is None:
            entry = self._resolve(key, at)
        rates = entry.rates
        if rates is None:
            return entry.miss
        for name in rates.unpriceable:
            if report[name]:
                return Unpriced.UNKNOWN_UNIT
        # Rates.units, inlined: this is the per-report hot path
        if rates.checks and not rates.consistent(report):
            return Unpriced.INVALID_USAGE
        thresholds = rates.thresholds
        i = bisect_left(thresholds, report["input_tokens"]) if thresholds else 0
        total = rates.fixed[i]
        for name, c in rates.bands[i]:
            total += c * report[name]
        multiplier = rates.multiplier
        units = total * multiplier if multiplier else round_units(total, rates.exponent)
        if units > MAX_COST_UNITS:
            raise CostOverCap(
                f"computed cost {from_units(units)} USD is above the cap of {MAX_COST_USD} USD "
                "per report"
            )
        return Decimal(units) * COST_QUANTUM  # money.from_units, inlined

    # -- resolution (cache misses only) ------------------------------------------------------

    def _user_prices(self, provider: str, model: str) -> tuple[UserPrice, ...]:
        norm = norm_provider(provider)
        if norm:
            return self._user.get((norm, model)) or self._user.get(("", model)) or ()
        return self._user_any_provider.get(model, ())

    def _resolve(self, key: tuple[str, str, str], at: datetime) -> _Entry:
        provider, model, tier = key
        lo, hi = EARLIEST, LATEST
        entry: _Entry | None = None
        for user in self._user_prices(provider, model):
            if user.start <= at < user.end:
                entry = _Entry(
                    user.start, user.end, build_rates(user.price), Unpriced.UNKNOWN_MODEL
                )
                break
            if user.end <= at:
                lo = max(lo, user.end)
            else:
                hi = min(hi, user.start)
        if entry is None:
            entry = _resolve_genai(provider, model, tier, at, lo, hi)
        entries = self._cache.get(key)
        if entries is None:
            if len(self._cache) >= CACHE_MAX_KEYS:
                del self._cache[next(iter(self._cache))]  # evict the oldest key; O(1)
            self._cache[key] = [entry]
        else:
            entries.insert(0, entry)
            del entries[INTERVALS_PER_KEY:]
        return entry


def _resolve_genai(
    provider: str, model: str, tier: str, at: datetime, lo: datetime, hi: datetime
) -> _Entry:
    """genai-prices' prices at `at` (within [lo, hi), the gap between user entries)."""
    providers = data_snapshot.get_snapshot().providers
    found = find_model(providers, provider or None, model)
    if found is None:
        return _Entry(lo, hi, None, Unpriced.UNKNOWN_MODEL)
    info, own = found
    start, end = validity(info, at, lo, hi)
    context = price_context(tier) if own else None
    try:
        rates = build_rates(info.get_prices(at, context))
    except (ValueError, KeyError, TypeError):
        # genai-prices would raise on every call for this model
        return _Entry(start, end, None, Unpriced.INVALID_USAGE)
    return _Entry(start, end, rates, Unpriced.UNKNOWN_MODEL)
