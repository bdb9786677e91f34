"""What goes on the wire and around it: request ids, the batch body, Retry-After, quiet logs."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

__all__ = ["QuietLog", "encode_batch", "new_request_id", "retry_after"]

_GZIP_MIN_BYTES = 1024


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot send {type(value).__name__} in a usage report")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=_json_default)


def encode_batch(batch: list[dict[str, Any]]) -> tuple[bytes, dict[str, str], int]:
    """JSON array body and headers (gzipped past 1 KiB), and how many reports could not be
    encoded (a value JSON cannot carry): those are left out, the rest still go."""
    try:
        text = _dumps(batch)
        bad = 0
    except (TypeError, ValueError):
        parts = []
        for report in batch:
            with contextlib.suppress(TypeError, ValueError):
                parts.append(_dumps(report))
        bad = len(batch) - len(parts)
        text = "[" + ",".join(parts) + "]"
    body = text.encode()
    headers = {"Content-Type": "application/json"}
    if len(body) >= _GZIP_MIN_BYTES:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return body, headers, bad


def retry_after(headers: Mapping[str, str]) -> float:
    value = headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


class _RequestIds:
    """Unique request ids without a syscall per call: a random per-process prefix and a
    counter (the prefix is renewed in a forked child, so parent and child never collide)."""

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():012x}"


new_request_id = _RequestIds()


class QuietLog:
    """One line per event class per interval, with the count of lines it held back."""

    def __init__(self, log: logging.Logger, interval: float = 60.0) -> None:
        self._logger = log
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, level: int, event: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -1e9) < self._interval:
            self._held[event] = self._held.get(event, 0) + 1
            return
        self._last[event] = now
        held = self._held.pop(event, 0)
        suffix = f" ({held} similar suppressed)" if held else ""
        self._logger.log(level, msg + suffix, *args)
