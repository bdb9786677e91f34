"""Rate-limited log events: one line per event class per interval, with a count of the rest.

A log is an attack surface and a disk-full cause: 5,000 malformed requests once wrote 55,003
lines. Every record at WARNING or above, and every record carrying an `event` class, goes
through `RateLimitFilter` on the handler: the first of a class in an interval is written, the
others are counted and the count is appended to the next line of that class (`event_key`
narrows the window, e.g. one per unpriced model). Records without a class are grouped by
logger and message template. Counts are process-wide (the log is) and
exported as `llm_usage_log_events_total{event}` and `llm_usage_log_suppressed_total{event}`.

Requests we refuse are logged by `request_event`: method, path (never the query string),
peer and a reason, never header values. aiohttp's own parser errors ("Error handling
request", which carry the raw request line or header) are rewritten by `ParserErrorFilter`
into the same shape.
"""

from __future__ import annotations

import ast
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

__all__ = [
    "COUNTS",
    "DEFAULT_INTERVAL",
    "EVENT_CLASSES",
    "EventCounts",
    "ParserErrorFilter",
    "RateLimitFilter",
    "RateLimitedLog",
    "request_event",
]

#: seconds; the documented bound is one line per event class per interval
DEFAULT_INTERVAL = 60.0
#: event classes the code logs by name; their self-metrics are exported at 0 from start
EVENT_CLASSES = (
    "malformed_request",
    "http_error",
    "unauthorized",
    "forbidden",
    "invalid",
    "bad_body",
    "too_large",
    "batch_too_large",
    "unsupported_media_type",
    "backpressure",
    "unpriced_model",
    "unlisted",
    "os_error",
    "wal_failure",
)
#: more distinct keys than this share one window (a bug logging f-strings cannot grow memory)
_MAX_KEYS = 1000
_OVERFLOW_KEY = "__other__"
_Key = str | tuple[object, ...]


class EventCounts:
    """Lines written and suppressed per event class, for the self-metrics collector."""

    def __init__(self) -> None:
        self.logged: dict[str, int] = dict.fromkeys(EVENT_CLASSES, 0)
        self.suppressed: dict[str, int] = dict.fromkeys(EVENT_CLASSES, 0)

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        return dict(self.logged), dict(self.suppressed)


COUNTS = EventCounts()


class RateLimitFilter(logging.Filter):
    """Lets through the first record of each class per interval; counts and drops the rest."""

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        counts: EventCounts = COUNTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._interval = interval
        self._counts = counts
        self._clock = clock
        self._windows: dict[_Key, list[float]] = {}  # key → [start, suppressed]
        self._lock = threading.Lock()  # the WAL writer thread logs too

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "event", None)
        if isinstance(event, str):
            key: _Key = getattr(record, "event_key", event)  # finer window, same metric
            label = event
        elif record.levelno >= logging.WARNING:
            key = (record.name, _template(record.msg))
            label = record.name
        else:
            return True
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None and len(self._windows) >= _MAX_KEYS:
                key, label = _OVERFLOW_KEY, _OVERFLOW_KEY
                window = self._windows.get(key)
            if window is not None and now - window[0] < self._interval:
                window[1] += 1
                self._counts.suppressed[label] = self._counts.suppressed.get(label, 0) + 1
                return False
            self._windows[key] = [now, 0]
            self._counts.logged[label] = self._counts.logged.get(label, 0) + 1
        if window is not None and window[1]:
            elapsed = now - window[0]
            note = f"({int(window[1])} similar suppressed in {elapsed:.0f}s)"
            record.msg = f"{record.getMessage()} {note}"
            record.args = None
            record.suppressed = int(window[1])
        return True

    def pending(self) -> list[tuple[str, int, float]]:
        """(class, suppressed, seconds) for windows whose suppressed lines no line reported."""
        now = self._clock()
        out: list[tuple[str, int, float]] = []
        with self._lock:
            for key, window in self._windows.items():
                if window[1]:
                    name = key if isinstance(key, str) else ": ".join(map(str, key))
                    out.append((name[:120], int(window[1]), now - window[0]))
                    window[1] = 0
        return out


def _template(msg: object) -> str:
    """A record's class when it has none: its first line with numbers and addresses folded, so
    asyncio's pre-formatted "Exception in callback <handle at 0x…>" lines are one class."""
    first = str(msg).split("\n", 1)[0][:200]
    return _VARIABLE.sub("#", first)


_VARIABLE = re.compile(r"(?:0x)?[0-9a-fA-F]{6,}|\d+")


def _clean(text: object, limit: int = 200) -> str:
    """Control characters escaped (no forged lines in text logs), length bounded."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "…"
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", s)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def request_event(
    logger: logging.Logger,
    event: str,
    method: str,
    path: str,
    peer: str | None,
    reason: str,
    level: int = logging.WARNING,
) -> None:
    """One line about a refused request: never the query string nor a header value."""
    fields = {
        "event": event,
        "method": _clean(method, 16),
        "path": _clean(path.split("?", 1)[0]),
        "peer": _clean(peer or "-", 64),
        "reason": _clean(reason, 300),
    }
    logger.log(
        level,
        "%s: %s %s from %s: %s",
        event,
        fields["method"],
        fields["path"],
        fields["peer"],
        fields["reason"],
        extra=fields,
    )


class RateLimitedLog:
    """`log(kind, message, *args)` for a module's client-mistake warnings, classed by kind."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def __call__(self, kind: str, message: str, *args: object) -> None:
        self._log.warning(message, *args, extra={"event": kind})

    def request(self, kind: str, request: BaseRequest, reason: str) -> None:
        """A refused request, in `request_event`'s shape."""
        request_event(self._log, kind, request.method, request.path, request.remote, reason)


_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,./-]{0,79}")
_REQUEST_LINE = re.compile(r"([A-Z]{1,16}) (/[^ ?#]{0,2048})")


def _quoted_line(exc: HttpProcessingError) -> str:
    """The raw line the parser quotes (`line` or the `b'...'` in its message), if any."""
    line = getattr(exc, "line", None)
    if isinstance(line, str):
        return line
    m = re.search(r"b(['\"])(.*?)(?<!\\)\1", str(exc.message))
    if m is None:
        return ""
    try:
        raw = ast.literal_eval(m[0])
    except (ValueError, SyntaxError):
        return ""
    return raw.decode("latin-1") if isinstance(raw, bytes) else ""


def parser_reason(exc: BaseException) -> str:
    """The parser's fixed description ("Invalid header value char"), never the raw bytes."""
    name = type(exc).__name__
    message = exc.message if isinstance(exc, HttpProcessingError) else ""
    head = re.split(r"[:'\"\\(\[{]", str(message).strip().split("\n", 1)[0], maxsplit=1)[0]
    head = head.strip()
    if _REASON.fullmatch(head):
        return f"{name}: {head}"
    return name


class ParserErrorFilter(logging.Filter):
    """On `aiohttp.server`: turns "Error handling request" tracebacks of parser errors,
    which quote the offending line (tokens included), into a `malformed_request` event."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if record.levelno > logging.WARNING and not logging.getLogger(record.name).isEnabledFor(
            logging.WARNING
        ):
            return False
        args: Any = record.args
        peer = args[0] if isinstance(args, tuple) and args else "-"
        method, path = "-", "-"
        m = _REQUEST_LINE.match(_quoted_line(exc))
        if m:
            method, path = m[1], m[2]
        fields = {
            "event": "malformed_request",
            "method": method,
            "path": _clean(path),
            "peer": _clean(peer, 64),
            "reason": parser_reason(exc),
        }
        record.msg = "%s: %s %s from %s: %s"
        record.args = tuple(fields.values())
        record.exc_info = None
        record.exc_text = None
        record.__dict__.update(fields)
        if record.levelno > logging.WARNING:  # the client's mistake, not ours
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
