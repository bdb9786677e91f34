"""Who may call what: bearer tokens with scopes, and the middleware that enforces the route table.

Every route is declared with its access (`httputil.Route`); the middleware looks it up by the
matched route and refuses a route that has none, so nothing is open by accident. HEAD and
OPTIONS of a path inherit its GET entry (or, for a path without GET, its strictest entry).
Tokens are compared in constant time; `admin` implies every scope. With no tokens configured
every listed route passes; the CLI refuses to bind such a service to a non-loopback address
unless told `--insecure`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from exporter.config import Scope, TokenSpec
from exporter.httputil import (
    Access,
    Handler,
    Route,
    error_response,
)
from exporter.logevents import request_event
from exporter.selfmetrics import SelfMetrics

__all__ = ["AccessPolicy", "Authenticator", "Verdict", "auth_middleware"]

log = logging.getLogger(__name__)

Verdict = Literal["ok", "unauthorized", "forbidden"]

#: Strictest first: the access an OPTIONS/HEAD of a path without GET inherits.
_STRICTNESS: tuple[Access, ...] = ("admin", "read", "ingest", "public")


class Authenticator:
    def __init__(self, tokens: Sequence[TokenSpec]) -> None:
        self._tokens = [(t.token.encode(), frozenset(t.scopes), t.name) for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def identify(self, authorization: str | None) -> tuple[str, frozenset[str]] | None:
        """(token name, scopes) for a valid `Bearer` header; every token is compared."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        candidate = presented.strip().encode()
        found: tuple[str, frozenset[str]] | None = None
        for secret, scopes, name in self._tokens:
            if hmac.compare_digest(candidate, secret) and found is None:
                found = (name, scopes)
        return found

    def check(self, authorization: str | None, scope: Scope) -> Verdict:
        if not self._tokens:
            return "ok"
        who = self.identify(authorization)
        if who is None:
            return "unauthorized"
        scopes = who[1]
        return "ok" if scope in scopes or "admin" in scopes else "forbidden"


async def _options(request: web.Request) -> web.Response:
    """OPTIONS answers which methods the path takes (no CORS: no browser calls this API)."""
    allowed = sorted({r.method for r in request.match_info.route.resource or ()})
    return web.Response(status=204, headers={"Allow": ", ".join(allowed)})


class AccessPolicy:
    """The route table, installed on a router: route object → access."""

    def __init__(self) -> None:
        self._access: dict[AbstractRoute, Access] = {}

    def install(self, router: web.UrlDispatcher, routes: Iterable[Route]) -> None:
        """Register `routes` (plus HEAD and OPTIONS of each path) with their access; call it
        once with the whole table, so each path's methods share one resource."""
        by_path: dict[str, dict[str, Route]] = {}
        for r in routes:
            methods = by_path.setdefault(r.path, {})
            if r.method in methods:
                raise ValueError(f"route {r.method} {r.path} is declared twice")
            methods[r.method] = r
        for path, methods in by_path.items():
            for r in methods.values():
                self._add(router, r.method, path, r.handler, r.access)
            get = methods.get("GET")
            if get is not None and "HEAD" not in methods:
                self._add(router, "HEAD", path, get.handler, get.access)
            if "OPTIONS" not in methods:
                inherited = get.access if get is not None else _strictest(methods.values())
                self._add(router, "OPTIONS", path, _options, inherited)

    def _add(
        self, router: web.UrlDispatcher, method: str, path: str, handler: Handler, access: Access
    ) -> None:
        self._access[router.add_route(method, path, handler)] = access

    def access(self, route: AbstractRoute) -> Access | None:
        return self._access.get(route)

    def entries(self) -> list[tuple[str, str, Access]]:
        """(method, path, access) of every registered route, HEAD and OPTIONS included."""
        return [
            (r.method, r.resource.canonical if r.resource else "", a)
            for r, a in self._access.items()
        ]

    def unlisted(self, router: web.UrlDispatcher) -> list[str]:
        """Routes on `router` that have no entry (checked at start-up: each is a bug)."""
        return [
            f"{r.method} {r.resource.canonical if r.resource else '?'}"
            for r in router.routes()
            if r not in self._access
        ]


def _strictest(routes: Iterable[Route]) -> Access:
    present = {r.access for r in routes}
    return next(a for a in _STRICTNESS if a in present)


def auth_middleware(policy: AccessPolicy, authn: Authenticator, self_metrics: SelfMetrics) -> Any:
    """Access by matched route, JSON errors, and no traceback ever leaking; one middleware
    rather than two, since every layer costs each request a coroutine."""

    def refuse(request: web.Request, verdict: str, scope: Access) -> web.Response:
        if scope == "ingest":
            self_metrics.rejected.labels(verdict).inc()
        request_event(
            log, verdict, request.method, request.path, request.remote, f"needs {scope!r}"
        )
        if verdict == "unauthorized":
            return error_response(
                401,
                "missing or invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="llm-usage-exporter"'},
            )
        return error_response(403, f"token lacks the {scope!r} scope")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        access = policy.access(route)
        if access is None:
            if request.match_info.http_exception is None:  # a route without an entry: a bug
                request_event(log, "unlisted", request.method, request.path, request.remote,
                              "the route has no access entry", logging.ERROR)  # fmt: skip
                return error_response(404, "Not Found")
            # else aiohttp's own 404/405 answer, raised by its handler below
        elif access != "public" and authn.enabled:
            verdict = authn.check(request.headers.get("Authorization"), access)
            if verdict != "ok":
                return refuse(request, verdict, access)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                request_event(log, "http_error", request.method, request.path, request.remote,
                              f"{exc.status} {exc.reason}", logging.INFO)  # fmt: skip
            if exc.status >= 400 and exc.content_type != "application/json":
                return error_response(exc.status, exc.reason, headers=_keep_headers(exc))
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal error")

    return middleware


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
