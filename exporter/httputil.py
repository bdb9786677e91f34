"""Small helpers shared by the HTTP handlers: JSON responses, route entries."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, NamedTuple

import orjson
from aiohttp import web

__all__ = [
    "Access",
    "Handler",
    "Route",
    "error_response",
    "json_response",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Who may call a route: anyone ("public"), or a bearer token carrying this scope.
Access = Literal["public", "ingest", "read", "admin"]


class Route(NamedTuple):
    """One entry of the route table, declared next to its handler. A route without an entry
    is refused (deny by default); HEAD and OPTIONS of a GET route inherit its access."""

    method: str
    path: str
    handler: Handler
    access: Access


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)
