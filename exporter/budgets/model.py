"""One configured budget, compiled: its window, match, stored spend and what a read shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from exporter.budgets.window import HOUR, WindowKind, parse_window
from exporter.config import BudgetSpec
from exporter.money import COST_QUANTUM, stored_money

__all__ = ["Budget", "BudgetView", "cost_decimal"]

ZERO = Decimal(0).quantize(COST_QUANTUM)
DIMS = ("user", "team", "api_key_id", "model")
Status = Literal["ok", "warning", "exceeded"]


def cost_decimal(value: Any) -> Decimal:
    """A report's cost as the store keeps it: the one rule of exporter.money (exact text,
    half-even at 1e-10 USD)."""
    if value is None:
        return ZERO
    return stored_money(value)


def money(d: Decimal) -> str:
    return format(d.quantize(COST_QUANTUM), "f")


@dataclass(slots=True, eq=False)
class Budget:
    index: int
    spec: BudgetSpec
    kind: WindowKind = field(init=False)
    fixed: tuple[str | None, str | None, str | None, str | None] = field(init=False)
    start: datetime = field(init=False)
    end: datetime = field(init=False)
    #: the last landed spend query: per value, its window, its epoch (0: none or a snapshot)
    stored: dict[str, Decimal] = field(default_factory=dict)
    head: dict[str, Decimal] = field(default_factory=dict)  # rolling: the oldest hour
    covered: tuple[datetime, datetime] | None = None
    epoch: int = 0
    refreshed_at: datetime | None = None
    gauge_values: dict[str, None] = field(default_factory=dict)  # ordered set, capped
    refreshed_json: str | None = None  # refreshed_at as ISO text
    #: JSON parts that change only with the config or the window (a check reads many budgets)
    static_json: dict[str, Any] = field(init=False)
    match_json: dict[str, str] = field(init=False)
    window_json: dict[str, str] = field(init=False)
    moves: int = -1  # windows moved so far (the tracker regroups its queries when one did)

    def __post_init__(self) -> None:
        s = self.spec
        self.kind = parse_window(s.window, s.timezone)
        self.fixed = (s.user, s.team, s.api_key_id, s.model)
        self.match_json = {d: v for d, v in zip(DIMS, self.fixed, strict=True) if v is not None}
        self.static_json = {
            "name": s.name, "per": s.per, "window": s.window, "timezone": s.timezone or "UTC",
            "limit_usd": money(s.limit_usd), "warn_ratios": s.warn_ratios,
        }  # fmt: skip
        self._set_window(*self.kind.bounds(datetime.now(UTC)))  # rolled by the tracker

    def _set_window(self, start: datetime, end: datetime) -> None:
        self.start, self.end = start, end
        self.moves += 1
        end_text = end.isoformat()
        self.window_json = {"window_start": start.isoformat(), "window_end": end_text,
                            "resets_at": end_text}  # fmt: skip

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def query_kind(self) -> tuple[Any, ...]:
        """What one grouped spend query reads: window, fixed fields, template field."""
        fixed = tuple(i for i, v in enumerate(self.fixed) if v is not None)
        return (self.start, self.end, self.kind.rolling is not None, fixed, self.spec.per)

    def roll(self, now: datetime) -> None:
        # a rolling window is the same only within its current hour
        since = self.start if self.kind.rolling is None else self.end - HOUR
        if not since <= now < self.end:
            self._set_window(*self.kind.bounds(now))

    def key_of(self, at: datetime) -> datetime:
        """Ledger key of spend completed at `at` (fast path: the current window)."""
        if self.start <= at < self.end and self.kind.rolling is None:
            return self.start
        return self.kind.key(at)

    def stored_for(self, value: str) -> Decimal:
        """Stored spend of `value` in the current window, never below what the database had
        at the last landed query: a rolling window that slid drops its oldest stored hour
        (after a longer stall it keeps more, reading high, never low)."""
        if self.covered is None:
            return ZERO
        qs = self.covered[0]
        if self.kind.rolling is None:
            return self.stored.get(value, ZERO) if qs == self.start else ZERO
        total = self.stored.get(value, ZERO)
        if qs < self.start and qs + HOUR <= self.start:
            total -= self.head.get(value, ZERO)
        return total


@dataclass(slots=True)
class BudgetView:
    """What one budget (one template value) reads at one instant."""

    budget: Budget
    value: str
    stored: Decimal
    unflushed: Decimal

    @property
    def spent(self) -> Decimal:
        return self.stored + self.unflushed

    @property
    def label(self) -> str:
        return f"{self.budget.name}:{self.value}" if self.budget.spec.per else self.budget.name

    @property
    def ratio(self) -> float:
        return float(self.spent / self.budget.spec.limit_usd)

    @property
    def status(self) -> Status:
        if self.spent >= self.budget.spec.limit_usd:
            return "exceeded"
        warn = self.budget.spec.warn_ratios
        if warn and self.ratio >= warn[0]:
            return "warning"
        return "ok"

    def as_json(self) -> dict[str, Any]:
        """The view as the API shows it (a check renders a dozen of these: kept lean, the
        parts that change only with the config or the window are prebuilt on the budget)."""
        b = self.budget
        spec = b.spec
        stored, unflushed = self.stored, self.unflushed
        spent = stored + unflushed
        limit = spec.limit_usd
        ratio = float(spent / limit)
        warn = spec.warn_ratios
        out = b.static_json.copy()
        per = spec.per
        if per:
            out["budget"] = f"{spec.name}:{self.value}"
            out["match"] = {**b.match_json, per: self.value}
        else:
            out["budget"] = spec.name
            out["match"] = b.match_json
        out.update(b.window_json)
        out["spent_usd"] = _text(spent)  # amounts are all in 1e-10 steps already
        out["stored_usd"] = _text(stored)
        out["unflushed_usd"] = _text(unflushed)
        out["usage_ratio"] = round(ratio, 6)
        out["status"] = (
            "exceeded" if spent >= limit else "warning" if warn and ratio >= warn[0] else "ok"
        )
        out["refreshed_at"] = b.refreshed_json
        return out


def _text(d: Decimal) -> str:
    """`format(d, "f")`; `str` is the same text and cheaper unless it picks an exponent."""
    text = str(d)
    return text if "E" not in text else format(d, "f")
