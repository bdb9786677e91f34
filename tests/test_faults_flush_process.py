"""The service's SQLite flush process (the default, store/flush_process.py) under real faults:
the serving process SIGKILLed while its flush child is inside a transaction (no orphan, and
the restart replays exactly), and the database's disk filling up (ENOSPC on a real tmpfs:
unavailable, retried, never quarantined; in process and in the child alike).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import Service, Tmpfs, check_database, make_reports, mount_tmpfs, wait_for
from helpers import http, total, value

from exporter.store import Store
from exporter.store.errors import ErrorKind, classify, describe_error

CHILD = "exporter.store.flush_child"


def _children(ppid: int) -> list[int]:
    """Live flush children of `ppid` (from /proc: no mocks, no psutil)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = stat.with_name("cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == ppid and fields[0] != "Z" and CHILD.encode() in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_parent_sigkill_mid_write_leaves_no_orphan_and_the_restart_replays_exactly(
    tmp_path: Path,
) -> None:
    db = tmp_path / "usage.db"
    service = Service(tmp_path / "svc", tmp_path / "data", f"sqlite+aiosqlite:///{db}",
                      env={"LLM_USAGE_FLUSH_INTERVAL": "0.2"})  # fmt: skip
    service.start()
    service.wait_ready()
    first = make_reports(300, "before")
    assert service.post(first)[0] == 202
    wait_for(lambda: value(service.metrics(), "llm_usage_pending_reports") == 0, 30, "a flush")
    parent = service.proc.proc.pid
    (child,) = _children(parent)  # one child per serving process (started by its first probe)

    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the next flush waits inside its transaction
        sent = make_reports(2_000, "killed")
        for start in range(0, len(sent), 500):
            assert service.post(sent[start : start + 500])[0] == 202

        def waiting_in_a_write() -> bool:  # the child sleeps in SQLite's busy handler
            return Path(f"/proc/{child}/wchan").read_text() in ("hrtimer_nanosleep", "do_nanosleep")

        wait_for(waiting_in_a_write, 30, "the flush child to wait for the write lock")
        service.proc.proc.kill()
        service.proc.proc.wait(10)
        # without PR_SET_PDEATHSIG it would wait out the busy timeout (30 s), then commit
        wait_for(lambda: not _alive(child), 5, "the orphaned flush child to exit")
        assert _children(1) == [] and _children(parent) == []
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM usage_details").fetchone() == (300,)

    service.start()  # the restart replays the WAL the killed process left
    try:
        service.wait_ready()
        wait_for(lambda: value(service.metrics(), "llm_usage_pending_reports") == 0, 60,
                 "the replay")  # fmt: skip
        new_parent = service.proc.proc.pid
        assert len(_children(new_parent)) == 1
    finally:
        assert service.stop() == 0
    assert _children(new_parent) == [], "the child stops with its parent"
    assert "Traceback" not in service.logs()
    check_database(service.database_url, first + sent)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "disk", "size=8m")


async def _failure(store: Store, n: int, prefix: str) -> BaseException:
    try:
        await store.writer.write(make_reports(n, prefix))
    except Exception as exc:
        return exc
    raise AssertionError("the write did not fail on a full disk")


def _sqlite_names(exc: BaseException) -> set[str]:
    names, todo, seen = set(), [exc], set()
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(name := getattr(err, "sqlite_errorname", None), str):
            names.add(name)
        todo += [getattr(err, "orig", None), err.__cause__]
    return names


def test_a_full_database_disk_is_unavailable_in_process_and_in_the_child(
    tmp_path: Path, disk: Tmpfs
) -> None:
    url = f"sqlite+aiosqlite:///{disk.path / 'usage.db'}"
    ok = make_reports(5_000, "room")

    async def run() -> None:
        inproc, child = Store.from_url(url), Store.from_url(url, flush_process=True)
        try:
            await inproc.upgrade()
            filler = disk.fill(leave=0)
            here = await _failure(inproc, 5_000, "full-a")
            there = await _failure(child, 5_000, "full-b")
            for exc in (here, there):
                assert classify(exc) is ErrorKind.UNAVAILABLE, describe_error(exc)
                assert _sqlite_names(exc) & {"SQLITE_FULL", "SQLITE_IOERR_WRITE"}, exc
            assert describe_error(there) == describe_error(here)
            filler.unlink()
            assert (await child.writer.write(ok)).inserted == 5_000
        finally:
            await inproc.close()
            await child.close()

    asyncio.run(run())
    check_database(url, ok)


def test_service_with_a_full_database_disk_retries_never_quarantines(
    tmp_path: Path, disk: Tmpfs
) -> None:
    db_url = f"sqlite+aiosqlite:///{disk.path / 'usage.db'}"
    service = Service(tmp_path / "svc", tmp_path / "data", db_url,
                      env={"LLM_USAGE_FLUSH_INTERVAL": "0.2"})  # fmt: skip
    service.start()
    try:
        service.wait_ready()
        filler = disk.fill(leave=0)
        sent = make_reports(3_000, "diskfull")
        for start in range(0, len(sent), 500):
            assert service.post(sent[start : start + 500])[0] == 202  # the WAL is elsewhere
        wait_for(lambda: total(service.metrics(), "llm_usage_flush_failures_total") >= 3, 60,
                 "three failed flushes")  # fmt: skip
        status, data, _ = http("GET", f"{service.url}/readyz")
        assert status == 503 and b"unavailable" in data, data
        metrics = service.metrics()
        assert total(metrics, "llm_usage_quarantined_reports_total") == 0
        assert value(metrics, "llm_usage_pending_reports") == len(sent)
        assert not (tmp_path / "data" / "quarantine").exists()
        filler.unlink()
        deadline = time.monotonic() + 60
        wait_for(lambda: value(service.metrics(), "llm_usage_pending_reports") == 0,
                 deadline - time.monotonic(), "the flush to recover")  # fmt: skip
    finally:
        assert service.stop() == 0
    assert "flush recovered" in service.logs()
    check_database(db_url, sent)
