"""The aiohttp app factory: the one place that wires the parts together.

Routes come from the modules that own their handlers (`routes()` lists of `httputil.Route`);
the auth middleware refuses any route without an entry. Start/stop lives in `startup`,
state in typed `web.AppKey`s (`appkeys`), readiness checks in one list below.
"""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from exporter.api.budgets import BudgetHandlers
from exporter.api.health import HealthHandlers, Readiness
from exporter.api.openapi import OpenApiHandler
from exporter.api.requests import RequestsHandler
from exporter.api.stats import StatsHandler
from exporter.api.traces import TraceHandler
from exporter.appkeys import (
    ACCESS,
    BUDGETS,
    FLUSHER,
    INGESTOR,
    SELF_METRICS,
    SETTINGS,
    STARTUP,
    STORE,
    USAGE,
    WAL,
)
from exporter.auth import AccessPolicy, Authenticator, auth_middleware
from exporter.budgets import BudgetTracker, SpendQuery
from exporter.config import Settings
from exporter.flusher import Flusher
from exporter.httputil import Route
from exporter.ingest.adapters.sdk import UnknownUsageCollector
from exporter.ingest.dedupe import RecentIds
from exporter.ingest.handlers import IngestHandlers
from exporter.ingest.otlp import OtlpHandler
from exporter.ingest.pipeline import Ingestor
from exporter.live.exposition import Exposition
from exporter.live.usage_metrics import LabelCaps, UsageMetrics
from exporter.selfmetrics import SelfMetrics
from exporter.startup import install, load_pricer, open_store
from exporter.store import Store
from exporter.wal import WriteAheadLog

__all__ = ["create_app"]  # the state keys are in exporter.appkeys

#: /readyz says "not ready" from this share of the WAL's size cap.
WAL_NEARLY_FULL = 0.95


def _usage_metrics(settings: Settings, self_metrics: SelfMetrics) -> UsageMetrics:
    return UsageMetrics(
        extra_labels=settings.extra_labels,
        caps=LabelCaps(
            model=settings.max_models,
            operation=settings.max_operations,
            user=settings.max_users,
            provider=settings.max_providers,
            team=settings.max_teams,
            tag=settings.max_tag_values,
            series=settings.max_series,
        ),
        promoted_tags=settings.promoted_tags,
        duration_buckets=settings.duration_buckets,
        ttft_buckets=settings.ttft_buckets,
        on_overflow=self_metrics.overflow,
    )


def _readiness(app: web.Application) -> Readiness:
    """The checks /readyz runs, in order; adding one is one line (a check returns None, a
    problem or a list of problems; sync or async)."""
    wal, store, state = app[WAL], app[STORE], app[STARTUP]

    def wal_space() -> str | None:
        full = wal.total_bytes >= wal.max_bytes * WAL_NEARLY_FULL
        return "write-ahead log is (nearly) full" if full else None

    async def database() -> str | None:
        if not state.migrated:
            return "database schema not migrated yet"
        return None if await store.ping() else "database not reachable"

    def wal_writes() -> str | None:
        reason = wal.broken_reason
        return None if reason is None else f"write-ahead log cannot write: {reason}"

    readiness = Readiness()
    readiness.add("wal_space", wal_space)
    readiness.add("database", database)
    readiness.add("flush", app[FLUSHER].readiness_problems)
    readiness.add("wal_writes", wal_writes)
    return readiness


class _MetricsHandler:
    """GET /metrics: the usage families and the self-metrics in one response."""

    def __init__(self, exposition: Exposition, self_metrics: SelfMetrics, wal: WriteAheadLog):
        self._exposition = exposition
        self._m = self_metrics
        self._wal = wal

    async def metrics(self, request: web.Request) -> web.Response:
        self._m.pending.set(self._wal.pending_reports)
        self._m.wal_bytes.set(self._wal.total_bytes)
        body, headers = await self._exposition.response(
            request.headers.get("Accept", ""), request.headers.get("Accept-Encoding", "")
        )
        return web.Response(body=body, headers=headers)


async def _check_every_route_listed(app: web.Application, policy: AccessPolicy) -> None:
    unlisted = policy.unlisted(app.router)
    if unlisted:
        raise RuntimeError(f"routes without an access entry: {', '.join(unlisted)}")


def _read_api(settings: Settings, store: Store) -> list[Route]:
    limit = settings.read_time_limit
    stats = StatsHandler(
        store.engine,
        max_range_days=settings.read_max_range_days,
        retention_days=settings.retention_days,
        promoted_tags=getattr(settings, "promoted_tags", ()),
        time_limit=limit,
    )
    return [
        *stats.routes(),
        *RequestsHandler(store.engine, limit).routes(),
        *TraceHandler(store.engine, settings.trace_max_requests, limit).routes(),
    ]


def create_app(settings: Settings) -> web.Application:
    self_metrics = SelfMetrics()
    usage = _usage_metrics(settings, self_metrics)
    self_metrics.init_overflow(usage.label_names)
    wal = WriteAheadLog(
        settings.wal_dir,
        segment_bytes=settings.wal_segment_bytes,
        max_bytes=settings.wal_max_bytes,
        durability=settings.wal_durability,
    )
    ingestor = Ingestor(
        wal=wal,
        usage=usage,
        self_metrics=self_metrics,
        pricer=load_pricer(settings),
        recent=RecentIds(settings.dedupe_cache_size),
        bytes_per_input_token=settings.bytes_per_input_token,
        tokens_per_output_chunk=settings.tokens_per_output_chunk,
        user_attributes=settings.otel_user_attributes,
        max_report_age=settings.max_report_age,
        max_future_skew=timedelta(seconds=settings.max_future_skew_seconds),
    )
    store = open_store(settings)
    self_metrics.registry.register(UnknownUsageCollector())

    budgets = BudgetTracker.from_settings(
        settings, SpendQuery(store.background_engine), self_metrics
    )
    ingestor.on_durable.append(budgets.on_durable)
    flusher = Flusher(
        wal,
        store.writer,
        self_metrics,
        settings,
        on_committed=budgets.on_committed,
        before_drop=budgets.before_drop,
        commit_lock=budgets.db_lock,
        retention=store.retention_schedule(settings.retention_days),
    )
    ingestor.on_durable.append(lambda _seq, _reports: flusher.nudge())

    policy = AccessPolicy()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # our bounded inflater answers bombs, truncation and unknown encodings in JSON
        handler_args={"auto_decompress": False},
        middlewares=[auth_middleware(policy, Authenticator(settings.tokens), self_metrics)],
    )
    app[ACCESS] = policy
    app[SETTINGS] = settings
    app[SELF_METRICS] = self_metrics
    app[USAGE] = usage
    app[WAL] = wal
    app[INGESTOR] = ingestor
    app[STORE] = store
    app[BUDGETS] = budgets
    app[FLUSHER] = flusher
    install(app)

    limits = (settings.max_body_bytes, settings.max_batch_items)
    metrics = _MetricsHandler(Exposition(usage, self_metrics), self_metrics, wal)
    routes: list[Route] = [
        *HealthHandlers(_readiness(app)).routes(),
        Route("GET", "/metrics", metrics.metrics, "read" if settings.metrics_auth else "public"),
        *IngestHandlers(ingestor, self_metrics, *limits).routes(),
        *OtlpHandler(
            ingestor, self_metrics, *limits, user_attributes=settings.otel_user_attributes
        ).routes(),
        *BudgetHandlers(budgets).routes(),
        *_read_api(settings, store),
        *OpenApiHandler(settings.metrics_auth).routes(),
    ]
    policy.install(app.router, routes)
    # first of the start steps, so a bad route table opens nothing
    app.on_startup.insert(0, lambda app: _check_every_route_listed(app, policy))
    return app
