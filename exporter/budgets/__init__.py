"""Budgets: config compiled into windows and matches, exact spend (stored + unflushed),
the check endpoint's verdicts and the budget gauges.

Modules: `window` (calendar/rolling windows in a time zone), `spend` (the stored spend query),
`index` (specs by what they match), `ledger` (unflushed spend per WAL segment), `model` (one
budget and what a read shows), `tracker` (wiring them), `snapshot` (state across restarts),
`statefile` (its writer thread), `gauges` (the Prometheus collector).
"""

from __future__ import annotations

from exporter.budgets.gauges import BudgetCollector
from exporter.budgets.model import BudgetView, cost_decimal
from exporter.budgets.spend import Filters, SpendQuery, stored_spend
from exporter.budgets.tracker import BudgetTracker
from exporter.budgets.window import parse_window, window_bounds

__all__ = [
    "BudgetCollector",
    "BudgetTracker",
    "BudgetView",
    "Filters",
    "SpendQuery",
    "cost_decimal",
    "parse_window",
    "stored_spend",
    "window_bounds",
]
