"""The aiohttp app factory: the one place that wires the parts together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from exporter import __version__
from exporter.api.budgets import BudgetHandlers
from exporter.api.openapi import openapi_document
from exporter.api.requests import RequestsHandler
from exporter.api.stats import StatsHandler
from exporter.api.traces import TraceHandler
from exporter.auth import Authenticator
from exporter.budgets import BudgetTracker
from exporter.config import BudgetSpec, Scope, Settings
from exporter.flusher import Flusher
from exporter.httputil import error_response, json_response
from exporter.ingest.dedupe import RecentIds
from exporter.ingest.handlers import IngestHandlers
from exporter.ingest.pipeline import Ingestor
from exporter.live.exposition import Exposition
from exporter.live.usage_metrics import LabelCaps, UsageMetrics
from exporter.otlp import OtlpHandler
from exporter.pricing import Pricer
from exporter.selfmetrics import SelfMetrics
from exporter.store import Store
from exporter.store.db import redact_text
from exporter.wal import WriteAheadLog

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
SELF_METRICS = web.AppKey("self_metrics", SelfMetrics)
USAGE = web.AppKey("usage", UsageMetrics)
WAL = web.AppKey("wal", WriteAheadLog)
INGESTOR = web.AppKey("ingestor", Ingestor)
STORE = web.AppKey("store", Store)
BUDGETS = web.AppKey("budgets", BudgetTracker)
FLUSHER = web.AppKey("flusher", Flusher)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: (method, path prefix) → scope required when tokens are configured. Unlisted paths are open.
_SCOPES: tuple[tuple[str, str, Scope], ...] = (
    ("POST", "/v1/usage", "ingest"),
    ("POST", "/v2/usage/", "ingest"),
    ("POST", "/v1/traces", "ingest"),
    ("GET", "/v1/", "read"),
)


def _required_scope(method: str, path: str, metrics_auth: bool) -> Scope | None:
    if path == "/metrics":
        return "read" if metrics_auth else None
    for m, prefix, scope in _SCOPES:
        if method == m and path.startswith(prefix):
            return scope
    return None


def _middleware(authn: Authenticator, self_metrics: SelfMetrics, metrics_auth: bool) -> Any:
    """Bearer auth by path and method, JSON errors, and no traceback ever leaking; one
    middleware rather than two, since every layer costs each request a coroutine."""
    last_logged: dict[str, float] = {}

    def refuse(request: web.Request, verdict: str, scope: Scope) -> web.Response:
        if scope == "ingest":
            self_metrics.rejected.labels(verdict).inc()
        now = time.monotonic()
        if now - last_logged.get(verdict, -60.0) >= 60:  # at most once a minute per kind
            last_logged[verdict] = now
            log.warning("%s: %s %s from %s", verdict, request.method, request.path,
                        request.remote)  # fmt: skip
        if verdict == "unauthorized":
            return error_response(
                401,
                "missing or invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="llm-usage-exporter"'},
            )
        return error_response(403, f"token lacks the {scope!r} scope")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if authn.enabled:
            scope = _required_scope(request.method, request.path, metrics_auth)
            if scope is not None:
                verdict = authn.check(request.headers.get("Authorization"), scope)
                if verdict != "ok":
                    return refuse(request, verdict, scope)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.content_type != "application/json":
                return error_response(exc.status, exc.reason, headers=_keep_headers(exc))
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal error")

    return middleware


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}


_LANDING = """<!doctype html>
<html><head><meta charset="utf-8"><title>llm-usage-exporter</title></head>
<body><h1>llm-usage-exporter {version}</h1>
<p>Who spends what on LLMs.</p>
<ul>
<li><a href="/metrics">/metrics</a> Prometheus metrics</li>
<li><a href="/healthz">/healthz</a> liveness</li>
<li><a href="/readyz">/readyz</a> readiness (database reachable, WAL not full)</li>
<li>POST /v1/usage usage reports (JSON object, array or NDJSON; gzip ok)</li>
<li>POST /v2/usage/gateway-metrics GPUStack gateway metrics</li>
<li>POST /v1/traces OTLP/HTTP spans with GenAI usage (protobuf or JSON)</li>
<li><a href="/v1/budgets">/v1/budgets</a> budgets</li>
<li><a href="/v1/stats">/v1/stats</a> usage per group and period;
<a href="/v1/requests">/v1/requests</a> stored requests;
/v1/traces/{{trace_id}}/usage per-trace tree</li>
<li><a href="/openapi.json">/openapi.json</a> OpenAPI 3.1 of every route</li>
</ul></body></html>
"""


def create_app(settings: Settings) -> web.Application:
    self_metrics = SelfMetrics()
    usage = UsageMetrics(
        extra_labels=settings.extra_labels,
        caps=LabelCaps(
            model=settings.max_models,
            operation=settings.max_operations,
            user=settings.max_users,
            provider=settings.max_providers,
            team=settings.max_teams,
        ),
        duration_buckets=settings.duration_buckets,
        ttft_buckets=settings.ttft_buckets,
        on_overflow=self_metrics.overflow,
    )
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
        pricer=Pricer(settings.price_file),
        recent=RecentIds(settings.dedupe_cache_size),
        bytes_per_input_token=settings.bytes_per_input_token,
        tokens_per_output_chunk=settings.tokens_per_output_chunk,
    )
    exposition = Exposition(usage, self_metrics)
    store = Store.from_url(settings.effective_database_url)

    async def stored_spend(spec: BudgetSpec, since: datetime, until: datetime) -> Decimal:
        return await store.spend(since, until, spec.user, spec.team, spec.api_key_id, spec.model)

    budgets = BudgetTracker(settings.budgets, self_metrics, stored_spend)
    ingestor.on_durable.append(budgets.on_durable)
    flusher = Flusher(wal, store.writer, self_metrics, settings, on_dropped=budgets.on_dropped)
    ingestor.on_durable.append(lambda _seq, _reports: flusher.nudge())
    ingest = IngestHandlers(
        ingestor, self_metrics, settings.max_body_bytes, settings.max_batch_items
    )

    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # our bounded inflater answers bombs, truncation and unknown encodings in JSON
        handler_args={"auto_decompress": False},
        middlewares=[
            _middleware(Authenticator(settings.tokens), self_metrics, settings.metrics_auth)
        ],
    )
    app[SETTINGS] = settings
    app[SELF_METRICS] = self_metrics
    app[USAGE] = usage
    app[WAL] = wal
    app[INGESTOR] = ingestor
    app[STORE] = store
    app[BUDGETS] = budgets
    app[FLUSHER] = flusher
    ready = {"migrated": False}

    async def wal_ctx(app: web.Application) -> AsyncIterator[None]:
        wal.open()
        wal.start()
        yield
        await wal.close()

    stopping = asyncio.Event()

    async def migrate_until_done() -> bool:
        """Keep ingesting into the WAL while the database is unreachable at start-up."""
        delay = 1.0
        while not stopping.is_set():
            try:
                if settings.auto_migrate:
                    await store.upgrade()
                ready["migrated"] = True
                return True
            except Exception as exc:
                log.warning(
                    "database %s not ready (%s: %s); retrying in %.0fs",
                    store.safe_url,
                    type(exc).__name__,
                    redact_text(str(exc))[:300],
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, settings.flush_max_backoff)
        return False

    async def background_ctx(app: web.Application) -> AsyncIterator[None]:
        async def main() -> None:
            if not await migrate_until_done() or stopping.is_set():
                return
            jobs = [flusher.run()]
            if budgets.enabled:
                jobs.append(budgets.run(settings.budget_refresh_interval, stopping))
            await asyncio.gather(*jobs)

        task = asyncio.get_running_loop().create_task(main(), name="storage")
        yield
        stopping.set()
        if ready["migrated"]:
            await flusher.stop()  # SIGTERM: flush what is pending before exit
        try:
            await asyncio.wait_for(task, timeout=30)
        except TimeoutError:
            log.error("background jobs did not stop within 30s")
        await store.close()

    app.cleanup_ctx.append(wal_ctx)
    app.cleanup_ctx.append(background_ctx)

    async def metrics(request: web.Request) -> web.Response:
        self_metrics.pending.set(wal.pending_reports)
        self_metrics.wal_bytes.set(wal.total_bytes)
        body, headers = await exposition.response(
            request.headers.get("Accept", ""), request.headers.get("Accept-Encoding", "")
        )
        return web.Response(body=body, headers=headers)

    async def landing(request: web.Request) -> web.Response:
        return web.Response(text=_LANDING.format(version=__version__), content_type="text/html")

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok", "version": __version__})

    async def readyz(request: web.Request) -> web.Response:
        problems = []
        if wal.total_bytes >= wal.max_bytes * 0.95:
            problems.append("write-ahead log is (nearly) full")
        if not ready["migrated"]:
            problems.append("database schema not migrated yet")
        elif not await store.ping():
            problems.append("database not reachable")
        if problems:
            return json_response({"status": "not ready", "problems": problems}, status=503)
        return json_response({"status": "ready"})

    app.router.add_get("/", landing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/usage", ingest.usage)
    app.router.add_post("/v2/usage/gateway-metrics", ingest.gateway_metrics)
    app.router.add_post(
        "/v1/traces",
        OtlpHandler(
            ingestor, self_metrics, settings.max_body_bytes, settings.max_batch_items
        ).traces,
    )
    budget_api = BudgetHandlers(budgets)
    app.router.add_get("/v1/budgets", budget_api.list)
    app.router.add_get("/v1/budgets/check", budget_api.check)
    _add_read_api(app, settings, store)
    return app


def _add_read_api(app: web.Application, settings: Settings, store: Store) -> None:
    limit = settings.read_time_limit
    stats = StatsHandler(
        store.engine,
        max_range_days=settings.read_max_range_days,
        retention_days=settings.retention_days,
        promoted_tags=getattr(settings, "promoted_tags", ()),
        time_limit=limit,
    )
    requests = RequestsHandler(store.engine, limit)
    traces = TraceHandler(store.engine, settings.trace_max_requests, limit)
    spec = json_response(openapi_document()).body

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=spec, content_type="application/json")

    app.router.add_get("/v1/stats", stats.get)
    app.router.add_get("/v1/requests", requests.list)
    app.router.add_get("/v1/requests/{request_id}", requests.get)
    app.router.add_get("/v1/traces/{trace_id}/usage", traces.usage)
    app.router.add_get("/openapi.json", openapi)
