"""The user price file (YAML or TOML): models genai-prices lacks, or prices that override it.

Each entry becomes a genai-prices `ModelPrice`, so a user price is applied by exactly the same
rules as the library's own (cache and audio prices fall back to the input price when absent,
per-request fees, ...). Prices are parsed exactly: a number goes through its shortest repr (the
text in the file for up to 15 significant digits); quote a price to keep more digits.

An entry may carry `valid_from` (inclusive) and `valid_to` (exclusive), dates (UTC midnight) or
RFC 3339 times: a report is priced by the entry valid at its `completed_at`, and falls back to
genai-prices outside every entry of its model. Entries of one (provider, model) must not
overlap.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import yaml
from genai_prices.types import ModelPrice
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from exporter.money import exact_decimal

__all__ = ["EARLIEST", "LATEST", "PriceEntry", "PriceFile", "UserPrice", "load_price_file"]

EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def _exact_price(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError("a price must be a number")
    dec = exact_decimal(value)
    if not dec.is_finite() or dec < 0:
        raise ValueError("a price must be a finite non-negative number")
    return dec


def _utc_moment(value: Any) -> Any:
    """Dates mean UTC midnight; naive times are UTC."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), UTC)
    if isinstance(value, str):
        try:
            return _utc_moment(datetime.fromisoformat(value))
        except ValueError:
            raise ValueError("expected a date or an RFC 3339 time") from None
    return value


Price = Annotated[Decimal, BeforeValidator(_exact_price)]
Moment = Annotated[datetime, BeforeValidator(_utc_moment)]

#: entry field → genai-prices price key (USD per million tokens, per thousand requests)
PRICE_KEYS: tuple[str, ...] = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
    "input_audio_mtok",
    "cache_audio_read_mtok",
    "output_audio_mtok",
    "input_image_mtok",
    "output_image_mtok",
    "output_reasoning_mtok",
    "web_searches_kcount",
    "requests_kcount",
)


class PriceEntry(BaseModel):
    """One user-priced model: genai-prices price keys, USD per million tokens (or thousand)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=256)
    provider: str | None = Field(default=None, min_length=1, max_length=256)
    input_mtok: Price
    output_mtok: Price
    cache_read_mtok: Price | None = None
    cache_write_mtok: Price | None = None
    cache_write_1h_mtok: Price | None = None
    input_audio_mtok: Price | None = None
    cache_audio_read_mtok: Price | None = None
    output_audio_mtok: Price | None = None
    input_image_mtok: Price | None = None
    output_image_mtok: Price | None = None
    output_reasoning_mtok: Price | None = None
    web_searches_kcount: Price | None = None
    requests_kcount: Price | None = None
    valid_from: Moment | None = None
    valid_to: Moment | None = None

    def model_price(self) -> ModelPrice:
        return ModelPrice(
            **{k: getattr(self, k) for k in PRICE_KEYS if getattr(self, k) is not None}
        )


class PriceFile(BaseModel):
    """The user price file: `models:` a list of entries."""

    model_config = ConfigDict(extra="forbid")

    models: list[PriceEntry] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UserPrice:
    """One entry, resolved: valid on [start, end)."""

    start: datetime
    end: datetime
    price: ModelPrice


def norm_provider(provider: str | None) -> str:
    return (provider or "").strip().lower()


def _read(path: Path) -> PriceFile:
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
        return PriceFile.model_validate(raw)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read price file {path}: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"invalid price file {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"invalid price file {path}: {exc}") from exc


def load_price_file(path: Path, check: Any = None) -> dict[tuple[str, str], tuple[UserPrice, ...]]:
    """(provider or '', model) → its entries sorted by start; every failure is a ValueError
    naming the file. `check(ModelPrice)` raises ValueError for prices genai-prices refuses."""
    if not path.is_file():
        raise ValueError(f"price file not found: {path}")
    parsed = _read(path)
    table: dict[tuple[str, str], list[UserPrice]] = {}
    for entry in parsed.models:
        start = entry.valid_from or EARLIEST
        end = entry.valid_to or LATEST
        who = f"provider {entry.provider!r}" if entry.provider else "any provider"
        if start >= end:
            raise ValueError(
                f"invalid price file {path}: model {entry.model!r} for {who}: "
                "valid_from must be before valid_to"
            )
        price = entry.model_price()
        if check is not None:
            try:
                check(price)
            except ValueError as exc:
                raise ValueError(
                    f"invalid price file {path}: model {entry.model!r} for {who}: {exc}"
                ) from exc
        key = (norm_provider(entry.provider), entry.model)
        for other in table.get(key, ()):
            if start < other.end and other.start < end:
                raise ValueError(
                    f"invalid price file {path}: model {entry.model!r} for {who} is listed "
                    "twice with overlapping validity (valid_from/valid_to)"
                )
        table.setdefault(key, []).append(UserPrice(start, end, price))
    return {key: tuple(sorted(v, key=lambda u: u.start)) for key, v in table.items()}
