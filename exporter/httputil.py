"""Small helpers shared by the HTTP handlers."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web


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


class LogOncePerMinute:
    """Client mistakes are counted always and logged at most once a minute per kind, so a
    misbehaving client cannot flood the log (and an operator still sees the first one)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -60.0) >= 60:
            self._last[kind] = now
            self._log.warning(message, *args)
