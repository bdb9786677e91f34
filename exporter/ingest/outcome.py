"""What an ingest call answers: the counts and per-item reasons, and backpressure."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

__all__ = ["Backpressure", "IngestResult", "days_text", "describe"]

_MAX_ERRORS_PER_ITEM = 5


class Backpressure(Exception):
    """Nothing was accepted; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": len(self.errors),
            "errors": self.errors,
        }


def describe(exc: ValidationError) -> str:
    """Field paths and messages only: pydantic's `input` may echo a secret back."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:_MAX_ERRORS_PER_ITEM]:
        loc = ".".join(str(p) if len(str(p)) <= 64 else f"{str(p)[:64]}…" for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = exc.error_count() - _MAX_ERRORS_PER_ITEM
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts)


def days_text(delta: timedelta | None) -> str:
    seconds = delta.total_seconds() if delta is not None else 0.0
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g} s"
