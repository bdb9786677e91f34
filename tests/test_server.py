"""exporter/server.py in-process: the data-dir lock, the connection cap arithmetic, and OS
errors on the loop logged once a minute however often they happen."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest
from helpers import parse_metrics, total
from prometheus_client import generate_latest

from exporter.logevents import EventCounts, RateLimitFilter
from exporter.selfmetrics import SelfMetrics
from exporter.server import (
    DataDirLock,
    DataDirLocked,
    _OsErrorLog,
    accept_backlog,
    connection_cap,
)


def test_data_dir_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")
    first.acquire()
    assert (tmp_path / "data" / "lock").read_text().strip() == str(os.getpid())
    with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
        DataDirLock(tmp_path / "data").acquire()  # flock conflicts across open files too
    first.release()
    again = DataDirLock(tmp_path / "data")
    again.acquire()  # released: free again
    again.release()


@pytest.mark.parametrize("limit", [256, 1024, 20_000, 1 << 20])
def test_connection_cap_leaves_a_reserve_below_the_fd_limit(limit: int) -> None:
    cap = connection_cap(limit, None)
    reserve = limit - cap
    assert reserve >= 64 + accept_backlog(limit)
    assert reserve >= limit // 10
    assert connection_cap(limit, 100) == min(100, cap)
    assert connection_cap(limit, 10 * limit) == cap  # clamped, with a warning


async def test_os_errors_on_the_loop_are_counted_always_and_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = SelfMetrics()
    handler = _OsErrorLog(metrics)
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.ERROR, logger="exporter.server")
    limiter = RateLimitFilter(counts=EventCounts())  # as logs.configure does
    caplog.handler.addFilter(limiter)  # pytest reuses this handler: take the filter off after
    try:
        for _ in range(1000):
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": OSError(errno.EMFILE, "Too many open files")})  # fmt: skip
        handler(loop, {"message": "x", "exception": OSError(errno.ENFILE, "File table overflow")})
    finally:
        caplog.handler.removeFilter(limiter)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    samples = parse_metrics(generate_latest(metrics.registry).decode())
    assert total(samples, "llm_usage_os_errors_total", errno="EMFILE") == 1000
    assert total(samples, "llm_usage_os_errors_total", errno="ENFILE") == 1
