"""The budget refresh's SQLite queries run on a SCHED_IDLE thread (`Store.background_engine`):
on a CPU shared with the event loop they never hold it when a request wakes the loop. The
policy is read back from the kernel for the very thread that runs each engine's queries."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from helpers import make_settings, report, wait_ready
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.app import create_app
from exporter.appkeys import BUDGETS, STORE
from exporter.store import Store


async def _query_thread_policy(engine: AsyncEngine) -> int:
    """The scheduling policy of the thread a query on `engine` runs on."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        await raw.driver_connection.create_function("tid", 0, threading.get_native_id)
        tid = (await conn.execute(text("SELECT tid()"))).scalar_one()
    assert tid != threading.get_native_id()  # aiosqlite's own thread, not the loop's
    return os.sched_getscheduler(tid)


async def test_background_engine_threads_run_sched_idle(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'u.db'}")
    try:
        await store.upgrade()
        assert await _query_thread_policy(store.background_engine) == os.SCHED_IDLE
        assert await _query_thread_policy(store.engine) == os.SCHED_OTHER  # ingest, reads
        assert store.background_engine is store.background_engine  # one pool
    finally:
        await store.close()


async def test_the_apps_budget_refresh_reads_through_the_idle_engine(
    aiohttp_client: object, tmp_path: Path
) -> None:
    budgets = [{"name": "day", "window": "day", "limit_usd": "10"}]
    settings = make_settings(tmp_path, budgets=budgets, flush_interval=3600)
    client = await aiohttp_client(create_app(settings))  # type: ignore[operator]
    await wait_ready(client)
    resp = await client.post("/v1/usage", json=[report(request_id="a", cost_usd="1.5")])
    assert resp.status == 202
    app = client.app
    idle = app[STORE].background_engine
    before = idle.pool.checkedin()  # type: ignore[attr-defined]
    await app[BUDGETS].refresh()
    assert idle.pool.checkedin() >= max(before, 1)  # type: ignore[attr-defined]
    assert await _query_thread_policy(idle) == os.SCHED_IDLE
