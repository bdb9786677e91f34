"""Whose fault a storage error is, and how to describe it without leaking secrets.

Three kinds, after asyncpg's SQLSTATE classes:

- `REFUSED`: the database refuses the *data* (SQLSTATE class 22 data exception or 23
  integrity; SQLite's constraint/mismatch/too-big codes; or `RowRefused`, raised by the
  row preparer for a value neither backend can store). Retrying cannot help: the flusher sets
  those reports aside (quarantine).
- `UNAVAILABLE`: the database is unreachable, overloaded, restarting, locked or slow
  (connection errors, timeouts, SQLSTATE 08/53/57/40/55P03). Retry with backoff.
- `BUG`: everything else, including every builtin ValueError/TypeError/KeyError raised by our
  own code and a missing schema. Never quarantined: the WAL is kept, the flush is retried,
  counted as a failure and alerted on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import Enum

from sqlalchemy import exc as sa_exc

from exporter.redact import PASSWORD_IN_URL

__all__ = [
    "ErrorKind",
    "RowRefused",
    "classify",
    "describe_error",
    "is_schema_missing",
    "redact_text",
]


class ErrorKind(Enum):
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"
    BUG = "bug"


class RowRefused(Exception):
    """A report value that no backend can store (the row preparer's SQLSTATE 22)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


_REFUSED_CLASSES = ("22", "23")
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58", "40")
_UNAVAILABLE_STATES = frozenset({"55P03", "55006", "HV00N"})
_SCHEMA_STATES = frozenset({"42P01", "42703", "42704", "3F000"})  # table, column, type, schema
_SQLITE_REFUSED = ("SQLITE_CONSTRAINT", "SQLITE_MISMATCH", "SQLITE_TOOBIG")
_SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL",
                       "SQLITE_CANTOPEN", "SQLITE_PROTOCOL", "SQLITE_READONLY")  # fmt: skip
_UNAVAILABLE_TYPES = (OSError, TimeoutError, sa_exc.DisconnectionError, sa_exc.TimeoutError)
_SQLITE_SCHEMA = re.compile(r"no such (table|column)")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error, what SQLAlchemy wraps (`.orig`) and the causes, without loops."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        orig = getattr(err, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, err.__cause__]


def _sqlstate(err: BaseException) -> str | None:
    state = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
    return state if isinstance(state, str) and len(state) == 5 else None


def classify(exc: BaseException) -> ErrorKind:
    """REFUSED, UNAVAILABLE or BUG (see the module docstring); never from builtin types."""
    kinds: list[ErrorKind] = []
    for err in _chain(exc):
        if isinstance(err, RowRefused):
            return ErrorKind.REFUSED
        state = _sqlstate(err)
        if state is not None:
            if state[:2] in _REFUSED_CLASSES:
                return ErrorKind.REFUSED
            if state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES:
                kinds.append(ErrorKind.UNAVAILABLE)
            continue
        name = getattr(err, "sqlite_errorname", None)
        if isinstance(name, str):
            if name.startswith(_SQLITE_REFUSED):
                return ErrorKind.REFUSED
            if name.startswith(_SQLITE_UNAVAILABLE):
                kinds.append(ErrorKind.UNAVAILABLE)
            continue
        if isinstance(err, _UNAVAILABLE_TYPES) or (
            isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated
        ):
            kinds.append(ErrorKind.UNAVAILABLE)
    return ErrorKind.UNAVAILABLE if kinds else ErrorKind.BUG


def is_schema_missing(exc: BaseException) -> bool:
    """The tables (or a column) are missing: the database was never migrated (`db upgrade`)."""
    for err in _chain(exc):
        state = _sqlstate(err)
        if state in _SCHEMA_STATES:
            return True
        if getattr(err, "sqlite_errorname", None) == "SQLITE_ERROR" and _SQLITE_SCHEMA.search(
            str(err)
        ):
            return True
    return False


def redact_text(message: str) -> str:
    """Hide anything that looks like a password inside a URL in free text."""
    return PASSWORD_IN_URL.sub(r"\g<pre>***@", message)


def describe_error(exc: BaseException, limit: int = 500) -> str:
    """Error class and message for logs: driver message only, no SQL/parameters/passwords."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps driver errors with the SQL text
    err = orig if isinstance(orig, BaseException) else exc
    message = " ".join(str(err).split())
    if len(message) > limit:
        message = message[:limit] + "…"
    module = type(err).__module__
    name = type(err).__qualname__ if module == "builtins" else f"{module}.{type(err).__qualname__}"
    return redact_text(f"{name}: {message}")
