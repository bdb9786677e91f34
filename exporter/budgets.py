"""Budgets: spend per UTC calendar window = stored rollups + reports not yet flushed.

Stored spend comes from the database (every replica's flushed reports); the unflushed part is
this replica's WAL, tracked per segment so it disappears exactly when the segment is dropped
after commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from exporter.config import BudgetSpec
from exporter.selfmetrics import SelfMetrics
from exporter.timeutil import as_utc
from exporter.usage import UsageReport

log = logging.getLogger(__name__)

Window = Literal["day", "week", "month"]
#: (budget, window start, window end) → stored spend in that window
SpendQuery = Callable[[BudgetSpec, datetime, datetime], Awaitable[Decimal]]
_Key = tuple[str, datetime]  # budget name, start of the window the reports fall in


def window_bounds(window: Window, now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar window holding `now`: [start, end). Weeks start on Monday."""
    now = as_utc(now)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "day":
        return day, day + timedelta(days=1)
    if window == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def matches(spec: BudgetSpec, user: str, team: str, api_key_id: str, model: str) -> bool:
    return (
        (spec.user is None or spec.user == user)
        and (spec.team is None or spec.team == team)
        and (spec.api_key_id is None or spec.api_key_id == api_key_id)
        and (spec.model is None or spec.model == model)
    )


@dataclass
class BudgetState:
    spec: BudgetSpec
    window_start: datetime
    window_end: datetime
    stored_usd: float = 0.0
    pending_usd: float = 0.0
    refreshed_at: datetime | None = None

    @property
    def spent_usd(self) -> float:
        return self.stored_usd + self.pending_usd

    @property
    def ratio(self) -> float:
        return self.spent_usd / self.spec.limit_usd

    @property
    def status(self) -> Literal["ok", "warning", "exceeded"]:
        if self.ratio >= 1:
            return "exceeded"
        if self.spec.warn_ratios and self.ratio >= self.spec.warn_ratios[0]:
            return "warning"
        return "ok"

    def as_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "name": s.name,
            "match": {
                k: v
                for k, v in (
                    ("user", s.user),
                    ("team", s.team),
                    ("api_key_id", s.api_key_id),
                    ("model", s.model),
                )
                if v is not None
            },
            "window": s.window,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "limit_usd": s.limit_usd,
            "spent_usd": round(self.spent_usd, 10),
            "stored_usd": round(self.stored_usd, 10),
            "unflushed_usd": round(self.pending_usd, 10),
            "usage_ratio": round(self.ratio, 6),
            "warn_ratios": s.warn_ratios,
            "status": self.status,
            "refreshed_at": self.refreshed_at.isoformat() if self.refreshed_at else None,
        }


class BudgetTracker:
    def __init__(
        self,
        specs: Sequence[BudgetSpec],
        self_metrics: SelfMetrics,
        spend_query: SpendQuery,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._specs = list(specs)
        self._m = self_metrics
        self._query = spend_query
        self._clock = clock
        #: WAL segment seq → unflushed cost per (budget, window start); O(segments) to read
        self._unflushed: dict[int, dict[_Key, float]] = {}
        now = clock()
        self._states = {s.name: BudgetState(s, *window_bounds(s.window, now)) for s in self._specs}
        self._failing = False
        for s in self._specs:
            self._m.budget_limit.labels(s.name).set(s.limit_usd)
            self._m.budget_warn_ratio.labels(s.name).set(s.warn_ratios[0] if s.warn_ratios else 1)
        self._publish()

    @property
    def enabled(self) -> bool:
        return bool(self._specs)

    # -- unflushed spend, fed by ingest and drained by the flusher ---------------------------
    def on_durable(self, seq: int, reports: Sequence[UsageReport]) -> None:
        if not self._specs:
            return
        bucket = self._unflushed.setdefault(seq, defaultdict(float))
        for r in reports:
            if not r.cost_usd or r.completed_at is None:
                continue
            for spec in self._specs:
                if matches(spec, r.user, r.team, r.api_key_id, r.model):
                    start = window_bounds(spec.window, r.completed_at)[0]
                    bucket[(spec.name, start)] += r.cost_usd

    def on_dropped(self, seq: int) -> None:
        self._unflushed.pop(seq, None)

    def _pending(self, state: BudgetState) -> float:
        key = (state.spec.name, state.window_start)
        return sum(bucket.get(key, 0.0) for bucket in self._unflushed.values())

    # -- refresh -----------------------------------------------------------------------------
    def _roll(self, state: BudgetState, now: datetime) -> None:
        if now >= state.window_end or now < state.window_start:
            state.window_start, state.window_end = window_bounds(state.spec.window, now)
            state.stored_usd = 0.0  # a new window starts empty until the next query
            state.refreshed_at = None

    async def refresh(self) -> None:
        now = self._clock()
        error: Exception | None = None
        for state in self._states.values():
            self._roll(state, now)
            try:
                stored = await self._query(state.spec, state.window_start, state.window_end)
            except Exception as exc:  # the database may be down; keep serving last values
                error = exc
                continue
            state.stored_usd = float(stored)
            state.refreshed_at = now
        if error is not None and not self._failing:
            log.warning(
                "budgets: spend query failed (%s: %s); keeping last values",
                type(error).__name__,
                error,
            )
        elif error is None and self._failing:
            log.info("budgets: spend query works again")
        self._failing = error is not None
        self._publish()

    def _publish(self) -> None:
        now = self._clock()
        for state in self._states.values():
            self._roll(state, now)
            state.pending_usd = self._pending(state)
            name = state.spec.name
            self._m.budget_spent.labels(name).set(state.spent_usd)
            self._m.budget_ratio.labels(name).set(state.ratio)
            self._m.budget_window_end.labels(name).set(state.window_end.timestamp())

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Refresh until `stop` is set; never cancelled mid-query (that upsets DB drivers)."""
        while not stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    # -- read side ---------------------------------------------------------------------------
    def states(self) -> list[BudgetState]:
        self._publish()
        return list(self._states.values())

    def check(self, user: str, team: str, api_key_id: str, model: str) -> dict[str, Any]:
        """Is one more request within every budget that matches it?"""
        self._publish()
        matching = [
            s for s in self._states.values() if matches(s.spec, user, team, api_key_id, model)
        ]
        exceeded = [s.spec.name for s in matching if s.status == "exceeded"]
        return {
            "allowed": not exceeded,
            "exceeded": exceeded,
            "budgets": [s.as_json() for s in matching],
        }
