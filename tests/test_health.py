"""/readyz composes named checks; each says what is wrong, and any problem means 503."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MakeClient
from helpers import free_port, report, wait_ready

from exporter.api.health import Readiness


async def test_readiness_runs_sync_and_async_checks_in_order() -> None:
    readiness = Readiness()

    async def slow() -> list[str]:
        await asyncio.sleep(0)
        return ["b", "c"]

    readiness.add("none", lambda: None)
    readiness.add("one", lambda: "a")
    readiness.add("many", slow)
    readiness.add("empty", lambda: [])
    assert readiness.names == ["none", "one", "many", "empty"]
    assert await readiness.problems() == ["a", "b", "c"]
    with pytest.raises(ValueError, match="twice"):
        readiness.add("one", lambda: None)


async def test_readyz_reports_an_unmigrated_database(make_client: MakeClient) -> None:
    # nothing listens there: migrations keep retrying in the background
    client = await make_client(database_url=f"postgresql://u:pw@127.0.0.1:{free_port()}/db")
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {
        "status": "not ready",
        "problems": ["database schema not migrated yet"],
    }
    assert (await client.get("/healthz")).status == 200  # alive all the same


async def test_readyz_reports_a_nearly_full_wal(make_client: MakeClient) -> None:
    cap = 64 * 1024
    client = await make_client(wal_max_bytes=cap, wal_segment_bytes=cap, flush_interval=3600)
    await wait_ready(client)
    # small batches (~2 KB: a record carries every UsageReport field) so the 95% mark (3 KB
    # below the cap) is crossed before the cap
    for i in range(300):  # bounded: 64 KiB is reached well before
        batch = [report(request_id=f"fill-{i}-{j}", user="u" * 200) for j in range(3)]
        assert (await client.post("/v1/usage", json=batch)).status == 202
        if (await client.get("/readyz")).status == 503:
            break
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {
        "status": "not ready",
        "problems": ["write-ahead log is (nearly) full"],
    }
