"""Start-up and shutdown: open the WAL, migrate with backoff, run and stop the background jobs.

Ingest works from the first second (into the WAL) even while the database is unreachable:
migrations retry in the background, and only once they succeed do the flusher and the
budget refresher start. Shutdown flushes what is pending (SIGTERM), then closes the store.
Errors that make starting pointless are raised as `errors.ConfigError`/`StartupError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from exporter.appkeys import BUDGETS, FLUSHER, INGESTOR, SETTINGS, STARTUP, STORE, WAL, StartupState
from exporter.backoff import backoff_delay
from exporter.config import Settings
from exporter.errors import ConfigError, StartupError, one_line
from exporter.pricing import Pricer
from exporter.store import Store
from exporter.store.db import UnsupportedDatabase, redact_text

__all__ = ["install", "load_pricer", "open_store", "run_migrations"]

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


def open_store(settings: Settings) -> Store:
    try:
        return Store.from_url(
            settings.effective_database_url,
            promoted_tags=settings.promoted_tags,
            flush_process=settings.sqlite_flush_process,
        )
    except UnsupportedDatabase as exc:  # its message carries the URL without password
        raise ConfigError(f"invalid database_url: {exc}") from None


def load_pricer(settings: Settings) -> Pricer:
    try:
        return Pricer(settings.price_file)
    except ValueError as exc:  # the price file is missing, unreadable or invalid
        raise ConfigError(one_line(exc)) from None


async def run_migrations(store: Store) -> str | None:
    """Migrate now, once (`db upgrade`): a failure is a one-line StartupError."""
    try:
        return await store.upgrade()
    except Exception as exc:
        raise StartupError(
            f"cannot migrate database {store.safe_url}: {type(exc).__name__}: "
            f"{redact_text(one_line(exc))}"
        ) from None


async def _migrate_until_done(app: web.Application) -> bool:
    """Keep ingesting into the WAL while the database is unreachable at start-up."""
    settings, store, state = app[SETTINGS], app[STORE], app[STARTUP]
    attempt = 0
    while not state.stopping.is_set():
        try:
            if settings.auto_migrate:
                await store.upgrade()
            state.migrated = True
            return True
        except Exception as exc:
            attempt += 1
            delay = backoff_delay(attempt, base=1.0, cap=settings.flush_max_backoff)
            log.warning("database %s not ready (%s: %s); retrying in %.0fs", store.safe_url,
                        type(exc).__name__, redact_text(str(exc))[:300], delay)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.stopping.wait(), delay)
    return False


async def _background(app: web.Application) -> None:
    if not await _migrate_until_done(app) or app[STARTUP].stopping.is_set():
        return
    settings, budgets = app[SETTINGS], app[BUDGETS]
    jobs = [app[FLUSHER].run()]
    if budgets.enabled:
        jobs.append(budgets.run(settings.budget_refresh_interval, app[STARTUP].stopping))
    await asyncio.gather(*jobs)


async def _wal_ctx(app: web.Application) -> AsyncIterator[None]:
    wal = app[WAL]
    # segments read in a thread; the ids still in the WAL are known to dedupe after a restart
    await wal.open_async(on_record=app[INGESTOR].remember_replayed)
    await app[BUDGETS].load_wal(wal)  # unflushed spend back, before the flusher drops a segment
    wal.start()
    yield
    await wal.close()


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STARTUP]
    task = asyncio.get_running_loop().create_task(_background(app), name="storage")
    yield
    state.stopping.set()
    if state.migrated:
        await app[FLUSHER].stop()  # SIGTERM: flush what is pending before exit
    try:
        await asyncio.wait_for(task, timeout=STOP_TIMEOUT_S)
    except TimeoutError:
        log.error("background jobs did not stop within %.0fs", STOP_TIMEOUT_S)
    await app[BUDGETS].close()  # the final state file: what a restart reads back
    await app[STORE].close()


def install(app: web.Application) -> StartupState:
    """Add the start/stop steps to `app` (its WAL, store, flusher… are already set)."""
    state = app[STARTUP] = StartupState()
    app.cleanup_ctx.append(_wal_ctx)
    app.cleanup_ctx.append(_background_ctx)
    return state
