"""Durable storage: tables, migrations, the exactly-once flush write, queries, retention.

`Store` bundles one engine with what the app needs from it; the pieces stay usable alone
(`StoreWriter(engine)`, `retention.purge_details(engine, …)`; budget spend is
exporter/budgets/spend.py, the read API's queries store/stats.py and store/details.py).
Errors are classified in `errors`, refused reports set aside by `quarantine`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.db import backend_name, create_engine, ping, redact_url
from exporter.store.retention_schedule import RetentionSchedule
from exporter.store.writer import StoreWriter, WriteResult

__all__ = [
    "RetentionSchedule",
    "Store",
    "StoreWriter",
    "WriteResult",
    "create_engine",
    "redact_url",
]


class Store:
    """One database: engine, writer, migrations, health and spend."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        promoted_tags: Iterable[str] = (),
        flush_process: bool = False,
    ) -> None:
        self.engine = engine
        self.backend = backend_name(engine.url)
        self.writer = StoreWriter(engine, promoted_tags=promoted_tags, flush_process=flush_process)
        self._background: AsyncEngine | None = None

    @property
    def background_engine(self) -> AsyncEngine:
        """For reads that may wait (the budget refresh): on SQLite one more connection whose
        thread runs SCHED_IDLE, so its queries never hold a CPU the event loop wants (with
        them on the loop's CPU a refresh put 3-4 ms into a budget check's p99: bench/RESULTS.md,
        `## Budgets`); on Postgres the engine itself."""
        if self.backend != "sqlite":
            return self.engine
        if self._background is None:
            self._background = create_engine(self.engine.url, pool_size=1, idle=True)
        return self._background

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        pool_size: int = 5,
        promoted_tags: Iterable[str] = (),
        flush_process: bool = False,
    ) -> Store:
        """`flush_process`: SQLite flushes in a child process (Settings.sqlite_flush_process)."""
        return cls(
            create_engine(url, pool_size=pool_size),
            promoted_tags=promoted_tags,
            flush_process=flush_process,
        )

    @property
    def safe_url(self) -> str:
        """The URL without password, for logs."""
        return redact_url(self.engine.url)

    async def upgrade(self, revision: str = "head") -> str | None:
        from exporter.store import migrate  # Alembic: not imported by the flush process

        return await migrate.upgrade(self.engine, revision)

    async def ping(self, within: float = 2.0) -> bool:
        """True if the database answers within `within` seconds (for /readyz)."""
        return await ping(self.engine, within)

    def retention_schedule(self, retention_days: int) -> RetentionSchedule:
        """Purges of details past `retention_days`, for the flusher to run beside it."""
        return RetentionSchedule(self.engine, retention_days)

    async def close(self) -> None:
        try:
            await self.writer.close()
        finally:
            if self._background is not None:
                await self._background.dispose()
            await self.engine.dispose()
