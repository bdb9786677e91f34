"""A bug in the flush path is a flush failure, never a quarantine: the WAL is kept, the
failure is counted (and alerted on), and once the bug is gone the database equals the
acknowledged set.

The bug is injected through `StoreWriter.fault`, a test hook the service never sets, into a
live app on a loopback port: reports go in over HTTP, the real flusher loop runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import scrape, total, wait_ready
from storecheck import assert_stored_exactly, report

from exporter.app import FLUSHER, STORE, WAL
from exporter.store import Store

BUGS: dict[str, Callable[[], BaseException]] = {
    # builtins that the old classifier took for "the database refused the data"
    "KeyError": lambda: KeyError("usage_details"),
    "TypeError": lambda: TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
    "ValueError": lambda: ValueError("invalid literal for int() with base 10: 'x'"),
    "OverflowError": lambda: OverflowError("Python int too large to convert to C long"),
}


def _db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite+aiosqlite:///{tmp_path}/db/usage.db"


async def _until(check: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("backend", "bug"), [*(("sqlite", b) for b in BUGS), ("postgres", "KeyError")]
)
async def test_a_bug_in_the_flush_path_keeps_the_wal_and_loses_nothing(
    make_client: Any, request: pytest.FixtureRequest, tmp_path: Path, backend: str, bug: str
) -> None:
    data_dir = tmp_path / "data"
    client = await make_client(
        data_dir=data_dir,
        database_url=_db_url(backend, request, tmp_path),
        flush_interval=0.05,
        flush_max_backoff=0.2,
    )
    await wait_ready(client)
    attempts: list[int] = []

    def fault(payloads: Sequence[bytes]) -> None:
        attempts.append(len(payloads))
        raise BUGS[bug]()

    client.app[STORE].writer.fault = fault
    sent = [report(i) for i in range(120)]
    acknowledged = []
    for start in range(0, len(sent), 30):
        batch = sent[start : start + 30]
        for _ in range(2):  # every batch retried once: counted once
            resp = await client.post("/v1/usage", json=batch)
            assert resp.status == 202, await resp.text()
        acknowledged += batch

    async def failed_three_times() -> bool:
        return total(await scrape(client), "llm_usage_flush_failures_total") >= 3

    await _until(failed_three_times)
    samples = await scrape(client)
    assert total(samples, "llm_usage_quarantined_reports_total") == 0
    # retries are not written again (dedupe); every first copy is still in the WAL
    assert client.app[WAL].pending_reports == len(acknowledged)
    assert total(samples, "llm_usage_pending_reports") == len(acknowledged)
    assert not (data_dir / "quarantine").exists()
    store: Store = client.app[STORE]
    async with store.engine.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT count(*) FROM usage_details")).scalar() == 0
    problems = client.app[FLUSHER].readiness_problems()
    assert problems and "flush failing" in problems[0] and bug in problems[0]
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert any("flush failing" in p for p in (await resp.json())["problems"])

    client.app[STORE].writer.fault = None  # the fix is deployed

    async def drained() -> bool:
        return client.app[WAL].pending_reports == 0

    await _until(drained)
    assert len(attempts) >= 3
    await assert_stored_exactly(store, acknowledged)
    samples = await scrape(client)
    assert total(samples, "llm_usage_quarantined_reports_total") == 0
    assert not (data_dir / "quarantine").exists()
    await wait_ready(client)
