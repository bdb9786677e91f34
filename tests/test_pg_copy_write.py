"""The Postgres write (binary COPY into a staging table, one merge statement) stores what the
SQLite write stores, column by column, and what the reports say (computed here).

The batches are larger than one COPY step (`write_postgres.COPY_STEP`), so the staged stream
is prepared in several steps and a duplicate whose first occurrence is in an earlier step
must still lose to it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from storecheck import BASE, assert_stored_exactly, report, write_watching_the_loop

from exporter.money import json_default
from exporter.store import Store
from exporter.store.copy_rows import fast_values, normalized_values
from exporter.store.errors import ErrorKind, classify
from exporter.store.rows import DETAIL_COLUMNS, ROLLUP_COLUMNS
from exporter.store.tables import ROLLUP_KEY, usage_details, usage_rollups
from exporter.store.write_postgres import COPY_STEP


@pytest.fixture
async def stores(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """(Postgres, SQLite), both migrated and empty."""
    pg = Store.from_url(pg_url)
    lite = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/usage.db")
    try:
        for s in (pg, lite):
            await s.upgrade()
        yield pg, lite
    finally:
        for s in (pg, lite):
            await s.close()


def varied(i: int) -> dict[str, Any]:
    """Reports that exercise every column kind: absent optionals, NULs, tags, odd offsets."""
    r = report(i, completed_at=BASE + timedelta(seconds=37 * i))
    if i % 7 == 0:
        r["tags"] = {"project": f"p{i % 3}", "nested": {"ü": [1, 2.5, None]}, "z": "a\x00b"}
    if i % 5 == 0:
        r.update(started_at=r["completed_at"], ttft_ms=12.5, stream=True, output_chunk_count=9)
    if i % 9 == 0:
        r.update(cost_usd=None, unpriced_reason="unknown_model")
    if i % 13 == 0:
        r.update(parent_id="nul\x00id", error_type="e\x00", estimated=True, status="cancelled")
    if i % 17 == 0:
        r["completed_at"] = (BASE + timedelta(hours=i % 30)).isoformat().replace("+00:00", "-07:00")
    if i % 19 == 0:
        r.update(duration_ms=250, request_content_bytes=2**40, web_search_requests=3)
    return r


async def _rows(
    engine: AsyncEngine, table: Any, columns: Sequence[str], order: Sequence[str]
) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(*(table.c[c] for c in columns)).order_by(*(table.c[c] for c in order))
        )
        return [tuple(r) for r in result.all()]


async def _contents(s: Store) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    details = await _rows(s.engine, usage_details, DETAIL_COLUMNS, ["request_id"])
    rollups = await _rows(s.engine, usage_rollups, ROLLUP_COLUMNS, ROLLUP_KEY)
    return details, rollups


async def test_postgres_stores_every_column_as_sqlite_does(stores: tuple[Store, Store]) -> None:
    pg, lite = stores
    n = 2 * COPY_STEP + 500
    first = [varied(i) for i in range(n)]
    # later steps repeat earlier ids with other bodies (a retried POST): the first one wins
    repeats = [dict(varied(i), input_tokens=1, cost_usd="9.5") for i in range(0, n, 97)]
    batches: list[list[Mapping[str, Any]]] = [first + repeats, first[: n // 2], [varied(n)]]
    for batch in batches:
        got = [await s.writer.write(batch) for s in (pg, lite)]
        assert got[0] == got[1]
        assert got[0].received == len(batch)
    reports = [r for b in batches for r in b]
    for s in (pg, lite):
        await assert_stored_exactly(s, reports)
    pg_details, pg_rollups = await _contents(pg)
    lite_details, lite_rollups = await _contents(lite)
    assert len(pg_details) == n + 1
    assert pg_rollups == lite_rollups
    # Postgres keeps tags with NUL replaced in their strings (it cannot read `\u0000` out of
    # a json value as text); SQLite keeps them as sent. Every other value is the same.
    tags_at = DETAIL_COLUMNS.index("tags")
    as_pg = [(*d[:tags_at], _cleaned(d[tags_at]), *d[tags_at + 1 :]) for d in lite_details]
    assert pg_details == as_pg
    by_id = {d[0]: d for d in pg_details}
    assert by_id["req-7"][tags_at] == {**first[7]["tags"], "z": "a\ufffdb"}
    assert by_id["req-0"][DETAIL_COLUMNS.index("input_tokens")] == first[0]["input_tokens"]


def _cleaned(value: Any) -> Any:
    """NUL → U+FFFD in every string of a JSON value (written here, not imported)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_cleaned(k): _cleaned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    return value


async def test_a_refused_report_late_in_the_stream_leaves_nothing_behind(
    stores: tuple[Store, Store],
) -> None:
    pg, _ = stores
    good = [varied(i) for i in range(COPY_STEP + 300)]
    bad = dict(varied(99_999), input_tokens="many")  # only a bug could put this in the WAL
    with pytest.raises(Exception) as caught:
        await pg.writer.write([*good, bad])  # staged after a whole step was sent
    assert classify(caught.value) is ErrorKind.REFUSED
    assert await _contents(pg) == ([], [])
    await pg.writer.write(good[:10])
    await pg.writer.write(good[5:20])
    await assert_stored_exactly(pg, good[:20])  # no staged row of the failed batch came back


async def test_postgres_flush_prepares_no_report_on_the_event_loop(pg_url: str) -> None:
    """Decoding and row preparation run in worker threads; the loop only runs asyncpg's COPY
    encoding (compiled code, invisible to the profiler) and the statements."""
    store = Store.from_url(pg_url)
    await store.upgrade()
    reports = [varied(i) for i in range(COPY_STEP + 1000)]
    try:
        on_loop, result = await write_watching_the_loop(store, reports)
        per_report = {"copy_records", "fast_values", "checked_values", "normalize", "add_payload"}
        assert not on_loop & per_report, sorted(on_loop)
        assert (result.received, result.inserted) == (len(reports) + 100, len(reports))
        await assert_stored_exactly(store, reports)
    finally:
        await store.close()


def test_the_fast_path_gives_what_normalize_gives() -> None:
    """copy_rows' one-pass values equal rows.normalize's on ingest-shaped and odd reports."""
    now = datetime(2026, 3, 5, tzinfo=UTC)
    shaped = [varied(i) for i in range(400)]
    odd: list[dict[str, Any]] = []
    for i, r in enumerate(shaped[:60]):
        odd.append({**r, "cost_usd": ["0.5", 0.25, 3, "-0.0000000001", "1.23"][i % 5]})
        odd.append({**r, "completed_at": ["2026-03-01T10:00:00", "2026-03-01 10:00:00Z",
                                          "2026-03-01T10:00:00.5+00:00"][i % 3]})  # fmt: skip
        odd.append({**r, "input_tokens": [2**63 - 1, -(2**63), True, None, 2**63][i % 5]})
        odd.append({**r, "stream": None, "operation": "", "duration_ms": 7, "total_tokens": None})
        odd.append({k: v for k, v in r.items() if k != "team"})
        odd.append({**r, "model": 5, "tags": {"k": "v\x00"}, "completed_at": None})
    taken = 0
    for r in shaped + odd:
        if "\x00" in "".join(v for v in r.values() if isinstance(v, str)):
            continue  # copy_records sends a record with a NUL in its text to normalize
        fast = fast_values(r)
        if fast is not None:
            taken += 1
            assert fast == normalized_values(r, now), r
    assert taken > len(shaped) // 2
    # what ingest writes takes the fast path
    assert all(fast_values(report(i)) is not None for i in range(100))


async def _terminate_when(pg_cluster: Any, db: str, query_prefix: str) -> int:
    """Poll pg_stat_activity until a backend of `db` runs a statement starting with
    `query_prefix`, then terminate it (a crash of that backend, as the server sees it)."""
    for _ in range(4000):  # bounded: ~20 s
        out = await asyncio.to_thread(
            pg_cluster.psql,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            f"'{db}' AND state = 'active' AND btrim(query, E' \\n') LIKE '{query_prefix}%'",
        )
        if "t" in out.split():
            return 1
        await asyncio.sleep(0.005)
    raise AssertionError(f"no backend ran {query_prefix}… in 20 s")


@pytest.mark.parametrize("where", ["COPY", "WITH"])
async def test_a_backend_killed_mid_copy_or_mid_merge_commits_nothing_and_a_retry_is_exact(
    pg_cluster: Any, where: str
) -> None:
    """The flushing connection dies while it streams the staging COPY, or while the merge
    statement runs: nothing of the batch is stored, the pool hands out a working connection
    next, and the retry stores every report exactly once."""
    db = pg_cluster.create_database()
    store = Store.from_url(pg_cluster.url(db))
    try:
        await store.upgrade()
        reports = [varied(i) for i in range(6 * COPY_STEP)]
        killer = asyncio.create_task(_terminate_when(pg_cluster, db, where))
        with pytest.raises(Exception) as caught:
            await store.writer.write(reports)
        assert await killer == 1
        assert classify(caught.value) is not ErrorKind.REFUSED  # retryable, not quarantined
        assert await _contents(store) == ([], [])
        await store.writer.write(reports)
        await store.writer.write(reports[: COPY_STEP + 7])  # a replay: nothing new
        await assert_stored_exactly(store, reports)
    finally:
        await store.close()


async def test_one_request_id_order_over_the_steps_and_the_first_arrival(pg_url: str) -> None:
    """A write of several COPY steps inserts its details in one request_id order over the
    whole transaction, byte-wise (the lock order that keeps two replicas from deadlocking:
    bench/RESULTS.md, `## Limits: Postgres flush pipelined`), whatever the arrival order; a
    request_id repeated in a later step keeps its first arrival, the rollups count it once."""
    store = Store.from_url(pg_url)
    await store.upgrade()
    try:
        n = COPY_STEP + 40
        ids = [f"k-{i:06d}" for i in range(n - 4)] + ["k-é", "k-z", "k-\uffff", "k-\U0001d538"]
        reports = [report(i, request_id=rid) for i, rid in enumerate(ids)]
        random.Random(5).shuffle(reports)  # arrival order: not the id order
        dup = f"k-{COPY_STEP - 1:06d}"  # its repeat arrives last, in the last step
        first_dup = next(r for r in reports if r["request_id"] == dup)
        repeat = dict(first_dup, input_tokens=first_dup["input_tokens"] + 1, cost_usd="9.5")
        arrivals = [*reports, repeat]
        payloads = [
            orjson.dumps(arrivals[i : i + 100], default=json_default)
            for i in range(0, len(arrivals), 100)
        ]
        result = await store.writer.write_payloads(payloads)
        assert (result.received, result.inserted) == (n + 1, n)
        await assert_stored_exactly(store, arrivals)  # distinct(): first arrival wins
        async with store.engine.connect() as conn:
            heap = await conn.execute(text("SELECT request_id FROM usage_details ORDER BY ctid"))
            order = [row[0] for row in heap]
            tokens = (
                await conn.execute(
                    text("SELECT input_tokens FROM usage_details WHERE request_id = :r"),
                    {"r": dup},
                )
            ).scalar_one()
        # one transaction into an empty table: the heap holds the rows in insertion order
        assert order == sorted(ids, key=lambda s: s.encode())
        assert tokens == first_dup["input_tokens"]
    finally:
        await store.close()
