"""Errors say whose fault they are: real errors from real Postgres and SQLite, classified.

Refused (the data: quarantine), unavailable (retry) or a bug (retry, count, alert) — never
"refused" from a builtin exception type.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import free_port
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store import Store, create_engine
from exporter.store.errors import (
    ErrorKind,
    RowRefused,
    classify,
    describe_error,
    is_schema_missing,
)
from exporter.store.rows import normalize


async def _error(engine: AsyncEngine, sql: str) -> BaseException:
    try:
        async with engine.begin() as conn:
            await conn.execute(text(sql))
    except Exception as exc:
        return exc
    raise AssertionError(f"{sql!r} did not fail")


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1e30::numeric(20, 10)", ErrorKind.REFUSED),  # 22003 numeric overflow
        ("SELECT 'x'::bigint", ErrorKind.REFUSED),  # 22P02 invalid text representation
        ("INSERT INTO t VALUES (1), (1)", ErrorKind.REFUSED),  # 23505 unique violation
        ("SELECT pg_sleep(2)", ErrorKind.UNAVAILABLE),  # 57014 statement timeout
        ("SELECT * FROM usage_details", ErrorKind.BUG),  # 42P01, never migrated
        ("SELEC 1", ErrorKind.BUG),  # 42601 syntax error: our bug
    ],
)
async def test_postgres_errors_are_classified_by_sqlstate(
    pg_url: str, sql: str, kind: ErrorKind
) -> None:
    engine = create_engine(pg_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id int PRIMARY KEY)"))
        async with engine.connect() as conn:
            await conn.execute(text("SET statement_timeout = 200"))
            try:
                await conn.execute(text(sql))
            except Exception as exc:
                assert classify(exc) is kind, describe_error(exc)
                assert is_schema_missing(exc) is ("usage_details" in sql)
            else:
                raise AssertionError(f"{sql!r} did not fail")
    finally:
        await engine.dispose()


async def test_an_unreachable_postgres_is_unavailable() -> None:
    store = Store.from_url(f"postgresql+asyncpg://u:secret@127.0.0.1:{free_port()}/db")
    try:
        with pytest.raises(Exception) as info:
            await store.writer.probe()
        assert classify(info.value) is ErrorKind.UNAVAILABLE
        assert "secret" not in describe_error(info.value)
    finally:
        await store.close()


async def test_sqlite_errors_are_classified(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    try:
        missing = await _error(engine, "SELECT * FROM usage_details")
        assert classify(missing) is ErrorKind.BUG and is_schema_missing(missing)
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))
        dup = await _error(engine, "INSERT INTO t VALUES (1, 'a'), (1, 'b')")
        assert classify(dup) is ErrorKind.REFUSED
        null = await _error(engine, "INSERT INTO t VALUES (2, NULL)")
        assert classify(null) is ErrorKind.REFUSED
        bug = await _error(engine, "SELEC 1")
        assert classify(bug) is ErrorKind.BUG and not is_schema_missing(bug)
        # a second connection holding the write lock: busy, i.e. unavailable
        other = create_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
        try:
            async with other.connect() as holder:
                await holder.exec_driver_sql("PRAGMA busy_timeout = 0")
                await holder.exec_driver_sql("INSERT INTO t VALUES (3, 'c')")  # in a txn
                async with engine.connect() as conn:
                    await conn.exec_driver_sql("PRAGMA busy_timeout = 0")
                    try:
                        await conn.exec_driver_sql("INSERT INTO t VALUES (4, 'd')")
                    except Exception as exc:
                        assert classify(exc) is ErrorKind.UNAVAILABLE, describe_error(exc)
                    else:
                        raise AssertionError("no lock conflict")
        finally:
            await other.dispose()
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "exc",
    [ValueError("x"), TypeError("x"), KeyError("x"), OverflowError("x"), AssertionError()],
)
def test_builtin_errors_are_bugs_never_refusals(exc: BaseException) -> None:
    assert classify(exc) is ErrorKind.BUG


def test_timeouts_and_os_errors_are_unavailable() -> None:
    assert classify(TimeoutError()) is ErrorKind.UNAVAILABLE
    assert classify(TimeoutError()) is ErrorKind.UNAVAILABLE
    assert classify(ConnectionRefusedError(111, "refused")) is ErrorKind.UNAVAILABLE


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_tokens", "many"),
        ("input_tokens", 2**64),
        ("input_tokens", True),
        ("completed_at", "yesterday"),
        ("completed_at", 1700000000),
        ("cost_usd", "NaN"),
        ("cost_usd", 1e12),
        ("duration_ms", "slow"),
    ],
)
def test_the_sqlite_preparer_refuses_what_no_backend_stores(field: str, value: object) -> None:
    with pytest.raises(RowRefused) as info:
        normalize({"request_id": "r", "model": "m", field: value}, datetime.now(UTC))
    assert info.value.field == field
    assert classify(info.value) is ErrorKind.REFUSED
