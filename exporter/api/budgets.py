"""GET /v1/budgets and GET /v1/budgets/check, for dashboards and for gateways that enforce.

Money is a decimal string (exact); `usage_ratio` is a float.
"""

from __future__ import annotations

from aiohttp import web

from exporter.budgets import BudgetTracker
from exporter.httputil import Route, error_response, json_response

_CHECK_PARAMS = ("user", "team", "api_key_id", "model")


class BudgetHandlers:
    def __init__(self, tracker: BudgetTracker) -> None:
        self._tracker = tracker

    async def list_budgets(self, request: web.Request) -> web.Response:
        return json_response({"budgets": [s.as_json() for s in self._tracker.states()]})

    async def check(self, request: web.Request) -> web.Response:
        query = request.query
        unknown = [k for k in query if k not in _CHECK_PARAMS]
        if unknown:
            return error_response(
                400,
                f"unknown parameter(s) {sorted(unknown)}; use {', '.join(_CHECK_PARAMS)}",
            )
        args = [query.get(k, "") for k in _CHECK_PARAMS]
        if any(len(v) > 256 for v in args):
            return error_response(400, "parameter values are limited to 256 characters")
        return json_response(self._tracker.check(*args))

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/v1/budgets", self.list_budgets, "read"),
            Route("GET", "/v1/budgets/check", self.check, "read"),
        ]
