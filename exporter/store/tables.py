"""The two tables: per-request audit details and additive hour/day rollups.

The rollup table is a contract (the Grafana billing board queries it directly): keep its
columns and key exactly. Absent key parts are '' (never NULL) so the primary key holds.
Costs are exact decimals: NUMERIC(20,10) in Postgres; in SQLite, which has no decimal type,
canonical decimal TEXT that the writer adds with an exact SQL function (`dec_add`).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Double,
    Index,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

from exporter.money import COST_QUANTUM as COST_QUANTUM
from exporter.money import COST_SCALE, money_text, stored_money
from exporter.timeutil import as_utc

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMPTZ in Postgres; in SQLite a fixed-width UTC text that sorts like time.

    Values come back timezone-aware in UTC on both backends, and naive input is taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return as_utc(value)


class Money(TypeDecorator[Decimal]):
    """NUMERIC(20,10) in Postgres; exact decimal TEXT in SQLite (its NUMERIC is a float)."""

    impl = Numeric(20, COST_SCALE, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(Numeric(20, COST_SCALE, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        dec = stored_money(value)
        return money_text(dec) if dialect.name == "sqlite" else dec

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return stored_money(value)


#: the one converter and the one text form (exporter.money), under the names readers use
to_decimal = stored_money
decimal_text = money_text


# Identifiers compare byte-wise in Postgres: a cheaper unique index than a linguistic
# collation, and the same order on every server. SQLite's default is byte-wise already.
ID_TEXT = Text(collation="C").with_variant(Text(), "sqlite")


def _key_text(name: str) -> Column[str]:
    return Column(name, Text, nullable=False, server_default=text("''"))


def _count(name: str) -> Column[int]:
    return Column(name, BigInteger, nullable=False, server_default=text("0"))


BILLED_COUNT_COLUMNS = ("cache_creation_1h_input_tokens", "input_audio_tokens",
                        "cached_audio_input_tokens", "output_audio_tokens", "input_image_tokens",
                        "output_image_tokens", "web_search_requests")  # fmt: skip

usage_details = Table(
    "usage_details",
    metadata,
    Column("request_id", ID_TEXT, nullable=False),
    Column("model", Text, nullable=False),
    _key_text("provider"),
    Column("operation", Text, nullable=False),
    _key_text("user"),
    _key_text("team"),
    _key_text("api_key_id"),
    Column("trace_id", ID_TEXT, nullable=False, server_default=text("''")),
    _key_text("parent_id"),
    _key_text("node"),
    _count("input_tokens"),
    _count("output_tokens"),
    _count("cached_input_tokens"),
    _count("cache_creation_input_tokens"),
    _count("reasoning_tokens"),
    _count("total_tokens"),
    # NULL: the report carried no cost and pricing gave none; rollups count it as 0.
    Column("cost_usd", Money(), nullable=True),
    Column("status", Text, nullable=False),
    _key_text("error_type"),
    Column("stream", Boolean, nullable=False, server_default=text("false")),
    Column("completed", Boolean, nullable=False, server_default=text("true")),
    Column("estimated", Boolean, nullable=False, server_default=text("false")),
    Column("output_chunk_count", BigInteger, nullable=True),
    Column("request_content_bytes", BigInteger, nullable=True),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("completed_at", UTCDateTime(), nullable=False),
    Column("duration_ms", Double, nullable=True),
    Column("ttft_ms", Double, nullable=True),
    _key_text("source"),
    # billed extras (exporter.usage.BILLED_UNITS) and the tier, as priced (migration 0004_pricing)
    *(_count(name) for name in BILLED_COUNT_COLUMNS),
    _key_text("service_tier"),
    # why cost_usd is NULL ('' when priced or sent): pricing.Unpriced
    _key_text("unpriced_reason"),
    # the client sent cost_usd: `reprice` leaves it alone
    Column("cost_sent", Boolean, nullable=False, server_default=text("false")),
    # free-form attribution (project, feature, env…) as sent; NULL when the report had none
    Column("tags", JSON, nullable=True),
    Column("inserted_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
    PrimaryKeyConstraint("request_id"),
    # Only what the read API queries (docs/api.md): completed_at ranges (stats percentiles,
    # /v1/requests keyset pages, retention), trace_id (/v1/traces/{id}/usage). Every index
    # costs flush throughput (bench/RESULTS.md); per-user/team figures come from the rollups.
    Index(None, "completed_at"),
    Index(None, "trace_id"),
)

#: `dims` is the canonical JSON object of the promoted tags ('{}' for none): a bounded set of
#: configured keys, so the key stays one fixed-width tuple whatever tags are promoted.
ROLLUP_KEY = ("granularity", "bucket_start", "model", "provider", "operation", "user", "team",
              "api_key_id", "node", "dims")  # fmt: skip

usage_rollups = Table(
    "usage_rollups",
    metadata,
    Column("granularity", Text, nullable=False),  # 'hour' | 'day'
    Column("bucket_start", UTCDateTime(), nullable=False),
    Column("model", Text, nullable=False),
    Column("provider", Text, nullable=False),
    Column("operation", Text, nullable=False),
    Column("user", Text, nullable=False),
    Column("team", Text, nullable=False),
    Column("api_key_id", Text, nullable=False),
    _count("requests"),
    _count("errors"),
    _count("input_tokens"),
    _count("output_tokens"),
    _count("cached_input_tokens"),
    _count("cache_creation_input_tokens"),
    _count("reasoning_tokens"),
    Column("cost_usd", Money(), nullable=False, server_default=text("0")),
    Column("duration_ms_sum", Double, nullable=False, server_default=text("0")),
    _key_text("node"),
    Column("dims", Text, nullable=False, server_default=text("'{}'")),
    _count("duration_count"),
    Column("ttft_ms_sum", Double, nullable=False, server_default=text("0")),
    _count("ttft_count"),
    _count("cancelled"),
    _count("estimated"),
    _count("unpriced"),  # reports stored with cost NULL (migration 0004_pricing)
    PrimaryKeyConstraint(*ROLLUP_KEY),
    Index(None, "granularity", "user", "bucket_start"),
    Index(None, "granularity", "team", "bucket_start"),
    Index(None, "granularity", "api_key_id", "bucket_start"),
    # Room on each page for the next flush's update of the same row: a HOT update, no new
    # index entries (migration 0006_rollup_fillfactor; bench/RESULTS.md `## Flush`).
    postgresql_with={"fillfactor": 50},
)

#: The additive columns: every rollup column outside the key (each has a rule in rows.py).
#: Averages divide a sum by the count of reports that carried the value (not by requests).
ROLLUP_SUMS: tuple[str, ...] = tuple(
    c.name for c in usage_rollups.columns if c.name not in ROLLUP_KEY
)
