"""Pricer must equal genai-prices' own `calc_price(...).total_price`.

Tolerance: relative 1e-9 (plus 1e-15 USD absolute for zero costs). Our rates are floats derived
once from genai-prices' Decimal data, so the only difference is float rounding (~1e-16).
Every expected value is computed here by calling genai_prices, never hard-coded.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import genai_prices
import genai_prices.data_snapshot
import pytest
from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelPrice, StartDateConstraint, TieredPrices
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import pricing
from exporter.pricing import Pricer

REL_TOL = 1e-9
ABS_TOL = 1e-15

# A fixed "now" shared by the Pricer and calc_price, so conditional (time-dependent) prices
# cannot flip between the two computations.
NOW = datetime.now(UTC).replace(microsecond=0)

GRID_MODELS: list[tuple[str, str]] = [
    ("", "gpt-4o"),
    ("openai", "gpt-4o"),
    ("", "gpt-4o-2024-08-06"),
    ("", "gpt-4o-mini"),
    ("openai", "o1"),
    ("", "o3"),
    ("anthropic", "claude-3-5-sonnet-latest"),
    ("", "claude-sonnet-4-5"),  # tiered above 200k input
    ("", "claude-sonnet-4-20250514"),
    ("", "claude-3-5-haiku-latest"),
    ("anthropic", "claude-haiku-4-5"),
    ("Anthropic", "Claude-3-5-Sonnet-Latest"),  # ids and providers are case-insensitive
    ("", "gemini-1.5-pro"),  # tiered above 128k input
    ("google", "gemini-2.5-pro"),  # tiered above 200k input, cache reads tiered too
    ("google-vertex", "gemini-2.5-flash"),  # provider alias via provider_match
    ("azure", "gpt-4o"),  # provider falling back to another provider's prices
    ("litellm", "openai/gpt-4o"),  # litellm provider prefix
    ("openai", "gpt-5.2-20251211"),  # compact dated ref normalised
    ("perplexity", "sonar"),  # per-request fee (requests_kcount)
    ("", "deepseek-chat"),  # off-peak price by time of day
    ("", "no-such-model-xyz"),  # unpriced
    ("openai", "claude-3-5-sonnet-latest"),  # not sold by that provider: unpriced
    ("no-such-provider", "gpt-4o"),  # unknown provider: unpriced, no guessing
]

BASE_MIXES: list[tuple[int, int, int, int]] = [
    # (input incl. cache, output, cache read, cache write)
    (0, 0, 0, 0),
    (1, 0, 0, 0),
    (0, 1, 0, 0),
    (1000, 250, 0, 0),
    (1000, 250, 400, 0),
    (1000, 250, 0, 300),
    (1000, 250, 400, 300),
    (5000, 0, 5000, 0),  # all cache reads
    (5000, 10, 0, 5000),  # all cache writes
    (1_234_567, 89_012, 345_678, 12_345),
]


def _expected(
    provider: str, model: str, mix: tuple[int, int, int, int], at: datetime = NOW
) -> Decimal | None:
    inp, out, read, write = mix
    usage = Usage(
        input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write
    )
    try:
        return calc_price(
            usage, model, provider_id=provider or None, genai_request_timestamp=at
        ).total_price
    except LookupError:
        return None


def _pricer_at(at: datetime, price_file: Path | None = None) -> Pricer:
    pricer = Pricer(price_file)
    pricer._clock = at.timestamp
    return pricer


def _assert_close(got: float | None, want: Decimal | None, context: object) -> None:
    if want is None:
        assert got is None, context
        return
    assert got is not None, context
    assert math.isclose(got, float(want), rel_tol=REL_TOL, abs_tol=ABS_TOL), (got, want, context)


def _tier_starts(provider: str, model: str) -> set[int]:
    """Tier thresholds as genai-prices stores them (read from its data, not hard-coded)."""
    try:
        result = calc_price(
            Usage(input_tokens=1), model, provider_id=provider or None, genai_request_timestamp=NOW
        )
    except LookupError:
        return set()
    starts: set[int] = set()
    for value in result.model_price.__dict__.values():
        if isinstance(value, TieredPrices):
            starts.update(tier.start for tier in value.tiers)
    return starts


def _mixes_for(provider: str, model: str) -> Iterator[tuple[int, int, int, int]]:
    yield from BASE_MIXES
    for start in sorted(_tier_starts(provider, model)):
        for inp in (start - 1, start, start + 1, start + 2):
            yield (inp, 777, 0, 0)
            yield (inp, 777, inp // 3, inp // 5)


def _grid() -> Iterator[tuple[str, str, tuple[int, int, int, int]]]:
    for provider, model in GRID_MODELS:
        for mix in _mixes_for(provider, model):
            yield provider, model, mix


def test_grid_has_tiered_models() -> None:
    """Guard the grid itself: it must exercise tier thresholds, or the tier test is hollow."""
    assert _tier_starts("", "gemini-1.5-pro")
    assert _tier_starts("google", "gemini-2.5-pro")


@pytest.mark.parametrize(("provider", "model", "mix"), list(_grid()))
def test_cost_equals_calc_price(provider: str, model: str, mix: tuple[int, int, int, int]) -> None:
    pricer = _pricer_at(NOW)
    inp, out, read, write = mix
    got = pricer.cost(provider, model, inp, out, read, write)
    _assert_close(got, _expected(provider, model, mix), (provider, model, mix))
    # and again from the cache
    assert pricer.cost(provider, model, inp, out, read, write) == got


def test_tier_boundary_changes_price() -> None:
    """Crossing the threshold re-prices ALL tokens (cliff), exactly as genai-prices does."""
    pricer = _pricer_at(NOW)
    (start,) = sorted(_tier_starts("google", "gemini-2.5-pro"))[:1]
    at = pricer.cost("google", "gemini-2.5-pro", start, 0, 0, 0)
    above = pricer.cost("google", "gemini-2.5-pro", start + 1, 0, 0, 0)
    assert at is not None and above is not None
    assert above / (start + 1) > at / start  # per-token rate jumped


def test_whole_snapshot_matches_calc_price() -> None:
    """Every model genai-prices knows, by its own provider id, for a few mixes."""
    pricer = _pricer_at(NOW)
    mixes = [(0, 0, 0, 0), (10_000, 2_000, 3_000, 1_000), (300_001, 5, 100_000, 0)]
    priced = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            for mix in mixes:
                inp, out, read, write = mix
                usage = Usage(
                    input_tokens=inp,
                    output_tokens=out,
                    cache_read_tokens=read,
                    cache_write_tokens=write,
                )
                try:
                    want: Decimal | None = calc_price(
                        usage, model.id, provider_id=provider.id, genai_request_timestamp=NOW
                    ).total_price
                except (LookupError, ValueError):
                    want = None
                got = pricer.cost(provider.id, model.id, inp, out, read, write)
                _assert_close(got, want, (provider.id, model.id, mix))
                priced += want is not None
            # the same id with no provider: genai-prices infers one from the model name
            mix = mixes[1]
            try:
                want = calc_price(
                    Usage(input_tokens=mix[0], output_tokens=mix[1], cache_read_tokens=mix[2]),
                    model.id,
                    genai_request_timestamp=NOW,
                ).total_price
            except (LookupError, ValueError):
                want = None
            _assert_close(pricer.cost("", model.id, mix[0], mix[1], mix[2], 0), want, model.id)
    assert priced > 3000  # the sweep really compared prices, not just "both unpriced"


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
        ]
    ),
    fresh=st.integers(0, 2_000_000),
    read=st.integers(0, 2_000_000),
    write=st.integers(0, 2_000_000),
    out=st.integers(0, 500_000),
)
def test_property_random_mixes(
    model: tuple[str, str], fresh: int, read: int, write: int, out: int
) -> None:
    provider, name = model
    mix = (fresh + read + write, out, read, write)
    got = _pricer_at(NOW).cost(provider, name, *mix)
    _assert_close(got, _expected(provider, name, mix), (model, mix))


# --- time-conditional prices -----------------------------------------------------------------


def test_start_date_price_change_is_followed() -> None:
    """o3 got cheaper on a start date; a cached rate must expire exactly at that midnight."""
    provider = next(p for p in get_snapshot().providers if p.id == "openai")
    model = next(m for m in provider.models if m.id == "o3")
    assert not isinstance(model.prices, ModelPrice)
    starts = [
        c.constraint.start_date
        for c in model.prices
        if isinstance(c.constraint, StartDateConstraint)
    ]
    start = datetime.combine(min(starts), datetime.min.time(), UTC)
    before = start.timestamp() - 1
    clock = [before]
    pricer = Pricer()
    pricer._clock = lambda: clock[0]
    mix = (10_000, 1_000, 2_000, 0)
    old = pricer.cost("openai", "o3", *mix)
    _assert_close(old, _expected("openai", "o3", mix, datetime.fromtimestamp(before, UTC)), before)
    clock[0] = start.timestamp()
    new = pricer.cost("openai", "o3", *mix)
    _assert_close(new, _expected("openai", "o3", mix, start), start)
    assert new != old


def test_time_of_day_price_is_followed() -> None:
    """deepseek-chat has off-peak prices; sweep a day in 30-minute steps with one Pricer."""
    day = datetime(2025, 3, 3, tzinfo=UTC)
    clock = [day.timestamp()]
    pricer = Pricer()
    pricer._clock = lambda: clock[0]
    mix = (10_000, 1_000, 2_000, 0)
    seen: set[float] = set()
    for step in range(48 * 2):
        clock[0] = day.timestamp() + step * 900
        got = pricer.cost("deepseek", "deepseek-chat", *mix)
        at = datetime.fromtimestamp(clock[0], UTC)
        _assert_close(got, _expected("deepseek", "deepseek-chat", mix, at), at)
        assert got is not None
        seen.add(got)
    assert len(seen) >= 2  # peak and off-peak both observed


# --- caching -----------------------------------------------------------------------------------


def test_hot_path_makes_no_library_call(monkeypatch: pytest.MonkeyPatch) -> None:
    pricer = _pricer_at(NOW)
    assert pricer.cost("", "gpt-4o", 100, 10, 0, 0) is not None
    assert pricer.cost("", "no-such-model-xyz", 100, 10, 0, 0) is None

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("genai-prices called on the hot path")

    monkeypatch.setattr(genai_prices, "calc_price", boom)
    monkeypatch.setattr(pricing, "_resolve_genai", boom)
    monkeypatch.setattr(genai_prices.data_snapshot, "get_snapshot", boom)
    for _ in range(1000):
        assert pricer.cost("", "gpt-4o", 100, 10, 0, 0) is not None
        assert pricer.cost("", "no-such-model-xyz", 100, 10, 0, 0) is None  # misses cached too


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pricing, "CACHE_MAX_ENTRIES", 50)
    pricer = _pricer_at(NOW)
    for i in range(500):
        assert pricer.cost("", f"hostile-{i}", 1, 1, 0, 0) is None
        assert len(pricer._cache) <= 50
    assert pricer.cost("", "gpt-4o", 1, 1, 0, 0) is not None


def test_cache_does_not_grow_genai_prices_caches() -> None:
    """genai-prices' own lookup caches are unbounded; we must not feed them hostile names."""
    snapshot = get_snapshot()
    before = (
        len(snapshot._lookup_cache),
        len(snapshot._provider_cache),
        len(snapshot._provider_misses),
    )
    pricer = _pricer_at(NOW)
    for i in range(200):
        pricer.cost("", f"gpt-4o-hostile-{i}", 1, 1, 0, 0)
        pricer.cost("", f"zzz-hostile-{i}", 1, 1, 0, 0)
    after = (
        len(snapshot._lookup_cache),
        len(snapshot._provider_cache),
        len(snapshot._provider_misses),
    )
    assert after == before


def test_invalid_token_counts_raise() -> None:
    pricer = _pricer_at(NOW)
    with pytest.raises(ValueError, match="input_tokens must include"):
        pricer.cost("", "gpt-4o", 10, 0, 8, 8)
    with pytest.raises(ValueError):
        pricer.cost("", "gpt-4o", 10, -1, 0, 0)


# --- user price file ----------------------------------------------------------------------------

YAML_FILE = """
models:
  - model: my-finetune
    provider: openai
    input_mtok: 1.5
    output_mtok: 6.0
    cache_read_mtok: 0.15
    cache_write_mtok: 1.875
  - model: gpt-4o          # override genai-prices for every provider
    input_mtok: 100
    output_mtok: 200
  - model: local-llama     # cache rates default to the input rate
    input_mtok: 0.5
    output_mtok: 0
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

[[models]]
model = "local-llama"
input_mtok = 0.5
output_mtok = 0
"""


@pytest.fixture(params=["yaml", "toml"])
def price_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "yaml":
        path = tmp_path / "prices.yaml"
        path.write_text(YAML_FILE)
    else:
        path = tmp_path / "prices.toml"
        path.write_text(TOML_FILE)
    return path


def test_price_file_adds_models(price_file: Path) -> None:
    pricer = _pricer_at(NOW, price_file)
    # fresh 0.7M at 1.5, cache reads 0.2M at 0.15, cache writes 0.1M at 1.875, output 0.5M at 6
    got = pricer.cost("openai", "my-finetune", 1_000_000, 500_000, 200_000, 100_000)
    want = 0.7 * 1.5 + 0.2 * 0.15 + 0.1 * 1.875 + 0.5 * 6.0
    assert got == pytest.approx(want, rel=REL_TOL)
    # provider-specific entry also serves reports without a provider (lookup by model alone)
    assert pricer.cost("", "my-finetune", 1_000_000, 0, 0, 0) == pytest.approx(1.5)
    # ... but not another provider's reports
    assert pricer.cost("anthropic", "my-finetune", 1_000_000, 0, 0, 0) is None
    # cache rates default to the input rate
    assert pricer.cost("", "local-llama", 1_000_000, 9, 300_000, 200_000) == pytest.approx(0.5)
    assert pricer.cost("whatever", "local-llama", 2_000_000, 0, 0, 0) == pytest.approx(1.0)


def test_price_file_overrides_genai_prices(price_file: Path) -> None:
    pricer = _pricer_at(NOW, price_file)
    library = _expected("openai", "gpt-4o", (1_000_000, 1_000_000, 0, 0))
    assert library is not None
    for provider in ("", "openai", "azure"):
        got = pricer.cost(provider, "gpt-4o", 1_000_000, 1_000_000, 0, 0)
        assert got == pytest.approx(300.0)
        assert got != pytest.approx(float(library))
    # models not in the file still come from genai-prices
    _assert_close(
        pricer.cost("", "gpt-4o-mini", 1000, 10, 0, 0),
        _expected("", "gpt-4o-mini", (1000, 10, 0, 0)),
        "gpt-4o-mini",
    )


def test_provider_specific_entry_beats_generic(tmp_path: Path) -> None:
    path = tmp_path / "p.yml"
    path.write_text(
        textwrap.dedent(
            """
            models:
              - {model: m, input_mtok: 1, output_mtok: 1}
              - {model: m, provider: acme, input_mtok: 2, output_mtok: 2}
            """
        )
    )
    pricer = _pricer_at(NOW, path)
    assert pricer.cost("ACME", "m", 1_000_000, 0, 0, 0) == pytest.approx(2.0)
    assert pricer.cost("other", "m", 1_000_000, 0, 0, 0) == pytest.approx(1.0)
    assert pricer.cost("", "m", 1_000_000, 0, 0, 0) == pytest.approx(1.0)


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


def test_empty_models_list_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("models: []\n")
    assert _pricer_at(NOW, path).cost("", "nope-model", 1, 1, 0, 0) is None
