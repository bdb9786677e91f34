"""SQL pieces the read queries share across the two backends, and the time bound on reads.

Every read runs inside `bounded()`: Postgres gets a `statement_timeout` for the transaction;
SQLite, which has none, is interrupted by a timer. Either way the caller sees `ReadTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.money import COST_QUANTUM, COST_SCALE, UNITS_PER_USD, from_units

__all__ = [
    "DIMENSIONS",
    "TAG_KEY",
    "ReadError",
    "ReadTimeout",
    "ReadUnavailable",
    "Sql",
    "bounded",
    "cost_from_sum",
]

#: Rollup and audit-row columns a read may group or filter by (besides `tag:<key>`).
DIMENSIONS = ("model", "user", "team", "operation", "provider", "api_key_id", "node")
#: What a promoted tag key may look like (it ends up inside a JSON path).
TAG_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ReadError(Exception):
    """A read that could not be answered now (HTTP 503); bugs are not ReadErrors."""


class ReadTimeout(ReadError):
    """A read query ran past its time bound."""


class ReadUnavailable(ReadError):
    """The database is unreachable or its schema is not migrated yet."""


#: Postgres SQLSTATEs that mean "not now": undefined table (not migrated), shutdown, no
#: connection, too many connections.
_UNAVAILABLE_STATES = ("42P01", "57P01", "57P02", "57P03", "53300")
_UNAVAILABLE_CLASSES = ("08",)


def _classify(exc: BaseException, seconds: float) -> ReadError | None:
    text = str(exc).lower()
    if "statement timeout" in text or "interrupted" in text:
        return ReadTimeout(f"query ran longer than {seconds:g}s")
    if isinstance(exc, OSError):
        return ReadUnavailable("database unreachable")
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        state = str(getattr(orig, "sqlstate", "") or "")
        if (
            exc.connection_invalidated
            or isinstance(orig, OSError)
            or state in _UNAVAILABLE_STATES
            or state[:2] in _UNAVAILABLE_CLASSES
            or "no such table" in text
            or "database is locked" in text
        ):
            return ReadUnavailable("database unavailable or not migrated yet")
    return None


@contextlib.asynccontextmanager
async def bounded(engine: AsyncEngine, seconds: float) -> AsyncIterator[AsyncConnection]:
    """A read-only connection whose statements are cancelled after `seconds`; database
    errors that mean "not now" come out as ReadError."""
    timer: asyncio.TimerHandle | None = None
    try:
        async with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                # JIT compiling costs more than these short aggregates take (~15 ms each)
                ms = max(1, int(seconds * 1000))
                await conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
                await conn.exec_driver_sql("SET LOCAL jit = off")
                # group-bys of a month of day rollups hash in memory instead of sorting on disk
                await conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
            else:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                loop = asyncio.get_running_loop()
                timer = loop.call_later(seconds, lambda: loop.create_task(driver.interrupt()))
            try:
                yield conn
            finally:
                if timer is not None:
                    timer.cancel()
                await conn.rollback()
    except (DBAPIError, OSError) as exc:
        mapped = _classify(exc, seconds)
        if mapped is None:
            raise
        raise mapped from None


class Sql:
    """Dialect-specific fragments, with bound parameters collected as they are made."""

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        self.params: dict[str, Any] = {}

    def bind(self, value: Any) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    def ts(self, dt: datetime) -> str:
        """A timestamp literal comparable with stored UTC timestamps."""
        dt = dt.astimezone(UTC)
        if self.pg:
            return f"CAST({self.bind(dt)} AS timestamptz)"
        return self.bind(sqlite_ts(dt))

    def tag(self, column: str, key: str) -> str:
        """The value of tag `key` in a JSON text column ('' when absent)."""
        if not TAG_KEY.match(key):
            raise ValueError(f"bad tag key {key!r}")
        if self.pg:
            return f"coalesce(CAST({column} AS jsonb) ->> {self.bind(key)}, '')"
        path = '$."' + key + '"'
        return f"coalesce(json_extract({column}, {self.bind(path)}), '')"

    def cost_sum(self, column: str) -> str:
        """An exact SUM of a cost column: NUMERIC in Postgres; in SQLite the exact decimal
        text summed as integer units of 1e-10 USD (its own SUM would go through floats)."""
        if self.pg:
            return f"coalesce(sum({column}), 0)"
        c = column
        dot = f"instr({c} || '.', '.')"
        sign = f"(CASE WHEN substr({c}, 1, 1) = '-' THEN -1 ELSE 1 END)"
        whole = f"abs(CAST(substr({c}, 1, {dot} - 1) AS INTEGER)) * {UNITS_PER_USD}"
        zeros = "0" * COST_SCALE
        frac = f"CAST(substr(substr({c}, {dot} + 1) || '{zeros}', 1, {COST_SCALE}) AS INTEGER)"
        return f"coalesce(sum({sign} * ({whole} + {frac})), 0)"

    def json_rows(self, name: str, rows: Sequence[dict[str, Any]], cols: dict[str, str]) -> str:
        """A FROM item over rows passed as one JSON parameter (no per-row bound variables).

        `cols` maps column → 'int' | 'text' | 'ts'.
        """
        payload = orjson.dumps(
            [
                {k: (self._ts_value(v) if cols[k] == "ts" else v) for k, v in row.items()}
                for row in rows
            ]
        ).decode()
        p = self.bind(payload)
        if self.pg:
            types = {"int": "bigint", "text": "text", "ts": "timestamptz"}
            spec = ", ".join(f"{k} {types[t]}" for k, t in cols.items())
            return f"json_to_recordset(CAST({p} AS json)) AS {name}({spec})"
        picks = ", ".join(f"json_extract(value, '$.{k}') AS {k}" for k in cols)
        return f"(SELECT {picks} FROM json_each({p})) AS {name}"  # noqa: S608

    def range_join(self, outer: str, table: str, alias: str, cond: str) -> str:
        """`JOIN table AS alias` on a condition over the rows of `outer` (a JSON row set).

        Postgres would hash-join the whole table against the few outer rows, reading every
        rollup ever written; a LATERAL subquery fenced by OFFSET 0 makes it run one index
        range scan per outer row. SQLite's planner loops over the small outer set already.
        """
        if self.pg:
            return (
                f"CROSS JOIN LATERAL (SELECT * FROM {table} AS {alias} WHERE {cond} OFFSET 0) "  # noqa: S608
                f"AS {alias}"
            )
        return f"JOIN {table} AS {alias} ON {cond}"

    def _ts_value(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat() if self.pg else sqlite_ts(value)


def sqlite_ts(dt: datetime) -> str:
    """How SQLite stores a UTC timestamp (exporter.store.tables.UTCDateTime), to compare."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{dt.microsecond:06d}"


def cost_from_sum(value: Any, pg: bool) -> Decimal:
    """The Decimal of what `Sql.cost_sum` returned."""
    if value is None:
        return Decimal(0).quantize(COST_QUANTUM)
    if pg:
        return Decimal(value).quantize(COST_QUANTUM)
    return from_units(int(value))
