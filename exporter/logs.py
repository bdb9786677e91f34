"""Logging setup: readable text by default, one JSON object per line when asked.

Both formats stamp UTC with an offset and milliseconds (`2026-12-01T20:03:04.123+00:00`),
whatever `TZ` says; both pass every record through the rate limiter and the redactor.
"""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from exporter.logevents import ParserErrorFilter, RateLimitFilter
from exporter.redact import RedactFilter, Redactor

__all__ = ["configure", "utc_timestamp"]

#: request-shaped fields a record may carry (`request_event`); JSON logs keep them as keys
_FIELDS = ("event", "method", "path", "peer", "reason", "suppressed")


def utc_timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_timestamp(record)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": utc_timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                data[field] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        return orjson.dumps(data).decode()


def configure(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    """Root handler on stderr; `secrets` (configured tokens) are masked wherever they appear."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    limiter = RateLimitFilter()
    handler.addFilter(limiter)
    handler.addFilter(RedactFilter(Redactor(secrets)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    server = logging.getLogger("aiohttp.server")
    server.filters[:] = [f for f in server.filters if not isinstance(f, ParserErrorFilter)]
    server.addFilter(ParserErrorFilter())
    for noisy in ("aiohttp.access", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not _current:
        atexit.register(_report_suppressed)
    _current[:] = [(limiter, handler)]


_current: list[tuple[RateLimitFilter, logging.Handler]] = []


def _report_suppressed() -> None:
    """At exit, one line per class whose last suppressed lines no later line reported."""
    if not _current or logging.getLogger().handlers[:1] != [_current[0][1]]:
        return  # someone else configured logging since
    limiter, handler = _current[0]
    for key, count, seconds in limiter.pending():
        record = logging.LogRecord(
            "exporter.logs", logging.WARNING, __file__, 0,
            "%s: %d similar line(s) suppressed in the last %.0fs", (key, count, seconds), None,
        )  # fmt: skip
        record.event, record.event_key = "log_summary", ("summary", key)
        handler.handle(record)
