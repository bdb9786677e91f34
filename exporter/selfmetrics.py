"""The exporter's own low-cardinality metrics, in a private prometheus_client registry."""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from exporter import __version__

# `_created` samples double the series count for no dashboard we ship.
disable_created_metrics()  # type: ignore[no-untyped-call]

REJECT_REASONS = (
    "invalid",
    "bad_body",
    "too_large",
    "batch_too_large",
    "unauthorized",
    "forbidden",
    "backpressure",
    "unsupported_media_type",
)


class SelfMetrics:
    """One registry per app, so tests can run several apps in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "llm_usage_reports_received", "Reports accepted (valid, not duplicate).", registry=r
        )
        self.rejected = Counter(
            "llm_usage_reports_rejected",
            "Reports or request bodies refused, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.duplicates = Counter(
            "llm_usage_reports_duplicate",
            "Reports whose request_id was already seen; acknowledged, counted once.",
            registry=r,
        )
        self.estimated = Counter(
            "llm_usage_estimated_reports",
            "Reports whose token counts were estimated (incomplete streams).",
            registry=r,
        )
        self.flush_duration = Histogram(
            "llm_usage_flush_duration_seconds",
            "Duration of one flush transaction.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.flush_failures = Counter(
            "llm_usage_flush_failures",
            "Flush transactions that failed and rolled back.",
            registry=r,
        )
        self.flushed = Counter(
            "llm_usage_flushed_reports",
            "Reports committed to the database (duplicates excluded).",
            registry=r,
        )
        self.quarantined = Counter(
            "llm_usage_quarantined_reports",
            "Reports the database refused (data errors), kept in <data_dir>/quarantine.",
            registry=r,
        )
        self.retention_deleted = Counter(
            "llm_usage_retention_deleted_details",
            "Audit rows (usage_details) deleted by retention; rollups are kept.",
            registry=r,
        )
        self.retention_failures = Counter(
            "llm_usage_retention_failures",
            "Retention runs that failed (retried at the next run).",
            registry=r,
        )
        self.last_flush_success = Gauge(
            "llm_usage_last_flush_success_timestamp_seconds",
            "Unix time of the last successful flush.",
            registry=r,
        )
        self.pending = Gauge(
            "llm_usage_pending_reports", "Reports in the WAL not yet committed.", registry=r
        )
        self.wal_bytes = Gauge("llm_usage_wal_bytes", "Bytes on disk in the WAL.", registry=r)
        self.wal_max_bytes = Gauge(
            "llm_usage_wal_max_bytes", "WAL size cap; past it ingest answers 503.", registry=r
        )
        self.label_overflow = Counter(
            "llm_usage_label_overflow",
            "Label values folded into __other__ by the cardinality caps.",
            ["label"],
            registry=r,
        )
        self.unpriced = Counter(
            "llm_usage_unpriced_reports",
            "Reports whose model has no known price (cost counted as 0).",
            registry=r,
        )
        self.budget_limit = Gauge(
            "llm_budget_limit_usd", "Budget limit for the current window.", ["budget"], registry=r
        )
        self.budget_spent = Gauge(
            "llm_budget_spent_usd", "Spend in the budget's current window.", ["budget"], registry=r
        )
        self.budget_ratio = Gauge(
            "llm_budget_usage_ratio", "Budget spend divided by its limit.", ["budget"], registry=r
        )
        self.budget_warn_ratio = Gauge(
            "llm_budget_warn_ratio", "The budget's lowest warning ratio.", ["budget"], registry=r
        )
        self.budget_window_end = Gauge(
            "llm_budget_window_end_timestamp_seconds",
            "Unix time at which the budget's current window ends.",
            ["budget"],
            registry=r,
        )
        build = Gauge(
            "llm_usage_build_info",
            "Build information; always 1.",
            ["version", "python"],
            registry=r,
        )
        build.labels(__version__, platform.python_version()).set(1)

    def overflow(self, label: str) -> None:
        self.label_overflow.labels(label).inc()
