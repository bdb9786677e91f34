"""The SQLite flush in its own process (exporter/store/flush_process.py), with real processes
and real SQLite files: a child killed mid-write, a write abandoned after the write timeout,
refused data quarantined through the child, and errors classified exactly as in process.

Each test ends with the database compared to the distinct set of reports written
(tests/storecheck.py computes the expected rollups independently).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from storecheck import assert_stored_exactly, report

from exporter.config import Settings
from exporter.flusher import Flusher
from exporter.sched import BACKGROUND_NICE
from exporter.selfmetrics import SelfMetrics
from exporter.store import Store
from exporter.store.errors import ErrorKind, RowRefused, classify, describe_error, is_schema_missing
from exporter.store.flush_wire import FlushProcessDied, error_from_json, error_to_json
from exporter.wal import WriteAheadLog


def _url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def proc_store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store.from_url(_url(tmp_path / "db" / "usage.db"), flush_process=True)
    await s.upgrade()
    try:
        yield s
    finally:
        await s.close()


async def _wal(path: Path) -> WriteAheadLog:
    wal = WriteAheadLog(path, segment_bytes=8 << 20, max_bytes=1 << 30, durability="os")
    wal.open()
    wal.start()
    return wal


async def _append(wal: WriteAheadLog, reports: Sequence[Mapping[str, Any]]) -> None:
    await wal.append(orjson.dumps(list(reports)), len(reports))


def _settings(tmp_path: Path, max_reports: int) -> Settings:
    return Settings(data_dir=tmp_path, flush_interval=0.05, flush_max_reports=max_reports,
                    flush_max_backoff=0.2)  # fmt: skip


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _details(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT count(*) FROM usage_details").fetchone()
    return int(n)


async def test_sigkill_of_the_flush_process_mid_write_loses_and_doubles_nothing(
    proc_store: Store, tmp_path: Path
) -> None:
    db = tmp_path / "db" / "usage.db"
    wal = await _wal(tmp_path / "wal")
    metrics = SelfMetrics()
    flusher = Flusher(wal, proc_store.writer, metrics, _settings(tmp_path, 200_000))
    sent = [report(i) for i in range(60_000)]
    for start in range(0, len(sent), 1_000):
        await _append(wal, sent[start : start + 1_000])
    wal_file = db.with_name("usage.db-wal")
    before = wal_file.stat().st_size if wal_file.exists() else 0
    process = proc_store.writer.process
    assert process is not None and process.pid is None  # started on the first write
    try:
        flush = asyncio.ensure_future(flusher.flush_once())
        deadline = time.monotonic() + 60
        # mid-write: its transaction has spilled pages into the -wal file, none committed
        while not (wal_file.exists() and wal_file.stat().st_size > before + (4 << 20)):
            assert time.monotonic() < deadline and not flush.done(), "no write in progress"
            await asyncio.sleep(0.005)
        pid = process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(FlushProcessDied) as raised:
            await flush
        assert classify(raised.value) is ErrorKind.UNAVAILABLE
        assert "died mid-write" in str(raised.value) and "SIGKILL" in str(raised.value)
        assert not _alive(pid)
        assert metrics.flush_failures._value.get() == 1
        assert wal.pending_reports == len(sent)  # nothing dropped from the WAL
        assert _details(db) == 0  # the uncommitted transaction is gone
        problems = flusher.readiness_problems()
        assert problems == []  # one failure is not yet "unready"

        assert await flusher.flush_once() == len(sent)  # a new child
        assert process.starts == 2 and process.pid not in (None, pid)
        assert wal.pending_reports == 0
        await assert_stored_exactly(proc_store, sent)
        # a replay of everything (a crash after the commit) adds nothing
        result = await proc_store.writer.write(sent[:5_000])
        assert (result.received, result.inserted) == (5_000, 0)
        await assert_stored_exactly(proc_store, sent)
    finally:
        await wal.close()


async def test_an_abandoned_write_kills_the_flush_process_before_the_retry(
    proc_store: Store, tmp_path: Path
) -> None:
    """The database hangs (another connection holds the write lock): the attempt times out,
    the child that was waiting inside its transaction is dead and reaped when flush_once
    raises, so it cannot commit behind the retry's back."""
    db = tmp_path / "db" / "usage.db"
    wal = await _wal(tmp_path / "wal")
    metrics = SelfMetrics()
    flusher = Flusher(wal, proc_store.writer, metrics, _settings(tmp_path, 1_000),
                      write_timeout=1.5)  # fmt: skip
    process = proc_store.writer.process
    assert process is not None
    first = [report(i) for i in range(50)]
    assert (await proc_store.writer.write(first)).inserted == 50  # the child is up
    pid = process.pid
    assert pid is not None
    sent = [report(i) for i in range(50, 450)]
    await _append(wal, sent)
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, held
        with pytest.raises(TimeoutError):
            await flusher.flush_once()
        assert not _alive(pid), "the abandoned child must be gone before the retry"
        assert process.pid is None
        assert metrics.flush_failures._value.get() == 1
        assert wal.pending_reports == len(sent)
        blocker.execute("ROLLBACK")
        assert await flusher.flush_once() == len(sent)
        assert process.starts == 2
        await assert_stored_exactly(proc_store, first + sent)
    finally:
        blocker.close()
        await wal.close()


POISON_TRIGGER = (
    "CREATE TRIGGER poison BEFORE INSERT ON usage_details WHEN NEW.model = 'poison' "
    "BEGIN SELECT RAISE(ABORT, 'poison model refused'); END"
)


async def test_data_the_database_refuses_is_quarantined_through_the_flush_process(
    proc_store: Store, tmp_path: Path
) -> None:
    """A real SQLite refusal (a constraint trigger: SQLITE_CONSTRAINT_TRIGGER) and a row no
    backend stores (RowRefused) raised in the child: bisected and set aside, the rest
    stored, no flush failure."""
    async with proc_store.engine.begin() as conn:
        await conn.exec_driver_sql(POISON_TRIGGER)
    wal = await _wal(tmp_path / "wal")
    metrics = SelfMetrics()
    flusher = Flusher(wal, proc_store.writer, metrics, _settings(tmp_path, 1_000))
    good = [report(i) for i in range(300)]
    poison = dict(report(9001), model="poison")
    unstorable = dict(report(9002), input_tokens="many")
    del unstorable["total_tokens"]
    await _append(wal, good[:100])
    await _append(wal, [*good[100:150], poison, *good[150:200]])
    await _append(wal, [*good[200:250], unstorable, *good[250:]])
    try:
        assert await flusher.flush_once() == 302
        await assert_stored_exactly(proc_store, good)
        refused = [
            orjson.loads(line)
            for f in sorted((tmp_path / "quarantine").glob("*.ndjson"))
            for line in f.read_bytes().splitlines()
        ]
        assert sorted(r["report"]["request_id"] for r in refused) == ["req-9001", "req-9002"]
        assert metrics.quarantined._value.get() == 2
        assert metrics.flush_failures._value.get() == 0
        assert metrics.flushed._value.get() == 300
    finally:
        await wal.close()


def _seen(exc: BaseException) -> tuple[ErrorKind, bool, str]:
    return classify(exc), is_schema_missing(exc), describe_error(exc)


async def _failure(store: Store, reports: Sequence[Mapping[str, Any]]) -> BaseException:
    try:
        await store.writer.write(reports)
    except Exception as exc:
        return exc
    raise AssertionError("the write did not fail")


@pytest.mark.parametrize("case", ["schema_missing", "trigger", "unstorable"])
async def test_errors_from_the_flush_process_are_classified_as_in_process(
    tmp_path: Path, case: str
) -> None:
    url = _url(tmp_path / "usage.db")
    inproc, child = Store.from_url(url), Store.from_url(url, flush_process=True)
    try:
        batch = [report(i) for i in range(20)]
        if case != "schema_missing":
            await inproc.upgrade()
        if case == "trigger":
            async with inproc.engine.begin() as conn:
                await conn.exec_driver_sql(POISON_TRIGGER)
            batch.append(dict(report(99), model="poison"))
        if case == "unstorable":
            bad = dict(report(99), input_tokens="many")
            del bad["total_tokens"]
            batch.append(bad)
        here, there = await _failure(inproc, batch), await _failure(child, batch)
        assert _seen(there) == _seen(here)
        assert type(there) is type(here)
        expected = {
            "schema_missing": (ErrorKind.BUG, True),
            "trigger": (ErrorKind.REFUSED, False),
            "unstorable": (ErrorKind.REFUSED, False),
        }[case]
        assert _seen(there)[:2] == expected
        if case == "trigger":
            assert getattr(there, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_TRIGGER"
            assert getattr(there, "sqlite_errorcode", None) == sqlite3.SQLITE_CONSTRAINT_TRIGGER
    finally:
        await inproc.close()
        await child.close()


def _sqlite_error(sql: str, path: Path) -> sqlite3.Error:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql)
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError(sql)


def test_the_wire_keeps_what_classify_and_describe_read(tmp_path: Path) -> None:
    """Round trip of each kind of error the child can raise, and of the wrappers a cause
    chain may hold: same class (or a named bug), same attributes, same verdicts."""
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode, locked.sqlite_errorname = 5, "SQLITE_BUSY"  # type: ignore[attr-defined]
    wrapped = RuntimeError("while flushing")
    wrapped.__cause__ = locked
    cases: list[BaseException] = [
        _sqlite_error("SELECT * FROM nowhere", tmp_path / "x.db"),
        _sqlite_error("SELEC 1", tmp_path / "x.db"),
        locked,
        wrapped,
        RowRefused("cost_usd", "not a number"),
        OSError(28, "No space left on device"),
        TimeoutError("slow"),
        KeyError("usage_details"),
        ValueError("invalid literal"),
        OverflowError("Python int too large to convert to SQLite INTEGER"),
    ]
    for exc in cases:
        back = error_from_json(orjson.loads(orjson.dumps(error_to_json(exc))))
        assert type(back) is type(exc)
        assert _seen(back) == _seen(exc), exc
        for attr in ("sqlite_errorcode", "sqlite_errorname"):
            assert getattr(back, attr, None) == getattr(exc, attr, None)
    kinds = [classify(e) for e in cases]
    assert kinds == [ErrorKind.BUG, ErrorKind.BUG, ErrorKind.UNAVAILABLE, ErrorKind.UNAVAILABLE,
                     ErrorKind.REFUSED, ErrorKind.UNAVAILABLE, ErrorKind.UNAVAILABLE,
                     *[ErrorKind.BUG] * 3]  # fmt: skip


async def test_the_flush_process_runs_as_background_work(proc_store: Store) -> None:
    """SCHED_BATCH and a lower CPU share than the serving process: its CPU yields to ingest."""
    await proc_store.writer.write([report(0)])
    process = proc_store.writer.process
    assert process is not None and process.pid is not None
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    nice, policy = int(fields[16]), int(fields[38])  # stat fields 19 and 41
    assert policy == os.SCHED_BATCH
    assert nice == os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICE
