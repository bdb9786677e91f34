"""The exporter's own low-cardinality metrics, in a private prometheus_client registry.

Every labelled family whose label values are known up front (reject reasons, label names,
log event classes) is exported at 0 from start, so `rate()` sees the first event.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.logevents import COUNTS, EventCounts

__all__ = ["REJECT_REASONS", "SelfMetrics"]

REJECT_REASONS = (
    "invalid",
    "bad_body",
    "too_large",
    "batch_too_large",
    "unauthorized",
    "forbidden",
    "backpressure",
    "unsupported_media_type",
    "too_old",
    "too_far_in_future",
    "client_disconnect",
)
WAL_FAILURE_KINDS = ("write", "open", "rotate")
CONNECTION_CLOSE_REASONS = ("evicted_idle", "refused_cap", "body_timeout")
#: what accept() fails with when the process or system runs out of resources
OS_ERRNOS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")


class _NoCreatedRegistry(CollectorRegistry):
    """Drops `_created` samples, which double the series count for no dashboard we ship,
    without `disable_created_metrics()`: that flips a global of prometheus_client for every
    other registry in an embedding process."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            created = f"{metric.name}_created"
            if any(s.name == created for s in metric.samples):
                metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class _LogEvents(Collector):
    """Lines the log wrote and suppressed per event class (process-wide, as the log is)."""

    def __init__(self, counts: EventCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        logged, suppressed = self._counts.snapshot()
        for name, help_text, values in (
            ("llm_usage_log_events", "Log lines written, by event class.", logged),
            (
                "llm_usage_log_suppressed",
                "Log lines suppressed by the per-class rate limit, by event class.",
                suppressed,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["event"])
            for event, n in sorted(values.items()):
                family.add_metric([event], n)
            yield family


class SelfMetrics:
    """One registry per app, so tests can run several apps in one process."""

    def __init__(self, overflow_labels: Sequence[str] = ()) -> None:
        r = self.registry = _NoCreatedRegistry(auto_describe=True)
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
        # durability and connection hygiene (exporter.wal, exporter.server)
        self.wal_failures = Counter(
            "llm_usage_wal_failures",
            "WAL write/fsync, segment-open and rotation failures (appends answered 503).",
            ["kind"],
            registry=r,
        )
        for kind in WAL_FAILURE_KINDS:
            self.wal_failures.labels(kind)
        self.wal_broken = Gauge(
            "llm_usage_wal_broken",
            "1 while the WAL cannot write (ingest answers 503); /readyz says why.",
            registry=r,
        )
        self.client_disconnects = Counter(
            "llm_usage_client_disconnects",
            "Requests whose client hung up before the body was read.",
            registry=r,
        )
        self.http_connections = Gauge(
            "llm_usage_http_connections", "Open HTTP connections.", registry=r
        )
        self.http_connection_limit = Gauge(
            "llm_usage_http_connection_limit",
            "Connection cap (below the file descriptor limit).",
            registry=r,
        )
        self.http_connections_closed = Counter(
            "llm_usage_http_connections_closed",
            "Connections closed by the server's hygiene rules, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in CONNECTION_CLOSE_REASONS:
            self.http_connections_closed.labels(reason)
        self.os_errors = Counter(
            "llm_usage_os_errors",
            "OS errors on the event loop (e.g. EMFILE on accept), by errno name.",
            ["errno"],
            registry=r,
        )
        for name in OS_ERRNOS:
            self.os_errors.labels(name)
        self.label_overflow = Counter(
            "llm_usage_label_overflow",
            "Label values folded into __other__ by the cardinality caps.",
            ["label"],
            registry=r,
        )
        self.unpriced = Counter(
            "llm_usage_unpriced_reports",
            "Distinct accepted reports stored without a cost (NULL), by reason.",
            ["reason"],
            registry=r,
        )
        # llm_budget_* gauges: exporter.budgets.BudgetCollector computes them at each scrape
        build = Gauge(
            "llm_usage_build_info",
            "Build information; always 1.",
            ["version", "python"],
            registry=r,
        )
        build.labels(__version__, platform.python_version()).set(1)
        r.register(_LogEvents(COUNTS))
        self.init_overflow(overflow_labels)

    def init_overflow(self, label_names: Iterable[str]) -> None:
        """Export `llm_usage_label_overflow_total{label}` at 0 for each capped label."""
        for name in label_names:
            self.label_overflow.labels(name)

    def overflow(self, label: str) -> None:
        self.label_overflow.labels(label).inc()
