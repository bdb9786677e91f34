"""The landing page, liveness and readiness: GET /, /healthz, /readyz.

Readiness is a list of named checks, each answering "no problem" (None or an empty list) or
the problems it sees; adding one is one `readiness.add(name, check)` line where the app is
wired. A check may be sync or async.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from exporter import __version__
from exporter.httputil import Route, json_response

__all__ = ["HealthHandlers", "Problems", "Readiness", "ReadinessCheck"]

Problems = str | Sequence[str] | None
ReadinessCheck = Callable[[], Problems | Awaitable[Problems]]

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


class Readiness:
    """Named readiness checks, run in the order they were added."""

    def __init__(self) -> None:
        self._checks: list[tuple[str, ReadinessCheck]] = []

    def add(self, name: str, check: ReadinessCheck) -> None:
        if any(n == name for n, _ in self._checks):
            raise ValueError(f"readiness check {name!r} added twice")
        self._checks.append((name, check))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._checks]

    async def problems(self) -> list[str]:
        found: list[str] = []
        for _name, check in self._checks:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, str):
                found.append(result)
            elif result:
                found.extend(result)
        return found


class HealthHandlers:
    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    async def landing(self, request: web.Request) -> web.Response:
        return web.Response(text=_LANDING.format(version=__version__), content_type="text/html")

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = await self.readiness.problems()
        if problems:
            return json_response({"status": "not ready", "problems": problems}, status=503)
        return json_response({"status": "ready"})

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/", self.landing, "public"),
            Route("GET", "/healthz", self.healthz, "public"),
            Route("GET", "/readyz", self.readyz, "public"),
        ]
