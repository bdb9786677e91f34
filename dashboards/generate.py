#!/usr/bin/env python3
"""Generate the Grafana dashboards of llm-usage-exporter (stdlib only).

    python dashboards/generate.py            # (re)write dashboards/*.json
    python dashboards/generate.py --check    # exit 1 if a committed JSON file differs

The JSON files are build output: edit this file, run it, commit both.

Tests and tools import this module (``importlib`` by path, it is not a package):

* ``prometheus_queries(expand=False)`` -> list of ``PanelQuery(dashboard_uid, panel_title,
  expr, allow_empty)``: every PromQL query of every panel, in board order. With
  ``expand=True`` (or via ``expand_promql``) the Grafana variables are replaced so that the
  query can be sent to Prometheus' HTTP API as it is.
* ``ALLOW_EMPTY``: (dashboard uid, panel title) -> why that panel may legitimately return no
  series in a live test. Every other query must return at least one series once the live
  test has produced the data listed in ``LIVE_TEST_DATA``.
* ``prometheus_variable_queries()``: the ``label_values(...)`` template variables.
* ``postgres_queries()`` / ``expand_sql``: the SQL of the billing board and its variables.
* ``build_dashboards()`` -> {file name: dashboard dict}; ``render(dashboard)`` -> JSON text.

Conventions (checked by tests/test_dashboards_static.py): schemaVersion 39, the data source is
a template variable (``${datasource}``), a stable uid per board, every panel has a title, a
description and a unit, ids are unique and panels never overlap. Counters are aggregated with
``sum by (...)`` so that several exporter replicas add up; budget gauges are per budget and the
same on every replica (stored spend + that replica's unflushed reports), so they aggregate with
``max by (budget)`` instead. Panels use raw metric names, never recording rules.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

SCHEMA_VERSION = 39
HERE = Path(__file__).resolve().parent
JOB = "llm-usage-exporter"  # the Prometheus scrape job of the exporter (prometheus.yml)

PROMETHEUS = "prometheus"
POSTGRES = "grafana-postgresql-datasource"
DS_PROM = {"type": PROMETHEUS, "uid": "${datasource}"}
DS_PG = {"type": POSTGRES, "uid": "${datasource}"}

UID_OVERVIEW = "llm-usage-overview"
UID_BUDGETS = "llm-budgets"
UID_HEALTH = "llm-exporter-health"
UID_BILLING = "llm-billing"

#: Panels whose queries may return nothing in a healthy live test, and why. Keep this short.
ALLOW_EMPTY: dict[tuple[str, str], str] = {
    (UID_BUDGETS, "Firing budget and cost alerts"): (
        "ALERTS only has series while an alert is pending or firing; a healthy test stack "
        "(or one without the rule files loaded) has none, and an empty table is the good state."
    ),
}

#: What a live test must produce so that every other panel query returns data.
LIVE_TEST_DATA = """\
- Prometheus scrapes the exporter with job="llm-usage-exporter" (up, scrape_* series), at
  least twice inside the rate window used for $__rate_interval (pass it to expand_promql).
- Reports covering: a success and an error (status error or cancelled), cached and
  cache-creation input tokens, reasoning tokens, a cost, duration_ms and ttft_ms (both
  histograms), an incomplete stream (estimated), a duplicate request_id, one invalid item
  (llm_usage_reports_rejected_total{reason="invalid"}).
- Enough distinct users to pass a small cap (e.g. LLM_USAGE_MAX_USERS=2 and three users) so
  llm_usage_label_overflow_total{label="user"} exists.
- At least one budget configured (LLM_USAGE_BUDGETS) and one flush completed.
"""


# --------------------------------------------------------------------------- panels


class Board:
    """One dashboard being built: places panels on the 24-column grid left to right."""

    def __init__(
        self,
        *,
        uid: str,
        title: str,
        description: str,
        datasource_type: str,
        variables: Sequence[dict[str, Any]],
        time_from: str,
        refresh: str,
        timezone: str = "browser",
        tags: Sequence[str] = (),
    ) -> None:
        self.uid = uid
        self.title = title
        self.description = description
        self.datasource_type = datasource_type
        self.variables = [datasource_variable(datasource_type), *variables]
        self.time_from = time_from
        self.refresh = refresh
        self.timezone = timezone
        self.tags = ["llm-usage", *tags]
        self.panels: list[dict[str, Any]] = []
        self._next_id = 1
        self._x = 0
        self._y = 0
        self._line_bottom = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self._x + w > 24:
            self._x, self._y = 0, self._line_bottom
        pos = {"h": h, "w": w, "x": self._x, "y": self._y}
        self._x += w
        self._line_bottom = max(self._line_bottom, self._y + h)
        return pos

    def row(self, title: str) -> None:
        self._x, self._y = 0, self._line_bottom
        self.panels.append(
            {
                "id": self._take_id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": self._place(24, 1),
                "panels": [],
            }
        )
        self._x, self._y = 0, self._line_bottom

    def _take_id(self) -> int:
        pid = self._next_id
        self._next_id += 1
        return pid

    def add(
        self,
        kind: str,
        title: str,
        description: str,
        targets: Sequence[dict[str, Any]],
        *,
        unit: str,
        w: int = 12,
        h: int = 8,
        decimals: int | None = None,
        thresholds: Sequence[tuple[str, float | None]] = (("green", None),),
        min_value: float | None = None,
        max_value: float | None = None,
        options: Mapping[str, Any] | None = None,
        custom: Mapping[str, Any] | None = None,
        overrides: Sequence[dict[str, Any]] = (),
        mappings: Sequence[dict[str, Any]] = (),
        transformations: Sequence[dict[str, Any]] = (),
        interval: str | None = None,
        color_mode: str | None = None,
    ) -> None:
        ds = DS_PROM if self.datasource_type == PROMETHEUS else DS_PG
        refs = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        full_targets = []
        for i, t in enumerate(targets):
            full_targets.append({"datasource": ds, "refId": refs[i], **t})
        defaults: dict[str, Any] = {
            "unit": unit,
            "color": {"mode": color_mode or _default_color_mode(kind)},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": c, "value": v} for c, v in thresholds],
            },
            "mappings": list(mappings),
        }
        if decimals is not None:
            defaults["decimals"] = decimals
        if min_value is not None:
            defaults["min"] = min_value
        if max_value is not None:
            defaults["max"] = max_value
        if custom:
            defaults["custom"] = dict(custom)
        panel: dict[str, Any] = {
            "id": self._take_id(),
            "type": kind,
            "title": title,
            "description": description,
            "datasource": ds,
            "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
            "options": dict(options) if options is not None else _default_options(kind),
            "targets": full_targets,
        }
        if interval:
            panel["interval"] = interval
        if transformations:
            panel["transformations"] = list(transformations)
        self.panels.append(panel)

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "timezone": self.timezone,
            "weekStart": "",
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "refresh": self.refresh,
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    }
                ]
            },
            "links": [
                {
                    "title": "LLM usage dashboards",
                    "type": "dashboards",
                    "tags": ["llm-usage"],
                    "asDropdown": True,
                    "includeVars": False,
                    "keepTime": True,
                    "icon": "external link",
                    "targetBlank": False,
                    "tooltip": "",
                    "url": "",
                }
            ],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def _default_color_mode(kind: str) -> str:
    return "thresholds" if kind in ("stat", "gauge", "bargauge", "table") else "palette-classic"


def _default_options(kind: str) -> dict[str, Any]:
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if kind == "timeseries":
        return {
            "legend": {
                "calcs": ["mean", "max", "lastNotNull"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if kind == "stat":
        return {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": reduce,
            "textMode": "auto",
        }
    if kind == "bargauge":
        return {
            "displayMode": "gradient",
            "orientation": "horizontal",
            "reduceOptions": reduce,
            "showUnfilled": True,
            "minVizHeight": 16,
            "minVizWidth": 0,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
        }
    if kind == "gauge":
        return {
            "orientation": "auto",
            "reduceOptions": reduce,
            "showThresholdLabels": False,
            "showThresholdMarkers": True,
        }
    if kind == "table":
        return {"cellHeight": "sm", "footer": {"show": False}, "showHeader": True}
    raise ValueError(kind)


def prom(
    expr: str, legend: str = "__auto", *, instant: bool = False, table: bool = False
) -> dict[str, Any]:
    """A Prometheus target. Range queries unless `instant` (tables, top-N bars)."""
    target: dict[str, Any] = {
        "editorMode": "code",
        "expr": _squash(expr),
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
    }
    if table:
        target["format"] = "table"
    return target


def sql(query: str, fmt: str = "time_series") -> dict[str, Any]:
    """A Postgres target (raw SQL, code mode)."""
    return {"editorMode": "code", "format": fmt, "rawQuery": True, "rawSql": query.strip()}


def _squash(expr: str) -> str:
    """One-line PromQL: the generator source may wrap long expressions."""
    return re.sub(r"\s+", " ", expr.strip()).replace("( ", "(").replace(" )", ")")


# --------------------------------------------------------------------------- variables


def datasource_variable(ds_type: str) -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": ds_type,
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def label_values_variable(name: str, label: str, metric: str, title: str) -> dict[str, Any]:
    query = f"label_values({metric}, {label})"
    return {
        "name": name,
        "label": title,
        "type": "query",
        "datasource": DS_PROM,
        "definition": query,
        "query": {
            "qryType": 1,
            "query": query,
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
        },
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }


#: Custom "All" value of the billing variables. Grafana inserts a custom all value verbatim
#: (unquoted), so the quotes are part of it; the filter below short-circuits on it. Without a
#: custom value "All" would expand to the full quoted list, and to `IN ()` (a syntax error) on
#: an empty table.
SQL_ALL = "'__all__'"


def sql_variable(name: str, column: str, title: str) -> dict[str, Any]:
    # S608: SQL built from this file's constants only, no input reaches it.
    query = (
        f"SELECT DISTINCT {_key(column)} FROM usage_rollups "  # noqa: S608
        f"WHERE granularity = 'day' AND {DAYS_IN_RANGE} ORDER BY 1"
    )
    return {
        "name": name,
        "label": title,
        "type": "query",
        "datasource": DS_PG,
        "definition": query,
        "query": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": SQL_ALL,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }


# --------------------------------------------------------------------------- overview

SEL = 'model=~"$model", operation=~"$operation", user=~"$user"'
HSEL = 'model=~"$model", operation=~"$operation"'  # histograms carry no `user` label
RI = "[$__rate_interval]"

TOKEN_TYPES = (
    ("input", "llm_input_tokens_total"),
    ("output", "llm_output_tokens_total"),
    ("cached (cache read)", "llm_cached_input_tokens_total"),
    ("cache creation (cache write)", "llm_cache_creation_input_tokens_total"),
    ("reasoning", "llm_reasoning_tokens_total"),
)
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
PERCENT_STEPS = (("green", None), ("orange", 0.8), ("red", 1.0))


def _rate(metric: str, sel: str = SEL, by: str = "") -> str:
    agg = f"sum by ({by})" if by else "sum"
    return f"{agg} (rate({metric}{{{sel}}}{RI}))"


def _quantiles(metric: str, sel: str, by: str = "") -> list[dict[str, Any]]:
    extra = f", {by}" if by else ""
    legend_prefix = "{{" + by + "}} " if by else ""
    return [
        prom(
            f"histogram_quantile({q}, sum by (le{extra}) (rate({metric}_bucket{{{sel}}}{RI})))",
            f"{legend_prefix}{name}",
        )
        for name, q in QUANTILES
    ]


def overview() -> Board:
    b = Board(
        uid=UID_OVERVIEW,
        title="LLM usage: overview",
        description=(
            "Requests, tokens, cost, cache use, errors and latency of LLM calls reported to "
            "llm-usage-exporter. Live counters summed over all exporter replicas."
        ),
        datasource_type=PROMETHEUS,
        variables=[
            label_values_variable("model", "model", "llm_requests_total", "Model"),
            label_values_variable("operation", "operation", "llm_requests_total", "Operation"),
            label_values_variable("user", "user", "llm_requests_total", "User"),
        ],
        time_from="now-24h",
        refresh="1m",
        tags=["llm"],
    )

    b.row("At a glance")
    b.add(
        "stat",
        "Requests/s",
        "Model calls per second reported by all replicas (llm_requests_total).",
        [prom(_rate("llm_requests_total"), "requests/s")],
        unit="reqps",
        w=4,
        h=4,
    )
    b.add(
        "stat",
        "Tokens/s (input + output)",
        "Input plus output tokens per second (llm_input_tokens_total + "
        "llm_output_tokens_total). Input includes cache reads and writes; output includes "
        "reasoning.",
        [
            prom(
                f"{_rate('llm_input_tokens_total')} + {_rate('llm_output_tokens_total')}",
                "tokens/s",
            )
        ],
        unit="short",
        w=4,
        h=4,
    )
    b.add(
        "stat",
        "Cost rate (USD per hour)",
        "Current spend rate in US dollars per hour (rate of llm_cost_usd_total x 3600).",
        [prom(f"{_rate('llm_cost_usd_total')} * 3600", "USD/hour")],
        unit="currencyUSD",
        decimals=2,
        w=4,
        h=4,
    )
    b.add(
        "stat",
        "Cost in selected range (USD)",
        "Spend over the whole selected time range (increase of llm_cost_usd_total). The "
        "billing board has the exact stored figures.",
        [
            prom(
                f"sum (increase(llm_cost_usd_total{{{SEL}}}[$__range]))",
                "USD",
                instant=True,
            )
        ],
        unit="currencyUSD",
        decimals=2,
        w=4,
        h=4,
        options={**_default_options("stat"), "graphMode": "none"},
    )
    b.add(
        "stat",
        "Cache hit ratio",
        "Share of input tokens served from a prompt cache: cached input tokens / all input "
        "tokens (input tokens include cache reads and writes).",
        [
            prom(
                f"{_rate('llm_cached_input_tokens_total')} / {_rate('llm_input_tokens_total')}",
                "cache hit ratio",
            )
        ],
        unit="percentunit",
        decimals=1,
        min_value=0,
        max_value=1,
        w=4,
        h=4,
    )
    b.add(
        "stat",
        "Error ratio",
        "Share of model calls that ended in error or were cancelled "
        "(llm_request_errors_total / llm_requests_total).",
        [
            prom(
                f"{_rate('llm_request_errors_total')} / {_rate('llm_requests_total')}",
                "error ratio",
            )
        ],
        unit="percentunit",
        decimals=2,
        thresholds=(("green", None), ("orange", 0.01), ("red", 0.05)),
        min_value=0,
        max_value=1,
        w=4,
        h=4,
    )

    b.row("Traffic and tokens")
    b.add(
        "timeseries",
        "Requests/s by model",
        "Model calls per second by model (llm_requests_total).",
        [prom(_rate("llm_requests_total", by="model"), "{{model}}")],
        unit="reqps",
    )
    b.add(
        "timeseries",
        "Tokens/s by type",
        "Tokens per second by type. Input includes cached and cache-creation tokens; output "
        "includes reasoning tokens, so the lines overlap rather than add up.",
        [prom(_rate(metric), label) for label, metric in TOKEN_TYPES],
        unit="short",
    )
    b.add(
        "timeseries",
        "Requests/s by operation",
        "Model calls per second by operation (chat, embedding, responses, ...).",
        [prom(_rate("llm_requests_total", by="operation"), "{{operation}}")],
        unit="reqps",
    )
    b.add(
        "timeseries",
        "Tokens/s by model (input + output)",
        "Input plus output tokens per second by model.",
        [
            prom(
                f"{_rate('llm_input_tokens_total', by='model')} + "
                f"{_rate('llm_output_tokens_total', by='model')}",
                "{{model}}",
            )
        ],
        unit="short",
    )

    b.row("Cost")
    bars = {
        "drawStyle": "bars",
        "fillOpacity": 80,
        "lineWidth": 1,
        "stacking": {"group": "A", "mode": "normal"},
    }
    b.add(
        "timeseries",
        "Cost per hour by model (USD)",
        "Spend in each hour by model (increase of llm_cost_usd_total over 1h, one bar per "
        "hour, stacked).",
        [prom(f"sum by (model) (increase(llm_cost_usd_total{{{SEL}}}[1h]))", "{{model}}")],
        unit="currencyUSD",
        interval="1h",
        custom=bars,
    )
    b.add(
        "timeseries",
        "Cost per day by model (USD)",
        "Spend in each day by model (increase of llm_cost_usd_total over 1d, one bar per "
        "day, stacked). Widen the time range to see several days.",
        [prom(f"sum by (model) (increase(llm_cost_usd_total{{{SEL}}}[1d]))", "{{model}}")],
        unit="currencyUSD",
        interval="1d",
        custom=bars,
    )

    b.row("Top spenders (selected range)")
    top = {
        **_default_options("bargauge"),
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    }
    for who in ("model", "user"):
        b.add(
            "bargauge",
            f"Top {who}s by cost (USD)",
            f"The 10 {who}s with the highest spend over the selected range "
            "(topk of increase(llm_cost_usd_total[$__range])).",
            [
                prom(
                    f"topk(10, sum by ({who}) (increase(llm_cost_usd_total{{{SEL}}}[$__range])))",
                    f"{{{{{who}}}}}",
                    instant=True,
                )
            ],
            unit="currencyUSD",
            decimals=2,
            w=6,
            options=top,
            color_mode="continuous-BlYlRd",
        )
    for who in ("model", "user"):
        b.add(
            "bargauge",
            f"Top {who}s by tokens",
            f"The 10 {who}s with the most input plus output tokens over the selected range.",
            [
                prom(
                    f"topk(10, sum by ({who}) "
                    f"(increase(llm_input_tokens_total{{{SEL}}}[$__range])) + "
                    f"sum by ({who}) (increase(llm_output_tokens_total{{{SEL}}}[$__range])))",
                    f"{{{{{who}}}}}",
                    instant=True,
                )
            ],
            unit="short",
            w=6,
            options=top,
            color_mode="continuous-BlYlRd",
        )

    b.row("Cache and errors")
    b.add(
        "timeseries",
        "Cache hit ratio by model",
        "Cached input tokens / all input tokens, by model. Models without prompt caching "
        "stay at 0.",
        [
            prom(
                f"{_rate('llm_cached_input_tokens_total', by='model')} / "
                f"{_rate('llm_input_tokens_total', by='model')}",
                "{{model}}",
            )
        ],
        unit="percentunit",
        min_value=0,
        max_value=1,
        w=8,
    )
    b.add(
        "timeseries",
        "Error ratio by model",
        "Errors and cancellations / all calls, by model.",
        [
            prom(
                f"{_rate('llm_request_errors_total', by='model')} / "
                f"{_rate('llm_requests_total', by='model')}",
                "{{model}}",
            )
        ],
        unit="percentunit",
        min_value=0,
        w=8,
    )
    b.add(
        "timeseries",
        "Errors/s by model and operation",
        "Calls per second that ended in error or were cancelled (llm_request_errors_total).",
        [
            prom(
                _rate("llm_request_errors_total", by="model, operation"),
                "{{model}} {{operation}}",
            )
        ],
        unit="reqps",
        w=8,
    )

    b.row("Latency")
    b.add(
        "timeseries",
        "Request duration p50 / p95 / p99",
        "Quantiles of the model call duration over all selected models "
        "(histogram_quantile over llm_request_duration_seconds_bucket).",
        _quantiles("llm_request_duration_seconds", HSEL),
        unit="s",
    )
    b.add(
        "timeseries",
        "Time to first token p50 / p95 / p99",
        "Quantiles of the time to the first streamed token "
        "(histogram_quantile over llm_time_to_first_token_seconds_bucket). Only streamed "
        "calls that report ttft_ms contribute.",
        _quantiles("llm_time_to_first_token_seconds", HSEL),
        unit="s",
    )
    b.add(
        "timeseries",
        "Request duration p95 by model",
        "95th percentile of the model call duration, by model.",
        [
            prom(
                "histogram_quantile(0.95, sum by (le, model) "
                f"(rate(llm_request_duration_seconds_bucket{{{HSEL}}}{RI})))",
                "{{model}}",
            )
        ],
        unit="s",
    )
    b.add(
        "timeseries",
        "Time to first token p95 by model",
        "95th percentile of the time to first token, by model.",
        [
            prom(
                "histogram_quantile(0.95, sum by (le, model) "
                f"(rate(llm_time_to_first_token_seconds_bucket{{{HSEL}}}{RI})))",
                "{{model}}",
            )
        ],
        unit="s",
    )

    b.row("Data quality")
    estimated = (
        f"sum (rate(llm_usage_estimated_reports_total{RI})) / "
        f"sum (rate(llm_usage_reports_received_total{RI}))"
    )
    b.add(
        "timeseries",
        "Estimated vs measured share",
        "Share of accepted reports whose tokens were estimated (incomplete streams: input "
        "from request bytes, output from chunk count) versus measured by the provider. "
        "Not filtered by the variables: these self-metrics have no labels.",
        [prom(estimated, "estimated"), prom(f"1 - ({estimated})", "measured")],
        unit="percentunit",
        min_value=0,
        max_value=1,
        custom={"stacking": {"group": "A", "mode": "normal"}, "fillOpacity": 30},
        w=24,
    )
    return b


# --------------------------------------------------------------------------- budgets

BSEL = 'budget=~"$budget"'


def _budget(metric: str) -> str:
    return f"max by (budget) ({metric}{{{BSEL}}})"


BURN = f"clamp_min(max by (budget) (deriv(llm_budget_spent_usd{{{BSEL}}}[1h])), 0)"
PROJECTED = (
    f"{_budget('llm_budget_spent_usd')} + {BURN} * "
    f"clamp_min({_budget('llm_budget_window_end_timestamp_seconds')} - time(), 0)"
)


def budgets() -> Board:
    b = Board(
        uid=UID_BUDGETS,
        title="LLM usage: budgets",
        description=(
            "Spend of each configured budget against its limit, burn rate and projection to "
            "the end of the budget window, and firing budget / cost alerts."
        ),
        datasource_type=PROMETHEUS,
        variables=[label_values_variable("budget", "budget", "llm_budget_limit_usd", "Budget")],
        time_from="now-7d",
        refresh="1m",
        tags=["llm", "budgets"],
    )
    b.row("Budgets")
    b.add(
        "bargauge",
        "Budget usage ratio",
        "Spent / limit of each budget in its current window (llm_budget_usage_ratio). "
        "Orange from 80 %, red from 100 %. Budget gauges are the same on every replica "
        "(stored spend plus unflushed reports), so they are aggregated with max, not sum.",
        [prom(_budget("llm_budget_usage_ratio"), "{{budget}}", instant=True)],
        unit="percentunit",
        decimals=1,
        thresholds=PERCENT_STEPS,
        min_value=0,
        max_value=1,
        w=8,
        h=8,
        options={**_default_options("bargauge"), "displayMode": "lcd"},
    )
    b.add(
        "timeseries",
        "Spend vs limit (USD)",
        "Spend in the current window (llm_budget_spent_usd, solid) against the budget limit "
        "(llm_budget_limit_usd, dashed). Spend drops back to 0 when a new window starts.",
        [
            prom(_budget("llm_budget_spent_usd"), "{{budget}} spent"),
            prom(_budget("llm_budget_limit_usd"), "{{budget}} limit"),
        ],
        unit="currencyUSD",
        w=16,
        h=8,
        overrides=[
            {
                "matcher": {"id": "byRegexp", "options": ".* limit$"},
                "properties": [
                    {
                        "id": "custom.lineStyle",
                        "value": {"dash": [10, 10], "fill": "dash"},
                    },
                    {"id": "custom.fillOpacity", "value": 0},
                ],
            }
        ],
    )
    b.add(
        "timeseries",
        "Burn rate (USD per hour)",
        "How fast each budget is being spent: deriv(llm_budget_spent_usd[1h]) x 3600, "
        "clamped at 0 so a window reset does not show as negative spend.",
        [prom(f"{BURN} * 3600", "{{budget}}")],
        unit="currencyUSD",
        w=12,
    )
    b.add(
        "bargauge",
        "Projected spend at window end (USD)",
        "Spend now plus the current burn rate until the window ends "
        "(llm_budget_window_end_timestamp_seconds - time()). A straight-line estimate: "
        "it assumes the last hour's pace holds.",
        [prom(PROJECTED, "{{budget}}", instant=True)],
        unit="currencyUSD",
        decimals=2,
        w=6,
        color_mode="continuous-GrYlRd",
    )
    b.add(
        "bargauge",
        "Projected usage ratio at window end",
        "Projected spend at window end / limit. Orange from 80 %, red from 100 %: a budget "
        "red here will be exceeded at the current pace.",
        [prom(f"({PROJECTED}) / {_budget('llm_budget_limit_usd')}", "{{budget}}", instant=True)],
        unit="percentunit",
        decimals=1,
        thresholds=PERCENT_STEPS,
        min_value=0,
        max_value=1.5,
        w=6,
    )
    b.add(
        "table",
        "Budgets",
        "Each budget's limit, spend, usage, lowest warn ratio (alerts fire from it) and the "
        "end of its current window. Right-click or Inspect > Data to export.",
        [
            prom(_budget("llm_budget_limit_usd"), instant=True, table=True),
            prom(_budget("llm_budget_spent_usd"), instant=True, table=True),
            prom(_budget("llm_budget_usage_ratio"), instant=True, table=True),
            prom(_budget("llm_budget_warn_ratio"), instant=True, table=True),
            prom(
                f"{_budget('llm_budget_window_end_timestamp_seconds')} * 1000",
                instant=True,
                table=True,
            ),
        ],
        unit="currencyUSD",
        w=24,
        h=7,
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "Value #A": "limit",
                        "Value #B": "spent",
                        "Value #C": "usage",
                        "Value #D": "warn ratio",
                        "Value #E": "window ends",
                    },
                },
            },
        ],
        overrides=[
            {
                "matcher": {"id": "byName", "options": "usage"},
                "properties": [
                    {"id": "unit", "value": "percentunit"},
                    {
                        "id": "thresholds",
                        "value": {
                            "mode": "absolute",
                            "steps": [{"color": c, "value": v} for c, v in PERCENT_STEPS],
                        },
                    },
                    {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                ],
            },
            {
                "matcher": {"id": "byName", "options": "warn ratio"},
                "properties": [{"id": "unit", "value": "percentunit"}],
            },
            {
                "matcher": {"id": "byName", "options": "window ends"},
                "properties": [{"id": "unit", "value": "dateTimeAsIso"}],
            },
        ],
    )
    b.add(
        "table",
        "Firing budget and cost alerts",
        "Alerts LLMBudget* and LLMCostSpike currently firing (Prometheus ALERTS series). "
        "Empty is the good state. Details and silences live in Alertmanager.",
        [
            prom(
                'ALERTS{alertname=~"LLMBudget.*|LLMCostSpike", alertstate="firing"}',
                instant=True,
                table=True,
            )
        ],
        unit="none",
        w=12,
        transformations=[
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True},
                },
            }
        ],
    )
    b.add(
        "timeseries",
        "Spend rate of all usage (USD per hour)",
        "Overall spend rate by model (rate of llm_cost_usd_total x 3600), for context when "
        "a budget burns fast.",
        [
            prom(
                f"sum by (model) (rate(llm_cost_usd_total{RI})) * 3600",
                "{{model}}",
            )
        ],
        unit="currencyUSD",
        w=12,
    )
    return b


# --------------------------------------------------------------------------- exporter health

ISEL = 'instance=~"$instance"'
UP = f'job="{JOB}", {ISEL}'


def health() -> Board:
    b = Board(
        uid=UID_HEALTH,
        title="LLM usage: exporter health",
        description=(
            "The exporter itself: ingest, rejects, duplicates, flushes to the database, "
            "write-ahead log, label cardinality and scrapes, per replica."
        ),
        datasource_type=PROMETHEUS,
        variables=[
            label_values_variable("instance", "instance", f'up{{job="{JOB}"}}', "Instance"),
        ],
        time_from="now-6h",
        refresh="30s",
        tags=["llm", "exporter"],
    )
    b.row("Ingest")
    b.add(
        "stat",
        "Up",
        f'Whether Prometheus could scrape each replica (up{{job="{JOB}"}}).',
        [prom(f"up{{{UP}}}", "{{instance}}")],
        unit="none",
        w=6,
        h=5,
        thresholds=(("red", None), ("green", 1)),
        mappings=[
            {
                "type": "value",
                "options": {
                    "0": {"text": "DOWN", "color": "red", "index": 0},
                    "1": {"text": "UP", "color": "green", "index": 1},
                },
            }
        ],
        options={**_default_options("stat"), "graphMode": "none", "colorMode": "background"},
    )
    b.add(
        "timeseries",
        "Ingest rate (reports/s)",
        "Reports accepted per second, per replica (llm_usage_reports_received_total): valid "
        "and not duplicates.",
        [
            prom(
                f"sum by (instance) (rate(llm_usage_reports_received_total{{{ISEL}}}{RI}))",
                "{{instance}}",
            )
        ],
        unit="reqps",
        w=9,
        h=5,
    )
    b.add(
        "timeseries",
        "Rejected reports by reason",
        "Reports or bodies refused per second by reason (invalid, bad_body, too_large, "
        "unauthorized, backpressure, ...) from llm_usage_reports_rejected_total.",
        [
            prom(
                f"sum by (reason) (rate(llm_usage_reports_rejected_total{{{ISEL}}}{RI}))",
                "{{reason}}",
            )
        ],
        unit="reqps",
        w=9,
        h=5,
    )
    b.add(
        "timeseries",
        "Duplicate reports/s",
        "Reports whose request_id was already seen: acknowledged, counted once "
        "(llm_usage_reports_duplicate_total). Client retries show up here.",
        [
            prom(
                f"sum by (instance) (rate(llm_usage_reports_duplicate_total{{{ISEL}}}{RI}))",
                "{{instance}}",
            )
        ],
        unit="reqps",
        w=12,
    )
    b.add(
        "timeseries",
        "Unpriced reports/s",
        "Reports stored without a cost (NULL; llm_usage_unpriced_reports_total, by reason: "
        "unknown_model, unknown_unit, invalid_usage). Add the model to the price file, "
        "then run `llm-usage-exporter reprice`.",
        [
            prom(
                f"sum by (instance) (rate(llm_usage_unpriced_reports_total{{{ISEL}}}{RI}))",
                "{{instance}}",
            )
        ],
        unit="reqps",
        w=12,
    )

    b.row("Flush to the database")
    b.add(
        "timeseries",
        "Flush duration p50 / p95 / p99",
        "Quantiles of one flush transaction (histogram_quantile over "
        "llm_usage_flush_duration_seconds_bucket).",
        _quantiles("llm_usage_flush_duration_seconds", ISEL),
        unit="s",
        w=8,
    )
    b.add(
        "timeseries",
        "Flushed reports/s",
        "Reports committed to the database per second (llm_usage_flushed_reports_total).",
        [
            prom(
                f"sum by (instance) (rate(llm_usage_flushed_reports_total{{{ISEL}}}{RI}))",
                "{{instance}}",
            )
        ],
        unit="reqps",
        w=8,
    )
    b.add(
        "timeseries",
        "Flush failures",
        "Flush transactions that failed and were rolled back in each rate interval "
        "(llm_usage_flush_failures_total). Reports stay in the WAL and are retried.",
        [
            prom(
                f"sum by (instance) (increase(llm_usage_flush_failures_total{{{ISEL}}}{RI}))",
                "{{instance}}",
            )
        ],
        unit="short",
        thresholds=(("green", None), ("red", 1)),
        w=8,
    )
    b.add(
        "stat",
        "Time since last successful flush",
        "Seconds since each replica last committed a flush "
        "(time() - llm_usage_last_flush_success_timestamp_seconds). The flush interval is "
        "10 s by default; minutes here mean the database is unreachable or slow. 'never' "
        "means no flush has succeeded since the replica started.",
        [
            prom(
                "time() - max by (instance) "
                f"(llm_usage_last_flush_success_timestamp_seconds{{{ISEL}}})",
                "{{instance}}",
            )
        ],
        unit="s",
        thresholds=(("green", None), ("orange", 60), ("red", 300)),
        # the gauge is 0 until the first flush: time() - 0 is decades, not a real age
        mappings=[
            {
                "type": "range",
                "options": {
                    "from": 1e9,
                    "to": None,
                    "result": {"text": "never", "color": "red", "index": 0},
                },
            }
        ],
        w=8,
        options={**_default_options("stat"), "graphMode": "none"},
    )
    b.add(
        "timeseries",
        "Pending reports",
        "Reports in the WAL not yet committed to the database (llm_usage_pending_reports).",
        [
            prom(
                f"sum by (instance) (llm_usage_pending_reports{{{ISEL}}})",
                "{{instance}}",
            )
        ],
        unit="short",
        w=8,
    )
    b.add(
        "timeseries",
        "WAL bytes vs max",
        "Bytes on disk in the write-ahead log (llm_usage_wal_bytes) against its cap "
        "(llm_usage_wal_max_bytes, dashed). At the cap ingest answers 503 (backpressure).",
        [
            prom(f"sum by (instance) (llm_usage_wal_bytes{{{ISEL}}})", "{{instance}} used"),
            prom(f"max by (instance) (llm_usage_wal_max_bytes{{{ISEL}}})", "{{instance}} max"),
        ],
        unit="bytes",
        w=8,
        overrides=[
            {
                "matcher": {"id": "byRegexp", "options": ".* max$"},
                "properties": [
                    {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}}
                ],
            }
        ],
    )

    b.row("Cardinality and scrapes")
    b.add(
        "timeseries",
        "Label overflow by label",
        "Label values folded into __other__ per rate interval because a label hit its "
        "cardinality cap (llm_usage_label_overflow_total). Raise the cap (max_users, "
        "max_models, ...) or fix the client that sends unbounded values.",
        [
            prom(
                f"sum by (label) (increase(llm_usage_label_overflow_total{{{ISEL}}}{RI}))",
                "{{label}}",
            )
        ],
        unit="short",
        w=8,
    )
    b.add(
        "timeseries",
        "Scrape duration",
        "How long Prometheus takes to scrape /metrics on each replica "
        f'(scrape_duration_seconds{{job="{JOB}"}}). Grows with the number of series.',
        [prom(f"scrape_duration_seconds{{{UP}}}", "{{instance}}")],
        unit="s",
        w=8,
    )
    b.add(
        "timeseries",
        "Samples per scrape",
        "Samples exposed by each replica (scrape_samples_scraped), a proxy for label cardinality.",
        [prom(f"scrape_samples_scraped{{{UP}}}", "{{instance}}")],
        unit="short",
        w=8,
    )
    b.add(
        "table",
        "Build info",
        "Version and Python of each replica (llm_usage_build_info).",
        [prom(f"llm_usage_build_info{{{ISEL}}}", instant=True, table=True)],
        unit="none",
        w=24,
        h=5,
        transformations=[
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            }
        ],
    )
    return b


# --------------------------------------------------------------------------- billing (SQL)


def _key(column: str) -> str:
    """A key column as shown and filtered: '' (absent) becomes '(none)'."""
    return f"COALESCE(NULLIF({column}, ''), '(none)')"


USER = '"user"'  # a reserved word in Postgres: always quoted


def _in(var: str, column: str) -> str:
    return f"({SQL_ALL} IN (${var}) OR {_key(column)} IN (${var}))"


#: Every UTC day that overlaps the picked range, counted whole (rollups are per day).
DAYS_IN_RANGE = (
    "bucket_start >= date_trunc('day', $__timeFrom()::timestamptz, 'UTC') "
    "AND bucket_start < $__timeTo()::timestamptz"
)

WHERE = (
    "WHERE granularity = 'day'\n"
    f"  AND {DAYS_IN_RANGE}\n"
    f"  AND {_in('team', 'team')}\n"
    f"  AND {_in('user', USER)}\n"
    f"  AND {_in('model', 'model')}"
)


def _per_bucket(bucket: str, column: str, top: int | None) -> str:
    """Spend per bucket (day or month) per key, optionally the top N keys plus '(other)'."""
    if top is None:
        name = _key(column)
        head = ""
    else:
        # S608: SQL built from this file's constants only, no input reaches it.
        name = (
            f"CASE WHEN {column} IN (SELECT k FROM top) "  # noqa: S608
            f"THEN {_key(column)} ELSE '(other)' END"
        )
        head = (
            f"WITH top AS (\n  SELECT {column} AS k FROM usage_rollups\n  "  # noqa: S608
            + WHERE.replace("\n", "\n  ")
            + f"\n  GROUP BY {column} ORDER BY SUM(cost_usd) DESC, {column} LIMIT {top}\n)\n"
        )
    return (
        f'{head}SELECT {bucket} AS "time",\n'
        f"  {name} AS metric,\n"
        "  SUM(cost_usd)::double precision AS spend_usd\n"
        f"FROM usage_rollups\n{WHERE}\n"
        "GROUP BY 1, 2\nORDER BY 1, 2"
    )


DAY = "bucket_start"
MONTH = "date_trunc('month', bucket_start, 'UTC')"

EXPORT_COLUMNS = (
    "  SUM(requests)::bigint AS requests,\n"
    "  SUM(errors)::bigint AS errors,\n"
    "  SUM(input_tokens)::bigint AS input_tokens,\n"
    "  SUM(output_tokens)::bigint AS output_tokens,\n"
    "  SUM(cached_input_tokens)::bigint AS cached_input_tokens,\n"
    "  SUM(cache_creation_input_tokens)::bigint AS cache_creation_input_tokens,\n"
    "  SUM(reasoning_tokens)::bigint AS reasoning_tokens,\n"
    "  SUM(cost_usd) AS cost_usd"
)


def _export(period_sql: str, period_name: str) -> str:
    return (
        f"SELECT {period_sql} AS {period_name},\n"
        f"  {_key('team')} AS team,\n"
        f'  {_key(USER)} AS "user",\n'
        "  model,\n  provider,\n"
        f"{EXPORT_COLUMNS}\n"
        f"FROM usage_rollups\n{WHERE}\n"
        "GROUP BY 1, 2, 3, 4, 5\n"
        "ORDER BY 1, SUM(cost_usd) DESC, 2, 3, 4, 5"
    )


def billing() -> Board:
    b = Board(
        uid=UID_BILLING,
        title="LLM usage: billing",
        description=(
            "Exact spend from the stored daily rollups in Postgres (table usage_rollups, "
            "granularity 'day', UTC days), for long ranges and export. Unlike the Prometheus "
            "boards it survives restarts and counts a retried report once."
        ),
        datasource_type=POSTGRES,
        variables=[
            sql_variable("team", "team", "Team"),
            sql_variable("user", USER, "User"),
            sql_variable("model", "model", "Model"),
        ],
        time_from="now-90d",
        refresh="",
        timezone="utc",
        tags=["llm", "billing"],
    )
    b.row("Totals in the selected range")
    totals = (
        ("Spend in range (USD)", "SUM(cost_usd)::double precision", "spend_usd", "currencyUSD"),
        ("Requests in range", "SUM(requests)::bigint", "requests", "short"),
        (
            "Tokens in range (input + output)",
            "SUM(input_tokens + output_tokens)::bigint",
            "tokens",
            "short",
        ),
        (
            "Cached input tokens in range",
            "SUM(cached_input_tokens)::bigint",
            "cached_input_tokens",
            "short",
        ),
    )
    for title, agg, alias, unit in totals:
        b.add(
            "stat",
            title,
            f"{title} from the daily rollups: every UTC day that overlaps the range, whole.",
            [sql(f"SELECT COALESCE({agg}, 0) AS {alias}\nFROM usage_rollups\n{WHERE}", "table")],
            unit=unit,
            decimals=2 if unit == "currencyUSD" else None,
            w=6,
            h=4,
            options={**_default_options("stat"), "graphMode": "none"},
        )

    bars = {
        "drawStyle": "bars",
        "fillOpacity": 80,
        "lineWidth": 1,
        "stacking": {"group": "A", "mode": "normal"},
    }
    b.row("Spend per day")
    for who, column, top in (("team", "team", None), ("user", USER, 20), ("model", "model", 20)):
        topnote = f" The top {top} {who}s of the range; the rest are '(other)'." if top else ""
        b.add(
            "timeseries",
            f"Spend per day by {who} (USD)",
            f"Spend per UTC day by {who}, stacked, from usage_rollups (granularity 'day'). "
            f"'(none)' means the report carried no {who}.{topnote}",
            [sql(_per_bucket(DAY, column, top))],
            unit="currencyUSD",
            w=8 if who != "team" else 24,
            custom=bars,
        )
    b.row("Spend per month")
    for who, column, top in (("team", "team", None), ("user", USER, 20), ("model", "model", 20)):
        topnote = f" The top {top} {who}s of the range; the rest are '(other)'." if top else ""
        b.add(
            "timeseries",
            f"Spend per month by {who} (USD)",
            f"Spend per UTC calendar month by {who}, stacked. The first and last month are "
            "partial when the range starts or ends mid-month." + topnote,
            [sql(_per_bucket(MONTH, column, top))],
            unit="currencyUSD",
            w=8,
            custom=bars,
        )

    b.row("Export")
    table_overrides = [
        {
            "matcher": {"id": "byName", "options": "cost_usd"},
            "properties": [
                {"id": "unit", "value": "currencyUSD"},
                {"id": "decimals", "value": 4},
            ],
        }
    ]
    b.add(
        "table",
        "Monthly usage by team, user and model",
        "One row per UTC month x team x user x model x provider with requests, errors, every "
        "token count and cost. Inspect > Data > Download CSV exports it; the cost column is "
        "the exact NUMERIC sum.",
        [
            sql(
                _export("to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM')", "month"),
                "table",
            )
        ],
        unit="short",
        w=24,
        h=10,
        overrides=table_overrides,
        options={
            **_default_options("table"),
            "footer": {"show": True, "reducer": ["sum"], "fields": "", "countRows": False},
        },
    )
    b.add(
        "table",
        "Daily usage by team, user and model",
        "One row per UTC day x team x user x model x provider, for a detailed export of the "
        "selected range (Inspect > Data > Download CSV).",
        [sql(_export("to_char(bucket_start AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "day"), "table")],
        unit="short",
        w=24,
        h=10,
        overrides=table_overrides,
    )
    return b


# --------------------------------------------------------------------------- output

BOARDS = {
    "llm-usage-overview.json": overview,
    "llm-budgets.json": budgets,
    "llm-exporter-health.json": health,
    "llm-billing.json": billing,
}


def build_dashboards() -> dict[str, dict[str, Any]]:
    """{file name: dashboard JSON object}."""
    return {name: make().to_json() for name, make in BOARDS.items()}


def render(dashboard: Mapping[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def _panels(dashboard: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


class PanelQuery(NamedTuple):
    dashboard_uid: str
    panel_title: str
    expr: str
    allow_empty: bool


def prometheus_queries(*, expand: bool = False, **expand_args: Any) -> list[PanelQuery]:
    """Every PromQL panel query: (dashboard uid, panel title, expr, allow_empty).

    `allow_empty` is True only for the panels in ALLOW_EMPTY. With `expand=True` the Grafana
    variables are substituted by `expand_promql(expr, **expand_args)`.
    """
    out = []
    for dashboard in build_dashboards().values():
        for panel in _panels(dashboard):
            if panel.get("datasource", {}).get("type") != PROMETHEUS:
                continue
            for target in panel["targets"]:
                expr = expand_promql(target["expr"], **expand_args) if expand else target["expr"]
                key = (dashboard["uid"], panel["title"])
                out.append(PanelQuery(dashboard["uid"], panel["title"], expr, key in ALLOW_EMPTY))
    return out


def prometheus_variable_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard uid, variable name, series selector, label) of each label_values variable;
    the live equivalent is GET /api/v1/label/<label>/values?match[]=<selector>."""
    out = []
    for dashboard in build_dashboards().values():
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query" or var["datasource"]["type"] != PROMETHEUS:
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
            if m is None:
                raise ValueError(var["definition"])
            out.append((dashboard["uid"], var["name"], m.group(1), m.group(2)))
    return out


def postgres_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title or 'variable <name>', SQL) of every Postgres query."""
    out = []
    for dashboard in build_dashboards().values():
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query" and var["datasource"]["type"] == POSTGRES:
                out.append((dashboard["uid"], f"variable {var['name']}", var["query"]))
        for panel in _panels(dashboard):
            if panel.get("datasource", {}).get("type") == POSTGRES:
                for target in panel["targets"]:
                    out.append((dashboard["uid"], panel["title"], target["rawSql"]))
    return out


_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def expand_promql(
    expr: str,
    *,
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "1h",
    variables: Mapping[str, str] | None = None,
) -> str:
    """Substitute Grafana variables: `$__rate_interval`, `$__interval`, `$__range` and the
    template variables (default `.*`, i.e. "All"; pass `variables` to pick values)."""
    builtins = {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
    }
    chosen = dict(variables or {})

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in builtins:
            return builtins[name]
        return chosen.get(name, ".*")

    return _VAR.sub(sub, expr)


def expand_sql(
    query: str,
    *,
    start: str = "2024-01-01T00:00:00Z",
    end: str = "2024-12-31T23:59:59Z",
    variables: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Expand the Grafana SQL macros and variables the way Grafana's Postgres data source
    does, so the query can run in psql. A variable absent from `variables` is "All"."""

    def time_filter(m: re.Match[str]) -> str:
        return f"{m.group(1)} BETWEEN '{start}' AND '{end}'"

    query = re.sub(r"\$__timeFilter\(([^)]+)\)", time_filter, query)
    query = query.replace("$__timeFrom()", f"'{start}'").replace("$__timeTo()", f"'{end}'")
    chosen = dict(variables or {})

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in chosen:
            return SQL_ALL
        return ",".join("'" + v.replace("'", "''") + "'" for v in chosen[name])

    return _VAR.sub(sub, query)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a committed JSON file differs"
    )
    parser.add_argument("--out-dir", type=Path, default=HERE, help="default: dashboards/")
    args = parser.parse_args(argv)
    stale = []
    for name, dashboard in build_dashboards().items():
        path = args.out_dir / name
        text = render(dashboard)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run python dashboards/generate.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
