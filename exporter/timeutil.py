"""UTC normalisation, in one place: naive datetimes are taken as UTC, aware ones converted."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["as_utc"]


def as_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime: naive means UTC, an aware one is converted (a value
    already in UTC is returned as is)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)
