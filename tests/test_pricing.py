"""Pricer must equal genai-prices' own `calc_price(...).total_price` at the report's time, exactly.

Exact: Decimal equality after the one documented rounding (half-even at 1e-10 USD). Every
expected value is computed here by calling genai_prices (tests/pricing_oracle.py), never
hard-coded.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import genai_prices.data_snapshot
import pytest
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelPrice, TieredPrices
from hypothesis import given, settings
from hypothesis import strategies as st
from pricing_oracle import expected_cost, expected_with_prices, usage_of

from exporter import pricing
from exporter.money import CostOverCap
from exporter.pricing import Pricer, Unpriced
from exporter.pricing import rates as rates_module

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
UNITS = (
    "input_tokens", "output_tokens", "cached_input_tokens", "cache_creation_input_tokens",
    "cache_creation_1h_input_tokens", "reasoning_tokens", "input_audio_tokens",
    "cached_audio_input_tokens", "output_audio_tokens", "input_image_tokens",
    "output_image_tokens", "web_search_requests",
)  # fmt: skip


def rep(
    model: str, provider: str = "", at: datetime = NOW, tier: str = "", **units: int
) -> dict[str, Any]:
    r: dict[str, Any] = dict.fromkeys(UNITS, 0)
    r.update(units)
    r.update(model=model, provider=provider, completed_at=at, service_tier=tier)
    return r


def got(pricer: Pricer, r: dict[str, Any]) -> Decimal | str:
    value = pricer.price(r)
    return value.value if isinstance(value, Unpriced) else value


def check(pricer: Pricer, r: dict[str, Any]) -> Decimal | str:
    want = expected_cost(r)
    assert got(pricer, r) == want, r
    assert got(pricer, r) == want, r  # and again from the cache
    return want


GRID_MODELS: list[tuple[str, str]] = [
    ("", "gpt-4o"),
    ("openai", "gpt-4o"),
    ("", "gpt-4o-mini"),
    ("openai", "o1"),
    ("", "o3"),
    ("anthropic", "claude-3-5-sonnet-latest"),
    ("", "claude-sonnet-4-5"),  # tiered above 200k input, 1h cache writes, web search
    ("anthropic", "claude-opus-4-1"),
    ("Anthropic", "Claude-3-5-Sonnet-Latest"),  # ids and providers are case-insensitive
    ("", "gemini-1.5-pro"),  # tiered above 128k input
    ("google", "gemini-2.5-pro"),  # tiered above 200k input, cache reads tiered too
    ("google-vertex", "gemini-2.5-flash"),  # provider alias via provider_match
    ("azure", "gpt-4o"),  # provider falling back to another provider's prices
    ("litellm", "openai/gpt-4o"),  # litellm provider prefix
    ("openai", "gpt-5.2-20251211"),  # compact dated ref normalised
    ("perplexity", "sonar"),  # per-request fee (requests_kcount)
    ("", "deepseek-chat"),  # off-peak price by time of day
    ("openai", "gpt-4o-audio-preview"),  # audio tokens priced apart
    ("openai", "gpt-realtime"),  # audio, cached audio
    ("openai", "gpt-image-1"),  # image tokens
    ("", "no-such-model-xyz"),  # unpriced
    ("openai", "claude-3-5-sonnet-latest"),  # not sold by that provider: unpriced
    ("no-such-provider", "gpt-4o"),  # unknown provider: unpriced, no guessing
]

MIXES: list[dict[str, int]] = [
    {},
    {"input_tokens": 1},
    {"output_tokens": 1},
    {"input_tokens": 1000, "output_tokens": 250},
    {"input_tokens": 1000, "output_tokens": 250, "cached_input_tokens": 400},
    {"input_tokens": 1000, "output_tokens": 250, "cache_creation_input_tokens": 300},
    {"input_tokens": 1000, "output_tokens": 250, "cache_creation_input_tokens": 300,
     "cache_creation_1h_input_tokens": 120, "cached_input_tokens": 400},
    {"input_tokens": 5000, "output_tokens": 900, "reasoning_tokens": 700},
    {"input_tokens": 2000, "output_tokens": 10, "web_search_requests": 3},
    {"input_tokens": 3000, "output_tokens": 800, "input_audio_tokens": 1200,
     "cached_input_tokens": 500, "cached_audio_input_tokens": 200, "output_audio_tokens": 600},
    {"input_tokens": 3000, "output_tokens": 4000, "input_image_tokens": 1000,
     "output_image_tokens": 3500},
    {"input_tokens": 1_234_567, "output_tokens": 89_012, "cached_input_tokens": 345_678,
     "cache_creation_input_tokens": 12_345},
]  # fmt: skip


def _tier_starts(provider: str, model: str) -> set[int]:
    """Tier thresholds as genai-prices stores them (read from its data, not hard-coded)."""
    try:
        _, info = get_snapshot().find_provider_model(model, None, provider or None, None)
    except LookupError:
        return set()
    return {
        t.start
        for v in info.get_prices(NOW).__dict__.values()
        if isinstance(v, TieredPrices)
        for t in v.tiers
    }


def _grid() -> Iterator[tuple[str, str, dict[str, int]]]:
    for provider, model in GRID_MODELS:
        for mix in MIXES:
            yield provider, model, mix
        for start in sorted(_tier_starts(provider, model)):
            for inp in (start - 1, start, start + 1, start + 2):
                yield provider, model, {"input_tokens": inp, "output_tokens": 777}
                yield provider, model, {"input_tokens": inp, "output_tokens": 7,
                                        "cached_input_tokens": inp // 3,
                                        "cache_creation_input_tokens": inp // 5}  # fmt: skip


def test_grid_exercises_tiers_and_every_reason() -> None:
    """Guard the grid itself: tiers, and all unpriced reasons, or those tests are hollow."""
    assert _tier_starts("", "gemini-1.5-pro")
    assert _tier_starts("google", "gemini-2.5-pro")
    pricer = Pricer()
    seen = {type(got(pricer, rep(m, p, **mix))) for p, m, mix in _grid()}
    assert seen == {Decimal, str}
    reasons = {got(pricer, rep(m, p, **mix)) for p, m, mix in _grid()} - {None}
    assert {"unknown_model", "unknown_unit"} <= {r for r in reasons if isinstance(r, str)}


@pytest.mark.parametrize(("provider", "model", "mix"), list(_grid()))
def test_cost_equals_calc_price(provider: str, model: str, mix: dict[str, int]) -> None:
    check(Pricer(), rep(model, provider, **mix))


def test_whole_snapshot_matches_calc_price() -> None:
    """Every model genai-prices knows, by its own provider id and without one, at two times."""
    pricer = Pricer()
    mixes = [
        {},
        {"input_tokens": 10_000, "output_tokens": 2_000, "cached_input_tokens": 3_000,
         "cache_creation_input_tokens": 1_000, "cache_creation_1h_input_tokens": 400,
         "reasoning_tokens": 500},
        {"input_tokens": 300_001, "output_tokens": 5, "cached_input_tokens": 100_000},
    ]  # fmt: skip
    priced = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            for at in (datetime(2025, 1, 15, 8, tzinfo=UTC), NOW):
                for mix in mixes:
                    want = check(pricer, rep(model.id, provider.id, at, **mix))
                    priced += isinstance(want, Decimal)
                check(pricer, rep(model.id, "", at, **mixes[1]))
    assert priced > 5000  # the sweep really compared prices, not just "both unpriced"


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(
        [
            ("", "gpt-4o"),
            ("anthropic", "claude-sonnet-4-5"),
            ("", "claude-3-5-haiku-latest"),
            ("google", "gemini-2.5-pro"),
            ("", "gemini-1.5-pro"),
            ("perplexity", "sonar"),
            ("", "o3"),
            ("", "deepseek-chat"),
            ("openai", "gpt-realtime"),
        ]
    ),
    fresh=st.integers(0, 2_000_000),
    read=st.integers(0, 2_000_000),
    write=st.integers(0, 2_000_000),
    one_hour=st.integers(0, 100),
    out=st.integers(0, 500_000),
    minutes=st.integers(0, 3 * 365 * 24 * 60),
    tier=st.sampled_from(["", "default", "flex", "priority", "batch", "standard"]),
)
def test_property_random_reports(
    model: tuple[str, str],
    fresh: int,
    read: int,
    write: int,
    one_hour: int,
    out: int,
    minutes: int,
    tier: str,
) -> None:
    provider, name = model
    at = datetime(2024, 6, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    r = rep(name, provider, at, tier, input_tokens=fresh + read + write, output_tokens=out,
            cached_input_tokens=read, cache_creation_input_tokens=write,
            cache_creation_1h_input_tokens=write * one_hour // 100)  # fmt: skip
    check(Pricer(), r)


# --- event time ------------------------------------------------------------------------------


def test_o3_reports_are_priced_at_their_own_time_across_the_price_cut() -> None:
    """o3's price changed on 2025-06-10 (genai-prices data); one Pricer prices both sides."""
    pricer = Pricer()
    mix = {"input_tokens": 10_000, "output_tokens": 1_000, "cached_input_tokens": 2_000}
    cut = datetime(2025, 6, 10, tzinfo=UTC)
    costs = []
    for at in (cut - timedelta(microseconds=1), cut, cut - timedelta(days=30), cut + timedelta(1)):
        costs.append(check(pricer, rep("o3", "openai", at, **mix)))
    assert costs[0] == costs[2] != costs[1] == costs[3]
    assert isinstance(costs[0], Decimal) and isinstance(costs[1], Decimal)
    assert costs[0] > costs[1]  # before the cut it was dearer


def test_deepseek_time_of_day_prices_follow_each_report() -> None:
    """deepseek-chat has peak and off-peak prices; a day in 15-minute steps, in random order."""
    pricer = Pricer()
    day = datetime(2025, 3, 3, tzinfo=UTC)
    steps = [day + timedelta(minutes=15 * i) for i in range(96)]
    steps = steps[::7] + steps[3::5] + steps  # out of order: the cache must hold intervals
    mix = {"input_tokens": 10_000, "output_tokens": 1_000, "cached_input_tokens": 2_000}
    seen = {check(pricer, rep("deepseek-chat", "deepseek", at, **mix)) for at in steps}
    assert len(seen) == 2  # peak and off-peak both observed
    assert all(len(v) <= pricing.INTERVALS_PER_KEY for v in pricer._cache.values())


def test_service_tier_selects_the_variant_price() -> None:
    pricer = Pricer()
    at = datetime(2026, 11, 20, tzinfo=UTC)  # after the tier variants' start dates
    mix = {"input_tokens": 10_000, "output_tokens": 1_000, "cached_input_tokens": 2_000}
    costs = {t: check(pricer, rep("o3", "openai", at, t, **mix)) for t in
             ("", "default", "flex", "priority", "batch", "scale")}  # fmt: skip
    assert costs[""] == costs["default"] == costs["scale"]  # no variant: standard prices
    assert len({costs[""], costs["flex"], costs["priority"], costs["batch"]}) == 4


def test_cache_writes_are_priced_by_ttl_and_web_searches_billed() -> None:
    pricer = Pricer()
    base = {"input_tokens": 50_000, "output_tokens": 1_000, "cache_creation_input_tokens": 40_000}
    five = check(pricer, rep("claude-sonnet-4-5", "anthropic", **base))
    hour = check(
        pricer, rep("claude-sonnet-4-5", "anthropic", cache_creation_1h_input_tokens=40_000, **base)
    )
    search = check(pricer, rep("claude-sonnet-4-5", "anthropic", web_search_requests=4, **base))
    assert isinstance(five, Decimal) and isinstance(hour, Decimal) and isinstance(search, Decimal)
    assert hour > five and search > five
    # a billed unit the model has no price for is not silently free
    assert (
        check(pricer, rep("deepseek-chat", "deepseek", web_search_requests=1, input_tokens=9))
        == "unknown_unit"
    )


def test_computed_cost_above_the_cap_raises() -> None:
    pricer = Pricer()
    with pytest.raises(CostOverCap, match="cap"):
        pricer.price(rep("o1-pro", "openai", input_tokens=10**12, output_tokens=10**12))


def test_huge_report_below_the_cap_is_exact() -> None:
    """A hundred million tokens: float arithmetic drifts in the last digits here, we may not."""
    r = rep("claude-sonnet-4-5", "anthropic", input_tokens=123_456_789,
            cached_input_tokens=23_456_789, cache_creation_input_tokens=1_234_567,
            cache_creation_1h_input_tokens=234_567, output_tokens=9_876_543)  # fmt: skip
    want = check(Pricer(), r)
    assert isinstance(want, Decimal) and want > 100


# --- caching ---------------------------------------------------------------------------------


def test_hot_path_makes_no_library_call(monkeypatch: pytest.MonkeyPatch) -> None:
    pricer = Pricer()
    r = rep("gpt-4o", input_tokens=100, output_tokens=10)
    miss = rep("no-such-model-xyz", input_tokens=100)
    assert isinstance(pricer.price(r), Decimal)
    assert pricer.price(miss) is Unpriced.UNKNOWN_MODEL

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("genai-prices called on the hot path")

    monkeypatch.setattr(genai_prices, "calc_price", boom)
    monkeypatch.setattr(pricing, "_resolve_genai", boom)
    monkeypatch.setattr(rates_module, "build_rates", boom)
    monkeypatch.setattr(genai_prices.data_snapshot, "get_snapshot", boom)
    for i in range(1000):
        r["completed_at"] = NOW + timedelta(seconds=i)  # still inside the validity interval
        assert isinstance(pricer.price(r), Decimal)
        assert pricer.price(miss) is Unpriced.UNKNOWN_MODEL  # misses cached too


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pricing, "CACHE_MAX_KEYS", 50)
    pricer = Pricer()
    for i in range(500):
        assert pricer.price(rep(f"hostile-{i}", input_tokens=1)) is Unpriced.UNKNOWN_MODEL
        assert len(pricer._cache) <= 50
    assert isinstance(pricer.price(rep("gpt-4o", input_tokens=1)), Decimal)


def test_cache_does_not_grow_genai_prices_caches() -> None:
    """genai-prices' own lookup caches are unbounded; we must not feed them hostile names."""
    snapshot = get_snapshot()
    before = (len(snapshot._lookup_cache), len(snapshot._provider_cache),
              len(snapshot._provider_misses))  # fmt: skip
    pricer = Pricer()
    for i in range(200):
        pricer.price(rep(f"gpt-4o-hostile-{i}", input_tokens=1))
        pricer.price(rep(f"zzz-hostile-{i}", input_tokens=1))
    after = (len(snapshot._lookup_cache), len(snapshot._provider_cache),
             len(snapshot._provider_misses))  # fmt: skip
    assert after == before


def test_refresh_drops_resolved_rates() -> None:
    pricer = Pricer()
    clock = [0.0]
    pricer._clock = lambda: clock[0]
    pricer._refresh_at = 10.0
    pricer.price(rep("gpt-4o", input_tokens=1))
    pricer.refresh_if_due()
    assert pricer._cache
    clock[0] = 11.0
    pricer.refresh_if_due()
    assert not pricer._cache


# --- user price file ---------------------------------------------------------------------------

YAML_FILE = """
models:
  - model: my-finetune
    provider: openai
    input_mtok: 1.5
    output_mtok: 6.0
    cache_read_mtok: 0.15
    cache_write_mtok: 1.875
  - model: gpt-4o          # override genai-prices for every provider, for one month
    input_mtok: 100
    output_mtok: 200
    valid_from: 2026-05-01
    valid_to: 2026-06-01
  - model: gpt-4o
    input_mtok: 50
    output_mtok: "75.123456789012345678"   # quoted: every digit kept
    valid_from: 2026-07-01T12:00:00Z
  - model: local-llama     # cache rates default to the input rate
    input_mtok: 0.5
    output_mtok: 0
    web_searches_kcount: 10
"""

TOML_FILE = """
[[models]]
model = "my-finetune"
provider = "openai"
input_mtok = 1.5
output_mtok = 6.0
cache_read_mtok = 0.15
cache_write_mtok = 1.875

[[models]]
model = "gpt-4o"
input_mtok = 100
output_mtok = 200
valid_from = 2026-05-01
valid_to = 2026-06-01

[[models]]
model = "gpt-4o"
input_mtok = 50
output_mtok = "75.123456789012345678"
valid_from = 2026-07-01T12:00:00Z

[[models]]
model = "local-llama"
input_mtok = 0.5
output_mtok = 0
web_searches_kcount = 10
"""

D = Decimal


@pytest.fixture(params=["yaml", "toml"])
def price_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"prices.{request.param}"
    path.write_text(YAML_FILE if request.param == "yaml" else TOML_FILE)
    return path


def test_price_file_adds_models(price_file: Path) -> None:
    pricer = Pricer(price_file)
    prices = ModelPrice(input_mtok=D("1.5"), output_mtok=D("6.0"), cache_read_mtok=D("0.15"),
                        cache_write_mtok=D("1.875"))  # fmt: skip
    r = rep("my-finetune", "openai", input_tokens=1_000_001, output_tokens=500_003,
            cached_input_tokens=200_000, cache_creation_input_tokens=100_007)  # fmt: skip
    assert got(pricer, r) == expected_with_prices(r, prices)
    # provider-specific entry also serves reports without a provider (lookup by model alone)
    assert got(pricer, {**r, "provider": ""}) == expected_with_prices(r, prices)
    # ... but not another provider's reports
    assert got(pricer, {**r, "provider": "anthropic"}) == "unknown_model"
    llama = ModelPrice(input_mtok=D("0.5"), output_mtok=D(0), web_searches_kcount=D(10))
    r = rep("local-llama", "whatever", input_tokens=1_000_000, output_tokens=9,
            cached_input_tokens=300_000, cache_creation_input_tokens=200_000,
            web_search_requests=3)  # fmt: skip
    assert got(pricer, r) == expected_with_prices(r, llama)


def test_price_file_validity_intervals(price_file: Path) -> None:
    pricer = Pricer(price_file)
    mix = {"input_tokens": 1_000_003, "output_tokens": 1_000_001}
    may = ModelPrice(input_mtok=D(100), output_mtok=D(200))
    july = ModelPrice(input_mtok=D(50), output_mtok=D("75.123456789012345678"))
    for provider in ("", "openai", "azure"):
        inside = rep("gpt-4o", provider, datetime(2026, 5, 31, 23, 59, tzinfo=UTC), **mix)
        assert got(pricer, inside) == expected_with_prices(inside, may)
        # between the entries and before the first: genai-prices' own price
        for at in (datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 4, 30, tzinfo=UTC),
                   datetime(2026, 7, 1, 11, 59, tzinfo=UTC)):  # fmt: skip
            check(pricer, rep("gpt-4o", provider, at, **mix))
        later = rep("gpt-4o", provider, datetime(2027, 1, 1, tzinfo=UTC), **mix)
        assert got(pricer, later) == expected_with_prices(later, july)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.yaml", "models: [", "cannot read price file"),
        ("bad.toml", "[[models]\nmodel=", "cannot read price file"),
        ("neg.yaml", "models:\n  - {model: m, input_mtok: -1, output_mtok: 1}\n", "input_mtok"),
        ("extra.yaml", "models:\n  - {model: m, input_mtok: 1, output_mtok: 1, x: 1}\n", "x"),
        ("missing.yaml", "models:\n  - {model: m, input_mtok: 1}\n", "output_mtok"),
        ("top.yaml", "- model: m\n", "mapping"),
        ("empty.yaml", "", "mapping"),
        ("typo.yaml", "model:\n  - {model: m, input_mtok: 1, output_mtok: 1}\n", "model"),
        ("nan.toml", "[[models]]\nmodel='m'\ninput_mtok=nan\noutput_mtok=1\n", "input_mtok"),
        ("str.yaml", "models:\n  - {model: m, input_mtok: cheap, output_mtok: 1}\n", "input_mtok"),
        (
            "dup.yaml",
            "models:\n  - {model: m, input_mtok: 1, output_mtok: 1}\n"
            "  - {model: m, input_mtok: 2, output_mtok: 2}\n",
            "listed twice",
        ),
        (
            "overlap.yaml",
            "models:\n  - {model: m, input_mtok: 1, output_mtok: 1, valid_to: 2026-02-01}\n"
            "  - {model: m, input_mtok: 2, output_mtok: 2, valid_from: 2026-01-31}\n",
            "overlapping",
        ),
        (
            "backwards.yaml",
            "models:\n  - {model: m, input_mtok: 1, output_mtok: 1, valid_from: 2026-02-01,"
            " valid_to: 2026-01-01}\n",
            "before valid_to",
        ),
        (
            "join.yaml",
            "models:\n  - {model: m, input_mtok: 1, output_mtok: 1, input_audio_mtok: 2,"
            " cache_read_mtok: 0.5}\n",
            "cache_audio_read",
        ),
        ("prices.json", '{"models": []}', ".yaml, .yml or .toml"),
    ],
)
def test_bad_price_file_raises(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="price file") as info:
        Pricer(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_price_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        Pricer(tmp_path / "nope.yaml")


def test_half_way_ties_round_half_even(tmp_path: Path) -> None:
    """5e-11 USD per token: every odd count is a tie at 1e-10; half-even takes the even one."""
    path = tmp_path / "p.yaml"
    path.write_text('models:\n  - {model: tie, input_mtok: "0.00005", output_mtok: "0.00015"}\n')
    pricer = Pricer(path)
    prices = ModelPrice(input_mtok=D("0.00005"), output_mtok=D("0.00015"))
    ups = downs = 0
    for n in range(1, 400):
        r = rep("tie", input_tokens=n, output_tokens=n // 3)
        want = expected_with_prices(r, prices)
        assert got(pricer, r) == want, n
        exact = prices.calc_price(usage_of(r))["total_price"]
        if exact != want:
            ups += want > exact
            downs += want < exact
    assert ups > 50 and downs > 50  # ties really happened, both ways
