"""The WAL on a real, small tmpfs: a full disk (ENOSPC, torn writes) and a rotation that
cannot create its next segment (no inodes left). Nothing acknowledged is lost, nothing
answered 202 is missing, and ingest recovers by itself when space comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MakeClient
from faultkit import (
    JSON,
    Sender,
    Service,
    Tmpfs,
    batches_of,
    body,
    check_database,
    make_reports,
    mount_tmpfs,
    wait_for,
)
from helpers import http, scrape, total, value, wait_ready
from storecheck import assert_stored_exactly

from exporter.app import FLUSHER, STORE, WAL
from exporter.wal import WriteAheadLog

pytestmark = pytest.mark.slow


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "disk", "size=8m")


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "inodes", "size=8m,nr_inodes=64")


def test_full_disk_loses_no_acknowledged_report_and_ingest_recovers(
    tmp_path: Path, disk: Tmpfs
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    service = Service(tmp_path / "svc", disk.path / "data", db_url, env={
        "LLM_USAGE_FLUSH_INTERVAL": "3600",  # the WAL only grows: the disk must fill up
        "LLM_USAGE_WAL_SEGMENT_BYTES": str(64 * 1024)})  # fmt: skip
    service.start()
    try:
        service.wait_ready()
        filler = disk.fill(leave=150_000)
        reports = make_reports(2_000, "disk")
        sender = Sender(service.url)
        deadline = time.monotonic() + 120
        pool = ThreadPoolExecutor(4)
        futures = [pool.submit(sender.post_until_acked, b, deadline)
                   for b in batches_of(reports, 40)]  # fmt: skip

        def refusing() -> bool:
            return sender.statuses.count(503) >= 30

        wait_for(refusing, 60, "ingest to answer 503 on a full disk")
        status, data, _ = http("GET", f"{service.url}/readyz")
        assert status == 503 and b"cannot write" in data, data
        metrics = service.metrics()
        assert value(metrics, "llm_usage_wal_broken") == 1
        failures = total(metrics, "llm_usage_wal_failures_total")
        assert failures >= 1
        acked_while_full = len(sender.acked)
        assert 0 < acked_while_full < len(reports)

        filler.unlink()  # space comes back: every retried batch goes through
        for f in futures:
            f.result(timeout=120)
        pool.shutdown()
        assert sorted(r["request_id"] for r in sender.acked) == sorted(
            r["request_id"] for r in reports
        )
        assert set(sender.statuses) == {202, 503}, "503 + Retry-After, never a 5xx of another kind"
        assert sender.retry_after == {"5"}
        status, _, _ = http("GET", f"{service.url}/readyz")
        assert status == 200
        assert value(service.metrics(), "llm_usage_wal_broken") == 0
    finally:
        code = service.stop()  # SIGTERM: the final flush moves the WAL into the database
    assert code == 0
    logs = service.logs()
    assert "Traceback" not in logs
    assert logs.count("wal: write to") <= 2, "failures are logged once a minute, not per event"
    assert "writing again after" in logs
    check_database(db_url, sender.acked)


async def test_retry_of_a_report_whose_first_write_failed_is_not_a_duplicate(
    disk: Tmpfs, make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client(data_dir=disk.path / "data",
                               database_url=f"sqlite+aiosqlite:///{tmp_path / 'u.db'}",
                               flush_interval=3600)  # fmt: skip
    await wait_ready(client)
    (one,) = make_reports(1, "raced")
    data = body([one])
    filler = disk.fill(leave=0)

    async def post() -> tuple[int, dict[str, Any]]:
        resp = await client.post("/v1/usage", data=data, headers=JSON)
        return resp.status, await resp.json()

    # 25 copies at once while the disk is full: the first copy's write fails, so no copy may
    # be answered 202 "duplicate" (before the fix 24 of them were)
    results = await asyncio.gather(*(post() for _ in range(25)))
    assert [s for s, _ in results] == [503] * 25, results
    assert total(await scrape(client), "llm_input_tokens_total") == 0

    filler.unlink()
    await wait_ready(client)  # the WAL probes the disk and writes again by itself
    results = await asyncio.gather(*(post() for _ in range(25)))
    assert {s for s, _ in results} == {202}
    assert sum(b["accepted"] for _, b in results) == 1
    assert sum(b["duplicates"] for _, b in results) == 24
    assert total(await scrape(client), "llm_input_tokens_total") == one["input_tokens"]
    await client.app[FLUSHER].flush_once()
    await assert_stored_exactly(client.app[STORE], [one])


async def test_rotation_failure_keeps_writing_the_active_segment_and_loses_nothing(
    few_inodes: Tmpfs, make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client(data_dir=few_inodes.path / "data",
                               database_url=f"sqlite+aiosqlite:///{tmp_path / 'u.db'}",
                               flush_interval=3600, wal_segment_bytes=1024)  # fmt: skip
    await wait_ready(client)
    wal = client.app[WAL]
    inodes = few_inodes.use_up_inodes()  # the next segment file cannot be created
    reports = make_reports(200, "rot")
    acked: list[dict[str, Any]] = []
    for batch in batches_of(reports, 5):
        resp = await client.post("/v1/usage", data=body(batch), headers=JSON)
        assert resp.status == 202, await resp.text()
        acked.extend(batch)
    m = await scrape(client)
    assert value(m, "llm_usage_wal_failures_total", kind="rotate") >= 1
    assert wal.broken_reason is None  # still writing: the old segment stays active
    assert wal.active is not None and wal.active.size > 1024 * 10
    # the flusher cannot seal (rotate) either: it flushes nothing and keeps everything
    await client.app[FLUSHER].flush_once()
    assert wal.pending_reports == len(acked)
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()

    for p in inodes:
        p.unlink()
    more = make_reports(20, "rot-after")
    resp = await client.post("/v1/usage", data=body(more), headers=JSON)
    assert resp.status == 202
    acked.extend(more)
    assert await client.app[FLUSHER].flush_once() == len(acked)
    await assert_stored_exactly(client.app[STORE], acked)
    assert orjson.loads(await (await client.get("/readyz")).read())["status"] == "ready"


async def test_start_without_room_for_a_segment_replays_and_answers_503_until_there_is(
    few_inodes: Tmpfs, make_client: MakeClient, tmp_path: Path
) -> None:
    data_dir = few_inodes.path / "data"
    first = make_reports(30, "before")
    left = WriteAheadLog(data_dir / "wal", segment_bytes=1 << 20, max_bytes=1 << 26)
    left.open()  # what a killed process leaves behind: a segment not yet flushed
    left.start()
    await left.append(orjson.dumps(first), len(first))
    await left.close()
    inodes = few_inodes.use_up_inodes()
    client = await make_client(data_dir=data_dir, flush_interval=3600,
                               database_url=f"sqlite+aiosqlite:///{tmp_path / 'u.db'}")  # fmt: skip
    wal = client.app[WAL]
    assert wal.pending_reports == len(first)  # replayed even though no new segment fits
    # the WAL probes once a second: these run well before its first probe
    resp = await client.post("/v1/usage", data=body(make_reports(3, "during")), headers=JSON)
    assert resp.status == 503 and "Retry-After" in resp.headers
    resp = await client.get("/readyz")
    assert resp.status == 503 and "cannot write" in await resp.text()
    for p in inodes:
        p.unlink()
    await wait_ready(client)
    later = make_reports(3, "after")
    assert (await client.post("/v1/usage", data=body(later), headers=JSON)).status == 202
    await client.app[FLUSHER].flush_once()
    await assert_stored_exactly(client.app[STORE], first + later)
