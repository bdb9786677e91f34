"""The budget gauges, computed from the tracker's state at each scrape (a custom collector),
so they are exact at every instant: no stale value between a flush and a refresh, and none
after a window resets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from exporter.budgets.tracker import BudgetTracker

__all__ = ["BudgetCollector"]


class BudgetCollector(Collector):
    def __init__(self, tracker: BudgetTracker) -> None:
        self._tracker = tracker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        fams = {
            "limit": GaugeMetricFamily(
                "llm_budget_limit_usd", "Budget limit for the current window.", labels=["budget"]
            ),
            "spent": GaugeMetricFamily(
                "llm_budget_spent_usd", "Spend in the budget's current window.", labels=["budget"]
            ),
            "ratio": GaugeMetricFamily(
                "llm_budget_usage_ratio", "Budget spend divided by its limit.", labels=["budget"]
            ),
            "warn": GaugeMetricFamily(
                "llm_budget_warn_ratio", "The budget's lowest warning ratio.", labels=["budget"]
            ),
            "end": GaugeMetricFamily(
                "llm_budget_window_end_timestamp_seconds",
                "Unix time at which the budget's current window ends.",
                labels=["budget"],
            ),
        }
        for v in self._tracker.gauge_views():
            label = [v.label]
            spec = v.budget.spec
            fams["limit"].add_metric(label, float(spec.limit_usd))
            fams["spent"].add_metric(label, float(v.spent))
            fams["ratio"].add_metric(label, v.ratio)
            fams["warn"].add_metric(label, spec.warn_ratios[0] if spec.warn_ratios else 1.0)
            fams["end"].add_metric(label, v.budget.end.timestamp())
        yield from fams.values()
        queries = CounterMetricFamily(
            "llm_usage_budget_spend_queries",
            "Budget refresh spend queries per kind of budget, by result.",
            labels=["result"],
        )
        for result, n in self._tracker.queries.items():
            queries.add_metric([result], n)
        yield queries
