"""Engines for the two backends, tuned so the flush protocol holds on each.

Postgres through asyncpg is the production backend. SQLite through aiosqlite is the embedded
default: WAL journal mode (readers never block the flusher), a busy timeout instead of instant
"database is locked", synchronous=FULL (a committed flush must survive power loss, since the
WAL segment is deleted right after), and an exact `dec_add` SQL function for costs.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from exporter.sched import idle_thread
from exporter.store.errors import redact_text as redact_text  # re-exported (app, migrate)

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10.0


class UnsupportedDatabase(ValueError):
    """The URL names a backend we don't run on."""


def backend_name(url: str | URL) -> str:
    """'postgresql' or 'sqlite' (raises for anything else)."""
    u = make_url(url)
    name = u.get_backend_name()
    if name == "postgresql" and u.get_driver_name() == "asyncpg":
        return name
    if name == "sqlite" and u.get_driver_name() == "aiosqlite":
        return name
    raise UnsupportedDatabase(
        f"unsupported database URL {redact_url(url)!r}: use postgresql+asyncpg://… "
        "or sqlite+aiosqlite:///path"
    )


def redact_url(url: str | URL) -> str:
    """The URL without its password, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: fall back to a regex
        return redact_text(str(url))


def _dec_add(a: Any, b: Any) -> str | None:
    """Exact decimal addition for SQLite, whose own arithmetic on NUMERIC is binary float."""
    if a is None:
        return None if b is None else str(b)
    if b is None:
        return str(a)
    try:
        return format(Decimal(str(a)) + Decimal(str(b)), "f")
    except InvalidOperation:
        return None


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    configure_sqlite(dbapi_connection)


def _sqlite_on_connect_idle(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    """aiosqlite runs each connection on its own thread, and a registered function runs on
    that thread: make it SCHED_IDLE (`sched.idle_thread`)."""
    configure_sqlite(dbapi_connection)
    dbapi_connection.create_function("exporter_idle_thread", 0, _idle_thread)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT exporter_idle_thread()")
    finally:
        cursor.close()


def _idle_thread() -> int:
    idle_thread()
    return 0


def configure_sqlite(dbapi_connection: Any) -> None:
    """The pragmas and functions of every SQLite connection we open (the engine's, and the
    flush process's own sqlite3 connection: exporter/store/flush_child.py)."""
    # Let SQLAlchemy's "begin" hook emit BEGIN itself (pysqlite's implicit transactions are
    # broken for DDL and for SAVEPOINT); documented recipe for aiosqlite.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()
    dbapi_connection.create_function("dec_add", 2, _dec_add, deterministic=True)


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def create_engine(
    url: str | URL, *, pool_size: int = 5, echo: bool = False, idle: bool = False
) -> AsyncEngine:
    """An AsyncEngine for postgresql+asyncpg or sqlite+aiosqlite (its directory is created).
    `idle`: SQLite's connection threads run SCHED_IDLE (background reads; no-op on Postgres,
    whose work runs in its own processes)."""
    u = make_url(url)
    backend = backend_name(u)
    if backend == "sqlite":
        database = u.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            raise UnsupportedDatabase("SQLite needs a file path (sqlite+aiosqlite:///path/db)")
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            u, echo=echo, pool_size=pool_size, max_overflow=2, pool_pre_ping=True
        )
        on_connect = _sqlite_on_connect_idle if idle else _sqlite_on_connect
        event.listen(engine.sync_engine, "connect", on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    return create_async_engine(
        u,
        echo=echo,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"timeout": PG_CONNECT_TIMEOUT_S},
    )


async def ping(engine: AsyncEngine, within: float = 2.0) -> bool:
    """True if the database answers a trivial query within `within` seconds (for /readyz)."""
    try:
        async with asyncio.timeout(within), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:
        log.debug("db ping failed: %s", redact_text(f"{type(exc).__name__}: {exc}"))
        return False
    return True
