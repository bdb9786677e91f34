"""When retention runs: its own task beside the flush, never in the flush's way.

The flush loop never awaits retention (the two only share the database), retention pauses
while flushes are failing (the database has other problems then), and each run does bounded
work (`max_batches` batches), so a huge first purge is spread over several runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.errors import describe_error
from exporter.store.retention import DEFAULT_BATCH, purge_details, retention_cutoff

__all__ = ["RETENTION_INTERVAL_S", "RetentionSchedule"]

log = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0
RETENTION_MAX_BATCHES = 200  # per run


class RetentionSchedule:
    """Purges details older than `retention_days` every `interval` seconds."""

    def __init__(
        self,
        engine: AsyncEngine,
        retention_days: int,
        *,
        interval: float = RETENTION_INTERVAL_S,
        batch_size: int = DEFAULT_BATCH,
        max_batches: int = RETENTION_MAX_BATCHES,
    ) -> None:
        self._engine = engine
        self.retention_days = retention_days
        self.interval = interval
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.runs = 0
        self.deleted = 0

    async def run_once(self) -> int:
        """One bounded purge; returns the rows deleted."""
        deleted = await purge_details(
            self._engine,
            retention_cutoff(self.retention_days),
            batch_size=self.batch_size,
            max_batches=self.max_batches,
        )
        self.runs += 1
        self.deleted += deleted
        return deleted

    async def run(
        self,
        paused: Callable[[], bool] = lambda: False,
        *,
        on_deleted: Callable[[int], object] = lambda _n: None,
        on_failure: Callable[[BaseException], object] = lambda _exc: None,
    ) -> None:
        """Purge now and then every interval (skipping while `paused()`), until cancelled;
        the callbacks feed the self-metrics."""
        while True:
            if not paused():
                try:
                    on_deleted(await self.run_once())
                except Exception as exc:
                    on_failure(exc)
                    log.warning("retention failed (will retry in %.0fs): %s",
                                self.interval, describe_error(exc))  # fmt: skip
            await asyncio.sleep(self.interval)
