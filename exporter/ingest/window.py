"""The time window of accepted reports: older than `max_report_age` (the audit rows that
de-duplicate them may be gone by retention) or past `max_future_skew` ahead is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from exporter.ingest.outcome import days_text
from exporter.usage import UsageReport

__all__ = ["Prepared", "TimeWindow"]

#: validated reports and the per-item errors of one request, ready for `Ingestor.accept`
Prepared = tuple[list[UsageReport], list[dict[str, Any]]]
_FIRST, _LAST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)


class TimeWindow:
    def __init__(self, max_age: timedelta | None, max_skew: timedelta | None) -> None:
        self._max_age = max_age
        self._max_skew = max_skew

    def keep(
        self,
        valid: list[UsageReport],
        indexes: list[int] | None,
        errors: list[dict[str, Any]],
        now: datetime,
    ) -> Prepared:
        """Drop (with a reason) reports older than the dedupe window or too far ahead.
        `indexes`: each report's index in the request (None: its position in `valid`)."""
        if errors:
            errors.sort(key=lambda e: int(e["index"]))
        if self._max_age is None and self._max_skew is None:
            return valid, errors
        oldest = now - self._max_age if self._max_age is not None else None
        latest = now + self._max_skew if self._max_skew is not None else None
        lo, hi = oldest or _FIRST, latest or _LAST
        if all(lo <= r.__dict__["completed_at"] <= hi for r in valid):
            return valid, errors  # the common case: one pass, no copy
        return self._errors(valid, indexes, errors, oldest, latest)

    def _errors(
        self,
        valid: list[UsageReport],
        indexes: list[int] | None,
        errors: list[dict[str, Any]],
        oldest: datetime | None,
        latest: datetime | None,
    ) -> Prepared:
        reports: list[UsageReport] = []
        for j, r in enumerate(valid):
            i = j if indexes is None else indexes[j]
            done = r.completed_at
            assert done is not None  # _complete fills it in
            if oldest is not None and done < oldest:
                errors.append({"index": i, "reason": "too_old", "error": (
                    f"completed_at {done.isoformat()} is older than max_report_age "
                    f"({days_text(self._max_age)}): it could be counted twice")})  # fmt: skip
            elif latest is not None and done > latest:
                errors.append({"index": i, "reason": "too_far_in_future", "error": (
                    f"completed_at {done.isoformat()} is more than max_future_skew "
                    f"({days_text(self._max_skew)}) ahead of this server's clock")})  # fmt: skip
            else:
                reports.append(r)
        errors.sort(key=lambda e: int(e["index"]))
        return reports, errors
