"""UTC normalisation, in one place: naive datetimes are taken as UTC, aware ones converted."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["as_utc", "utc_now"]


def as_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime: naive means UTC, an aware one is converted.

    An aware value already at offset zero is returned as is (no conversion, so no overflow
    near datetime.min/max and its tzinfo object is kept).
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if value.utcoffset():
        return value.astimezone(UTC)
    return value


def utc_now() -> datetime:
    return datetime.now(UTC)
