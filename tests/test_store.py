"""Storage on both backends: exactly-once writes, exact rollups and costs, retention, flusher.

Every test runs on SQLite (embedded default) and on a real throwaway Postgres 15 cluster. The
expected values are computed here, independently of exporter.store, from the reports sent.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import storequeries as queries
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgcluster import PgCluster, start_cluster
from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from storecheck import (
    BASE,
    assert_stored_exactly,
    exact_cost,
    report,
)

from exporter.budgets.spend import stored_spend
from exporter.config import Settings
from exporter.flusher import Flusher
from exporter.selfmetrics import SelfMetrics
from exporter.store import Store
from exporter.store.errors import describe_error
from exporter.store.migrate import current_revision, head_revision
from exporter.store.retention import purge_details, retention_cutoff
from exporter.store.tables import metadata, usage_details
from exporter.usage import MAX_COST_USD, Status
from exporter.wal import WriteAheadLog

# -- fixtures and helpers --------------------------------------------------------------------


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/data/usage.db"


@pytest.fixture(params=["sqlite", "sqlite-process", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A migrated, empty database of each backend (SQLite flushing in process, and in its
    own process as the service does by default: store/flush_process.py)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else sqlite_url(tmp_path)
    s = Store.from_url(url, flush_process=request.param == "sqlite-process")
    await s.upgrade()
    try:
        yield s
    finally:
        await s.close()


# -- migrations ------------------------------------------------------------------------------


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, metadata))


async def test_migrations_from_zero_are_idempotent_and_match_the_models(store: Store) -> None:
    head = head_revision()
    assert head is not None and await current_revision(store.engine) == head
    assert await store.upgrade() == head  # `db upgrade` again: nothing to do
    async with store.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_migrations_on_an_empty_database(tmp_path: Path, pg_cluster: PgCluster) -> None:
    """From nothing at all (no alembic_version table), on both backends, twice."""
    db = pg_cluster.create_database()
    for url in (sqlite_url(tmp_path / "fresh"), pg_cluster.url(db)):
        s = Store.from_url(url)
        try:
            assert await current_revision(s.engine) is None
            assert await s.upgrade() == head_revision()
            assert await s.upgrade() == head_revision()
            assert (await s.writer.write([report(1)])).inserted == 1
        finally:
            await s.close()
    pg_cluster.drop_database(db)


async def test_concurrent_migrations_on_postgres(pg_url: str) -> None:
    """Replicas starting together: the advisory lock lets exactly one create the tables."""
    stores = [Store.from_url(pg_url) for _ in range(4)]
    try:
        revisions = await asyncio.gather(*(s.upgrade() for s in stores))
        assert revisions == [head_revision()] * 4
    finally:
        for s in stores:
            await s.close()


# -- exactly once ----------------------------------------------------------------------------


async def test_same_batch_twice_is_counted_once(store: Store) -> None:
    batch = [report(i) for i in range(40)]
    first = await store.writer.write(batch)
    assert (first.received, first.inserted) == (40, 40)
    again = await store.writer.write(batch)
    assert (again.received, again.inserted, again.rollup_rows) == (40, 0, 0)
    assert again.duplicates == 40
    await assert_stored_exactly(store, batch)


async def test_overlapping_batches(store: Store) -> None:
    a = [report(i) for i in range(0, 30)]
    b = [report(i) for i in range(20, 50)]
    c = [report(i) for i in range(45, 60)] + [report(i) for i in range(0, 5)]
    results = [await store.writer.write(x) for x in (a, b, c)]
    assert [r.inserted for r in results] == [30, 20, 10]
    await assert_stored_exactly(store, a + b + c)


async def test_duplicates_inside_one_batch_first_occurrence_wins(store: Store) -> None:
    first = report(7, input_tokens=1000)
    changed = report(7, input_tokens=8, cost_usd=99.0)  # a retry whose body changed
    batch = [report(1), first, report(2), changed, report(1)]
    result = await store.writer.write(batch)
    assert (result.received, result.inserted) == (5, 3)
    await assert_stored_exactly(store, batch)
    # and a later batch cannot change it either
    await store.writer.write([changed])
    await assert_stored_exactly(store, batch)


async def test_rollups_by_hour_and_day_sum_to_the_details(store: Store) -> None:
    # 17-minute steps from 21:00 on March 1st: many hours, across a UTC day boundary, and
    # timestamps with non-UTC offsets land in their UTC bucket
    batch = [report(i) for i in range(200)]
    batch.append(report(500, completed_at="2026-03-02T01:30:00+05:00"))  # = 2026-03-01 20:30Z
    for i in range(0, len(batch), 37):
        await store.writer.write(batch[i : i + 37])
    await assert_stored_exactly(store, batch)
    hours = {k[1] for k in await queries.rollup_rows(store.engine, "hour")}
    days = {k[1] for k in await queries.rollup_rows(store.engine, "day")}
    assert datetime(2026, 3, 1, 20, tzinfo=UTC) in hours
    assert days == {datetime(2026, 3, d, tzinfo=UTC) for d in (1, 2, 3, 4)}


async def test_costs_are_exact_decimals(store: Store) -> None:
    costs = [0.1, 0.2, 0.30000000000000004, 1e-10, 4e-11, 5e-11, 1234.1234567891,
             9999.0, 0.0001234, 7.77e-7, 0.0, 1.5e-10, "0.12345678905"]  # fmt: skip
    batch = [report(i, cost_usd=c, completed_at=BASE) for i, c in enumerate(costs)]
    batch.append(report(99, cost_usd=None, completed_at=BASE))  # unpriced: NULL, counts as 0
    await store.writer.write(batch)
    want = sum((exact_cost(c) for c in costs), Decimal(0))
    assert (await queries.detail_totals(store.engine)).cost_usd == want
    assert (await queries.rollup_totals(store.engine, "hour")).cost_usd == want
    assert (await queries.rollup_totals(store.engine, "day")).cost_usd == want
    async with store.engine.connect() as conn:
        result = await conn.execute(select(usage_details.c.request_id, usage_details.c.cost_usd))
        rows = {rid: cost for rid, cost in result.all()}
    assert rows["req-0"] == Decimal("0.1000000000")
    assert rows["req-4"] == Decimal("0E-10")  # 4e-11 rounds down
    # half-even at 1e-10 (exporter.money), the same digits on both backends
    assert rows["req-5"] == Decimal("0E-10")  # 5e-11: a tie, to the even 0
    assert rows["req-11"] == Decimal("2E-10")  # 1.5e-10: a tie, to the even 2
    assert rows["req-12"] == Decimal("0.1234567890")  # exact text, a tie to the even 0
    assert rows["req-2"] == Decimal("0.3000000000")  # 0.1 + 0.2 is 0.3 here, not 0.30000…4
    assert rows["req-99"] is None
    # additive upserts of many small costs stay exact (float addition would drift)
    more = [report(1000 + i, cost_usd=0.1, completed_at=BASE) for i in range(1000)]
    await store.writer.write(more)
    assert (await queries.rollup_totals(store.engine, "day")).cost_usd == want + Decimal(100)


async def test_odd_values_are_stored_not_rejected(store: Store) -> None:
    """NUL characters (Postgres text can't hold them) and absent completed_at never jam a flush."""
    before = datetime.now(UTC)
    # ingest refuses NUL now (usage.py); a WAL written before that may still hold some
    nul = {**report(1), "user": "ev\x00il", "node": "n\x00"}
    bare = report(2)
    bare["completed_at"] = None
    del bare["total_tokens"]
    result = await store.writer.write([nul, bare, report(3)])
    assert result.inserted == 3
    async with store.engine.connect() as conn:
        rows = {r.request_id: r for r in (await conn.execute(select(usage_details))).all()}
    assert rows["req-1"].user == "ev\ufffdil"
    assert rows["req-1"].node == "n\ufffd"
    assert rows["req-2"].completed_at >= before.replace(microsecond=0) - timedelta(seconds=1)
    assert rows["req-2"].total_tokens == bare["input_tokens"] + bare["output_tokens"]
    assert rows["req-3"].completed_at == BASE + timedelta(minutes=51)
    assert rows["req-3"].trace_id == "trace-3"


# -- spend (budgets) -------------------------------------------------------------------------


async def test_budget_spend_over_aligned_windows_is_exact(store: Store) -> None:
    """exporter.budgets.spend (rollup days and hours, audit-row edges) against plain sums."""
    batch = [report(i, completed_at=BASE + timedelta(hours=5 * i)) for i in range(120)]
    await store.writer.write(batch)

    async def spend(since: datetime, until: datetime, **match: str) -> Decimal:
        filters = {k: [v] for k, v in match.items()}
        found = await stored_spend(store.engine, since, until, filters, tuple(match))
        return sum(found.values(), Decimal(0))

    def want(since: datetime, until: datetime, **match: str) -> Decimal:
        total = Decimal(0)
        for r in batch:
            done = datetime.fromisoformat(r["completed_at"])
            if since <= done < until and all(r[k] == v for k, v in match.items()):
                total += exact_cost(r["cost_usd"])
        return total

    windows = [
        (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),  # month
        (datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 9, tzinfo=UTC)),  # ISO week
        (datetime(2026, 3, 5, tzinfo=UTC), datetime(2026, 3, 6, tzinfo=UTC)),  # day
        (datetime(2026, 3, 5, 7, tzinfo=UTC), datetime(2026, 3, 12, 13, tzinfo=UTC)),  # hours
        (datetime(2026, 3, 5, 7, tzinfo=UTC), datetime(2026, 3, 5, 9, tzinfo=UTC)),
    ]
    for since, until in windows:
        assert await spend(since, until) == want(since, until)
        assert await spend(since, until, user="alice") == want(since, until, user="alice")
        assert await spend(since, until, user="") == want(since, until, user="")
        assert await spend(since, until, team="red", model="llama") == want(
            since, until, team="red", model="llama"
        )
        assert await spend(since, until, api_key_id="key-2") == want(
            since, until, api_key_id="key-2"
        )
    assert await spend(windows[0][1], windows[0][0]) == 0


# -- retention -------------------------------------------------------------------------------


async def test_retention_deletes_old_details_and_keeps_rollups(store: Store) -> None:
    now = datetime.now(UTC)
    old = [report(i, completed_at=now - timedelta(days=500 + i)) for i in range(23)]
    new = [report(100 + i, completed_at=now - timedelta(days=i)) for i in range(7)]
    await store.writer.write(old + new)
    rollups_before = await queries.rollup_rows(store.engine)
    deleted = await purge_details(store.engine, now - timedelta(days=400), batch_size=5)
    assert deleted == 23
    assert sorted(await queries.request_ids(store.engine)) == sorted(r["request_id"] for r in new)
    assert await queries.rollup_rows(store.engine) == rollups_before
    assert await purge_details(store.engine, retention_cutoff(400)) == 0
    # documented consequence: the dedupe window is the retention
    assert (await store.writer.write(old[:1])).inserted == 1


# -- property: any sequence of batches with repeats -------------------------------------------

_report_specs = st.tuples(
    st.integers(0, 15),  # request id: few, so repeats are common
    st.sampled_from(["m1", "m2"]),
    st.sampled_from(["", "u1", "u2"]),
    st.integers(0, 3 * 24 * 60),  # minutes after BASE
    st.one_of(st.none(), st.floats(0, 1000, allow_nan=False), st.integers(0, int(MAX_COST_USD))),
    st.sampled_from([Status.SUCCESS, Status.ERROR]),
    st.integers(0, 10**6),
)


def _from_spec(spec: tuple[Any, ...]) -> dict[str, Any]:
    rid, model, user, minutes, cost, status, tokens = spec
    return report(
        rid,
        request_id=f"p-{rid}",
        model=model,
        user=user,
        completed_at=BASE + timedelta(minutes=minutes, seconds=rid),
        cost_usd=float(cost) if cost is not None else None,
        status=status,
        input_tokens=tokens,
        cached_input_tokens=tokens // 3,
        output_tokens=tokens % 1000,
        reasoning_tokens=0,
    )


async def _clear(s: Store) -> None:
    async with s.engine.begin() as conn:
        await conn.execute(text("DELETE FROM usage_details"))
        await conn.execute(text("DELETE FROM usage_rollups"))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batches=st.lists(st.lists(_report_specs, max_size=10), min_size=1, max_size=6),
    repeat=st.lists(st.integers(0, 5), max_size=4),
)
async def test_any_batches_with_repeats_store_the_distinct_set(
    store: Store, batches: list[list[tuple[Any, ...]]], repeat: list[int]
) -> None:
    await _clear(store)
    sent = [[_from_spec(spec) for spec in batch] for batch in batches]
    sent += [sent[i % len(sent)] for i in repeat]  # whole-batch retries
    for batch in sent:
        await store.writer.write(batch)
    await assert_stored_exactly(store, [r for batch in sent for r in batch])


# -- replicas: concurrent writers on one Postgres ---------------------------------------------


async def test_concurrent_writers_overlapping_batches_are_exact(pg_url: str) -> None:
    """Two replicas, same reports in different orders and batchings, at the same time."""
    replicas = [Store.from_url(pg_url) for _ in range(3)]
    await replicas[0].upgrade()
    reports = [report(i, completed_at=BASE + timedelta(minutes=i % 90)) for i in range(3000)]
    try:

        async def replica(s: Store, seed: int) -> None:
            rnd = random.Random(seed)
            order = reports[:]
            rnd.shuffle(order)
            while order:
                n = rnd.randint(50, 400)
                chunk, order = order[:n], order[n:]
                await s.writer.write(chunk)

        await asyncio.gather(*(replica(s, i) for i, s in enumerate(replicas)))
        await assert_stored_exactly(replicas[0], reports)
    finally:
        for s in replicas:
            await s.close()


# -- the flusher with a real WAL -------------------------------------------------------------


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "flush_interval": 0.05,
        "flush_max_reports": 100,
        "flush_max_backoff": 0.2,
    }
    values.update(kw)
    return Settings(**values)


async def _open_wal(path: Path, **kw: Any) -> WriteAheadLog:
    wal = WriteAheadLog(
        path,
        segment_bytes=kw.get("segment_bytes", 1 << 20),
        max_bytes=kw.get("max_bytes", 1 << 30),
        durability="os",
    )
    wal.open()
    wal.start()
    return wal


async def _append(wal: WriteAheadLog, reports: Sequence[Mapping[str, Any]]) -> int:
    return await wal.append(orjson.dumps(list(reports)), len(reports))


def _wal_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("wal-*.log") if p.stat().st_size > 0)


async def test_flusher_moves_the_wal_into_the_database(store: Store, tmp_path: Path) -> None:
    wal = await _open_wal(tmp_path / "wal")
    metrics = SelfMetrics()
    dropped: list[int] = []
    flusher = Flusher(wal, store.writer, metrics, _settings(tmp_path), on_committed=dropped.append)
    sent = [report(i) for i in range(250)]
    seqs = [await _append(wal, sent[i : i + 50]) for i in range(0, 250, 50)]
    await _append(wal, sent[:30])  # a retry of already accepted reports
    flusher.nudge()
    assert wal.pending_reports == 280
    assert await flusher.flush_once() == 280
    assert _wal_files(tmp_path / "wal") == []
    assert wal.pending_reports == 0
    assert set(seqs) <= set(dropped)
    assert metrics.flushed._value.get() == 250
    assert metrics.flush_failures._value.get() == 0
    assert metrics.pending._value.get() == 0
    assert metrics.last_flush_success._value.get() > 0
    await assert_stored_exactly(store, sent)
    assert await flusher.flush_once() == 0
    await wal.close()


async def test_flusher_replays_a_wal_left_by_a_dead_process(store: Store, tmp_path: Path) -> None:
    sent = [report(i) for i in range(120)]
    wal = await _open_wal(tmp_path / "wal")
    for i in range(0, 120, 40):
        await _append(wal, sent[i : i + 40])
    # half of it had been committed just before the "crash", the segment not yet dropped
    await store.writer.write(sent[:60])
    await wal.close()
    wal = await _open_wal(tmp_path / "wal")
    assert wal.pending_reports == 120
    flusher = Flusher(wal, store.writer, SelfMetrics(), _settings(tmp_path))
    assert await flusher.flush_once() == 120
    await assert_stored_exactly(store, sent)
    await wal.close()


async def _break(s: Store) -> None:
    async with s.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE usage_rollups RENAME TO usage_rollups_away"))


async def _repair(s: Store) -> None:
    async with s.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE usage_rollups_away RENAME TO usage_rollups"))


async def _outage_and_recovery(
    s: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture, down: Any, up: Any
) -> None:
    wal = await _open_wal(tmp_path / "wal")
    metrics = SelfMetrics()
    flusher = Flusher(wal, s.writer, metrics, _settings(tmp_path, flush_max_reports=40))
    sent = [report(i) for i in range(200)]
    await _append(wal, sent[:100])
    assert await flusher.flush_once() == 100
    await down()
    runner = asyncio.create_task(flusher.run())
    for i in range(100, 200, 20):
        await _append(wal, sent[i : i + 20])
        flusher.nudge()
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    assert metrics.flush_failures._value.get() >= 3
    assert wal.pending_reports == 100
    assert len(_wal_files(tmp_path / "wal")) >= 1
    outage_logs = [r for r in caplog.records if "flush failed" in r.getMessage()]
    assert len(outage_logs) == 1, "an outage is logged once"
    message = outage_logs[0].getMessage()
    assert "report(s) in the WAL" in message
    assert "Error" in message or "Exception" in message  # the error class is named
    await up()
    deadline = asyncio.get_running_loop().time() + 30
    while wal.pending_reports and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    assert wal.pending_reports == 0
    assert any("flush recovered" in r.getMessage() for r in caplog.records)
    await flusher.stop(timeout=10)
    await runner
    await wal.close()
    assert _wal_files(tmp_path / "wal") == []
    await assert_stored_exactly(s, sent)


async def test_flusher_survives_a_failing_database(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="exporter.flusher")
    await _outage_and_recovery(
        store, tmp_path, caplog, lambda: _break(store), lambda: _repair(store)
    )


async def test_flusher_survives_postgres_going_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real outage: the Postgres server is stopped, then started again."""
    caplog.set_level("INFO", logger="exporter.flusher")
    cluster = start_cluster()
    try:
        s = Store.from_url(cluster.url(cluster.create_database()))
        await s.upgrade()

        async def down() -> None:
            await asyncio.to_thread(cluster.stop)

        async def up() -> None:
            await asyncio.to_thread(cluster.start)

        try:
            await _outage_and_recovery(s, tmp_path, caplog, down, up)
            message = next(m for m in caplog.messages if "flush failed" in m)
            assert "postgres@" not in message
        finally:
            await s.close()
    finally:
        cluster.destroy()


async def test_stop_flushes_what_is_left(store: Store, tmp_path: Path) -> None:
    wal = await _open_wal(tmp_path / "wal")
    flusher = Flusher(wal, store.writer, SelfMetrics(), _settings(tmp_path, flush_interval=3600))
    runner = asyncio.create_task(flusher.run())
    await asyncio.sleep(0.05)
    sent = [report(i) for i in range(77)]
    await _append(wal, sent)
    await flusher.stop(timeout=10)
    await runner
    assert wal.pending_reports == 0
    await wal.close()
    await assert_stored_exactly(store, sent)


async def test_nudge_flushes_early_when_the_backlog_is_large(store: Store, tmp_path: Path) -> None:
    wal = await _open_wal(tmp_path / "wal")
    flusher = Flusher(wal, store.writer, SelfMetrics(), _settings(tmp_path, flush_interval=3600))
    runner = asyncio.create_task(flusher.run())
    await asyncio.sleep(0.05)
    await _append(wal, [report(i) for i in range(150)])  # over flush_max_reports=100
    flusher.nudge()
    for _ in range(100):
        if not wal.pending_reports:
            break
        await asyncio.sleep(0.05)
    assert wal.pending_reports == 0
    await flusher.stop(timeout=10)
    await runner
    await wal.close()


def test_error_descriptions_carry_no_secrets() -> None:
    exc = RuntimeError("could not connect to postgresql+asyncpg://app:s3cret@db:5432/usage")
    text_ = describe_error(exc)
    assert "s3cret" not in text_
    assert "RuntimeError" in text_
    assert describe_error(ValueError("x" * 5000)).endswith("…")


# -- poison reports: refused for their data, never a stuck flush -----------------------------


def _quarantined(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for f in sorted((tmp_path / "quarantine").glob("*.ndjson"))
        for line in f.read_bytes().splitlines()
    ]


async def test_reports_the_database_refuses_are_set_aside(store: Store, tmp_path: Path) -> None:
    """A report that can never be stored must not block the ones around it (nor fill the WAL)."""
    wal = await _open_wal(tmp_path / "wal")
    metrics = SelfMetrics()
    flusher = Flusher(wal, store.writer, metrics, _settings(tmp_path))
    good = [report(i) for i in range(300)]
    bad = dict(report(9999), input_tokens="many")  # only a bug could put this in the WAL
    del bad["total_tokens"]
    await _append(wal, good[:100])
    await _append(wal, [*good[100:150], bad, *good[150:200]])
    await _append(wal, good[200:])
    assert await flusher.flush_once() == 301
    assert wal.pending_reports == 0
    await assert_stored_exactly(store, good)
    refused = _quarantined(tmp_path)
    assert [r["report"]["request_id"] for r in refused] == ["req-9999"]
    assert refused[0]["error"]
    assert metrics.quarantined._value.get() == 1
    assert metrics.flush_failures._value.get() == 0  # the flush itself succeeded
    assert metrics.flushed._value.get() == 300
    await wal.close()


async def test_rollup_cost_overflow_sets_aside_only_what_does_not_fit(
    pg_url: str, tmp_path: Path
) -> None:
    """Hostile but valid input: costs whose sum passes NUMERIC(20,10) in one rollup row."""
    s = Store.from_url(pg_url)
    await s.upgrade()
    wal = await _open_wal(tmp_path / "wal")
    flusher = Flusher(wal, s.writer, SelfMetrics(), _settings(tmp_path))
    key = {"model": "m", "provider": "p", "user": "u", "team": "t", "api_key_id": "k"}
    # Validation caps cost_usd per report (MAX_COST_USD); a WAL written before that cap, or
    # a bug, could still carry more: the flush must set such rows aside, not jam.
    huge = [
        {**report(i, completed_at=BASE, operation="chat", **key), "cost_usd": 1e9}
        for i in range(12)
    ]
    normal = [report(100 + i) for i in range(50)]
    await _append(wal, normal[:25] + huge + normal[25:])
    try:
        assert await flusher.flush_once() == 62
        refused = {r["report"]["request_id"] for r in _quarantined(tmp_path)}
        stored = set(await queries.request_ids(s.engine))
        assert len(refused) == 3  # 9 × $1e9 fit in NUMERIC(20,10), the 10th would not
        assert refused | stored == {r["request_id"] for r in huge + normal}
        assert not refused & stored
        await assert_stored_exactly(s, [r for r in huge + normal if r["request_id"] in stored])
    finally:
        await wal.close()
        await s.close()


async def test_a_hung_database_is_abandoned_and_retried(pg_url: str, tmp_path: Path) -> None:
    """Not down but stuck (here: a lock held elsewhere): the attempt times out, is rolled
    back, counted, and retried once the database moves again."""
    s = Store.from_url(pg_url)
    await s.upgrade()
    wal = await _open_wal(tmp_path / "wal")
    metrics = SelfMetrics()
    flusher = Flusher(wal, s.writer, metrics, _settings(tmp_path), write_timeout=0.5)
    sent = [report(i) for i in range(40)]
    await _append(wal, sent)
    try:
        async with s.engine.connect() as blocker:
            await blocker.execute(text("LOCK TABLE usage_rollups IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(TimeoutError):
                await flusher.flush_once()
            assert metrics.flush_failures._value.get() == 1
            assert wal.pending_reports == 40
            await blocker.rollback()
        assert await flusher.flush_once() == 40
        await assert_stored_exactly(s, sent)
    finally:
        await wal.close()
        await s.close()
