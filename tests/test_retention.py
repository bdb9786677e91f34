"""Retention never holds up the flush (Postgres): own task, own short transactions, a linear
plan even on the stale statistics a crash mid-flush leaves behind.

The scene after a crash: a large backlog in the WAL (part of it already committed by the dead
process), hundreds of thousands of expired audit rows loaded just before (never analyzed,
autovacuum off), and the restarted flusher with its retention task. The backlog must be in
the database within one flush interval while retention is purging, and the totals exact.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
from sqlalchemy import text
from storecheck import BASE, assert_stored_exactly, report

from exporter.config import Settings
from exporter.flusher import Flusher
from exporter.selfmetrics import SelfMetrics
from exporter.store import Store
from exporter.store.retention import PG_PURGE_SQL, retention_cutoff
from exporter.store.retention_schedule import RetentionSchedule
from exporter.wal import WriteAheadLog

OLD_ROWS = 300_000
BACKLOG = 40_000
PER_RECORD = 100
FLUSH_INTERVAL = 10.0


async def _load_expired(store: Store, n: int) -> None:
    """n audit rows completed ~2 years ago, inserted in bulk, statistics never gathered."""
    async with store.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE usage_details SET (autovacuum_enabled = false)"))
        await conn.execute(
            text(
                "INSERT INTO usage_details (request_id, model, operation, status, completed_at,"
                " input_tokens, output_tokens, total_tokens, cost_usd)"
                " SELECT 'old-' || i, 'gpt-4o', 'chat', 'success',"
                " now() - interval '800 days' + i * interval '1 second', 10, 1, 11, 0.001"
                " FROM generate_series(1, :n) AS i"
            ),
            {"n": n},
        )


async def _count(store: Store, where: str) -> int:
    async with store.engine.connect() as conn:
        value = await conn.execute(text(f"SELECT count(*) FROM usage_details WHERE {where}"))
        return int(value.scalar_one())


async def test_the_purge_plan_is_linear_on_stale_statistics(pg_url: str) -> None:
    store = Store.from_url(pg_url)
    await store.upgrade()
    try:
        await _load_expired(store, 20_000)
        async with store.engine.begin() as conn:
            await conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(
                row[0]
                for row in await conn.execute(
                    text("EXPLAIN " + PG_PURGE_SQL),
                    {"cutoff": retention_cutoff(400), "n": 5000},
                )
            )
        assert "Seq Scan" not in plan, plan
        assert "Tid Scan" in plan, plan  # the victims by ctid: O(batch)
        assert "ix_usage_details_completed_at" in plan, plan  # walked from the oldest
    finally:
        await store.close()


async def test_backlog_flushes_within_one_interval_while_retention_purges(
    pg_url: str, tmp_path: Path
) -> None:
    store = Store.from_url(pg_url)
    await store.upgrade()
    wal = WriteAheadLog(
        tmp_path / "data" / "wal", segment_bytes=4 << 20, max_bytes=1 << 30, durability="os"
    )
    wal.open()
    wal.start()
    try:
        backlog = [report(i, completed_at=BASE) for i in range(BACKLOG)]
        for start in range(0, BACKLOG, PER_RECORD):
            chunk = backlog[start : start + PER_RECORD]
            await wal.append(orjson.dumps(chunk), len(chunk))
        # the dead process had committed the first quarter but not dropped its segments
        await store.writer.write(backlog[: BACKLOG // 4])
        await _load_expired(store, OLD_ROWS)

        settings = Settings(data_dir=tmp_path / "data", flush_interval=FLUSH_INTERVAL)
        retention = RetentionSchedule(store.engine, 400, max_batches=10_000)
        metrics = SelfMetrics()
        flusher = Flusher(wal, store.writer, metrics, settings, retention=retention)
        started = time.monotonic()
        runner = asyncio.create_task(flusher.run())
        while wal.pending_reports:
            assert time.monotonic() - started < FLUSH_INTERVAL, "backlog not flushed in time"
            await asyncio.sleep(0.02)
        flushed_after = time.monotonic() - started
        left_when_flushed = await _count(store, "request_id LIKE 'old-%'")
        assert left_when_flushed < OLD_ROWS  # retention was running meanwhile …
        while retention.runs == 0:  # … and finishes on its own, all of it
            assert time.monotonic() - started < 120, "retention did not finish"
            await asyncio.sleep(0.05)
        purged_after = time.monotonic() - started
        await flusher.stop()
        await runner
        assert retention.deleted == OLD_ROWS
        assert metrics.retention_deleted._value.get() == OLD_ROWS
        assert metrics.retention_failures._value.get() == 0
        assert await _count(store, "true") == BACKLOG
        await assert_stored_exactly(store, backlog)
        print(
            f"\nbacklog of {BACKLOG} flushed in {flushed_after:.2f}s "
            f"({left_when_flushed} of {OLD_ROWS} expired rows still there); "
            f"retention done in {purged_after:.2f}s"
        )
    finally:
        await wal.close()
        await store.close()


async def test_stop_during_a_purge_is_prompt_and_flushes_what_is_left(
    pg_url: str, tmp_path: Path
) -> None:
    """SIGTERM while retention is busy: retention is cancelled, the final flush runs at once."""
    store = Store.from_url(pg_url)
    await store.upgrade()
    wal = WriteAheadLog(
        tmp_path / "data" / "wal", segment_bytes=4 << 20, max_bytes=1 << 30, durability="os"
    )
    wal.open()
    wal.start()
    try:
        await _load_expired(store, 60_000)
        settings = Settings(data_dir=tmp_path / "data", flush_interval=3600)
        retention = RetentionSchedule(store.engine, 400, batch_size=200, max_batches=10_000)
        flusher = Flusher(wal, store.writer, SelfMetrics(), settings, retention=retention)
        runner = asyncio.create_task(flusher.run())
        while await _count(store, "request_id LIKE 'old-%'") == 60_000:
            await asyncio.sleep(0.02)
        late = [report(i) for i in range(500)]
        await wal.append(orjson.dumps(late), len(late))
        started = time.monotonic()
        await flusher.stop(timeout=10)
        stopped_in = time.monotonic() - started
        await runner
        assert retention.runs == 0  # it was cut short, not waited for
        assert stopped_in < 5, stopped_in
        assert wal.pending_reports == 0
        assert await _count(store, "request_id NOT LIKE 'old-%'") == len(late)
    finally:
        await wal.close()
        await store.close()
