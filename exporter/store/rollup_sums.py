"""The additive rollup columns: how each is aggregated in Postgres and per row in Python.

One entry per sum column of `usage_rollups` (exporter.store.rows builds both write paths
from them). Averages divide a sum by the count of reports that carried the value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from exporter.store.tables import COST_QUANTUM

__all__ = ["ROLLUP_SPECS", "RollupSum"]

_ZERO = Decimal(0).quantize(COST_QUANTUM)


@dataclass(frozen=True, slots=True)
class RollupSum:
    """One additive rollup column: how Postgres aggregates it over the newly inserted detail
    rows, and what one detail row adds to it (SQLite path)."""

    column: str
    sql: str
    reads: tuple[str, ...]
    #: one row's contribution; None: the value of the one (never NULL) column it reads
    of: Callable[[Any], Any] | None = None
    zero: Any = 0


def _column_sum(name: str) -> RollupSum:
    return RollupSum(name, f'sum("{name}")', (name,))


ROLLUP_SPECS: Mapping[str, RollupSum] = {
    s.column: s
    for s in (
        RollupSum("requests", "count(*)", (), lambda r: 1),
        RollupSum(
            "errors",
            "count(*) FILTER (WHERE status <> 'success')",
            ("status",),
            lambda r: int(r.status != "success"),
        ),
        _column_sum("input_tokens"),
        _column_sum("output_tokens"),
        _column_sum("cached_input_tokens"),
        _column_sum("cache_creation_input_tokens"),
        _column_sum("reasoning_tokens"),
        RollupSum(
            "cost_usd",
            "coalesce(sum(cost_usd), 0)",
            ("cost_usd",),
            lambda r: _ZERO if r.cost_usd is None else r.cost_usd,
            _ZERO,
        ),
        RollupSum(
            "duration_ms_sum",
            "coalesce(sum(duration_ms), 0)",
            ("duration_ms",),
            lambda r: 0.0 if r.duration_ms is None else r.duration_ms,
            0.0,
        ),
        RollupSum(
            "unpriced",
            "count(*) FILTER (WHERE cost_usd IS NULL)",
            ("cost_usd",),
            lambda r: int(r.cost_usd is None),
        ),
        # averages divide by the reports that carried the value, not by requests
        RollupSum(
            "duration_count",
            "count(duration_ms)",
            ("duration_ms",),
            lambda r: int(r.duration_ms is not None),
        ),
        RollupSum(
            "ttft_ms_sum",
            "coalesce(sum(ttft_ms), 0)",
            ("ttft_ms",),
            lambda r: 0.0 if r.ttft_ms is None else r.ttft_ms,
            0.0,
        ),
        RollupSum(
            "ttft_count", "count(ttft_ms)", ("ttft_ms",), lambda r: int(r.ttft_ms is not None)
        ),
        RollupSum(
            "cancelled",
            "count(*) FILTER (WHERE status = 'cancelled')",
            ("status",),
            lambda r: int(r.status == "cancelled"),
        ),
        RollupSum(
            "estimated",
            "count(*) FILTER (WHERE estimated)",
            ("estimated",),
            lambda r: int(bool(r.estimated)),
        ),
    )
}
