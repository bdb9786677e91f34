"""The report's columns, detail rows and rollup deltas, all by name and from one source.

`DETAIL_COLUMNS` is `usage_details`' columns minus the server-managed ones; `UsageReport`'s
fields must be the same set (tests/test_store_fields.py checks it). Each column's *kind* comes
from its SQL type, and the kind decides how an absent value defaults and how a value is
checked, so adding a field is one column in `tables.py` (plus a migration) and one field on
`UsageReport`. The Postgres statement (`write_postgres`) and the SQLite path (`write_sqlite`)
both read the defaults from here.

Rollup sums are `ROLLUP_SPECS`, one entry per sum column of `usage_rollups`: the Postgres
aggregate and the per-row contribution Python adds for SQLite.
"""

from __future__ import annotations

import logging
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from operator import add, attrgetter, itemgetter
from typing import Any

import orjson
from sqlalchemy import JSON, BigInteger, Boolean, Column, Double, Integer, Text

from exporter.money import exact_decimal, to_money
from exporter.store.dims import dims_sql, dims_text
from exporter.store.errors import RowRefused
from exporter.store.rollup_sums import ROLLUP_SPECS, RollupSum
from exporter.store.tables import (
    COST_QUANTUM,
    ROLLUP_KEY,
    ROLLUP_SUMS,
    Money,
    UTCDateTime,
    usage_details,
)
from exporter.timeutil import as_utc

__all__ = [
    "DERIVED_KEY",
    "DETAIL_COLUMNS",
    "DIMENSIONS",
    "ROLLUP_COLUMNS",
    "ROLLUP_SPECS",
    "Batch",
    "DetailRow",
    "Kind",
    "RollupRow",
    "RollupSum",
    "aggregate",
    "clean_text",
    "kind_of",
    "normalize",
]

log = logging.getLogger(__name__)

#: Columns the database fills itself; never part of a report.
SERVER_COLUMNS = frozenset({"inserted_at"})
DETAIL_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in usage_details.columns if c.name not in SERVER_COLUMNS
)
ROLLUP_COLUMNS: tuple[str, ...] = ROLLUP_KEY + ROLLUP_SUMS
#: Rollup key parts computed from a report rather than copied from a detail column: `dims`,
#: the canonical JSON of the promoted tags (exporter.store.dims): the Postgres expression
#: without promoted tags, and the Python value of (row, promoted keys).
DERIVED_KEY: Mapping[str, tuple[str, Callable[[Any, Sequence[str]], str]]] = {
    "dims": (dims_sql(()), lambda row, keys: dims_text(row.tags, keys)),
}
#: Rollup key parts that are detail columns of the same name (all but granularity, bucket).
DIMENSIONS: tuple[str, ...] = tuple(c for c in ROLLUP_KEY[2:] if c not in DERIVED_KEY)
#: Text columns whose absent or empty value is not ''.
EMPTY_TEXT_DEFAULTS: Mapping[str, str] = {"operation": "other", "status": "success"}
#: Largest integer both backends store (BIGINT / SQLite INTEGER).
INT64_MAX = 2**63 - 1
#: NUMERIC(20,10): at most 10 digits before the point.
COST_LIMIT = Decimal(10) ** (20 - 10)

# Detail rows and rollup rows are named tuples (fields from the tables), so every access is by
# name; they stay plain tuples in column order for the SQL parameters.
# (mypy cannot type fields known only at import: rows are `Any` to it.)
_named: Any = namedtuple
DetailRow: Any = _named("DetailRow", DETAIL_COLUMNS)
RollupRow: Any = _named("RollupRow", ROLLUP_COLUMNS)
_ZERO = Decimal(0).quantize(COST_QUANTUM)


class Kind(Enum):
    """How a detail column's values are checked and defaulted (from its SQL type)."""

    TEXT = "text"
    COUNT = "count"  # a NOT NULL integer defaulting to 0
    INT = "int"  # a nullable integer
    BOOL = "bool"
    MONEY = "money"
    TIME = "time"
    FLOAT = "float"
    JSON = "json"


def kind_of(column: Column[Any]) -> Kind:
    t = column.type
    if isinstance(t, Money):
        return Kind.MONEY
    if isinstance(t, UTCDateTime):
        return Kind.TIME
    if isinstance(t, Boolean):
        return Kind.BOOL
    if isinstance(t, BigInteger | Integer):
        return Kind.INT if column.nullable else Kind.COUNT
    if isinstance(t, Double):
        return Kind.FLOAT
    if isinstance(t, Text):
        return Kind.TEXT
    if isinstance(t, JSON):
        return Kind.JSON
    raise TypeError(f"usage_details.{column.name}: no row rule for {t!r}")


KINDS: Mapping[str, Kind] = {c: kind_of(usage_details.c[c]) for c in DETAIL_COLUMNS}


def bool_default(name: str) -> bool:
    """A boolean column's server default ('true'/'false'), False without one."""
    default = usage_details.c[name].server_default
    arg = getattr(default, "arg", None)
    return str(getattr(arg, "text", arg)).strip().lower() == "true"


# -- value rules (SQLite path; the Postgres statement applies the same defaults in SQL) -------


def clean_text(value: str) -> str:
    """Postgres text cannot hold NUL; both backends store U+FFFD instead."""
    return value.replace("\x00", "\ufffd")


def _text(name: str, value: Any) -> str:
    if not value:
        return EMPTY_TEXT_DEFAULTS.get(name, "")
    if not isinstance(value, str):
        value = str(value)
    return clean_text(value) if "\x00" in value else value


def _int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowRefused(name, f"not an integer: {type(value).__name__}")
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise RowRefused(name, "integer out of the 64-bit range")
    return value


def _float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowRefused(name, f"not a number: {type(value).__name__}")
    return float(value)


def _time(name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise RowRefused(name, "not an RFC 3339 timestamp") from None
    if not isinstance(value, datetime):
        raise RowRefused(name, f"not a timestamp: {type(value).__name__}")
    return as_utc(value)


def _money(name: str, value: Any) -> Decimal | None:
    """Exact cost by the one rule (exporter.money): WAL records carry it as decimal text,
    already rounded by validation; anything else is rounded half-even at 1e-10 here."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise RowRefused(name, f"not a number: {type(value).__name__}")
    try:
        dec = exact_decimal(value)
    except ValueError:
        raise RowRefused(name, "not a decimal number") from None
    if not dec.is_finite() or abs(dec) >= COST_LIMIT:
        raise RowRefused(name, "outside NUMERIC(20,10)")
    return to_money(dec)


def _json(name: str, value: Any) -> Any:
    if value is None or isinstance(value, dict | list):
        return value
    raise RowRefused(name, f"not a JSON object or array: {type(value).__name__}")


_DEFAULTS: Mapping[str, Any] = {
    **{c: EMPTY_TEXT_DEFAULTS.get(c, "") for c in DETAIL_COLUMNS if KINDS[c] is Kind.TEXT},
    **{c: 0 for c in DETAIL_COLUMNS if KINDS[c] is Kind.COUNT},
    **{c: bool_default(c) for c in DETAIL_COLUMNS if KINDS[c] is Kind.BOOL},
    "total_tokens": None,  # derived below
    "completed_at": None,  # `now` below
}
_AT = {c: i for i, c in enumerate(DETAIL_COLUMNS)}


def _plan(*kinds: Kind) -> tuple[tuple[int, str, Any], ...]:
    """(position, column, default) of the columns of these kinds."""
    return tuple((_AT[c], c, _DEFAULTS.get(c)) for c in DETAIL_COLUMNS if KINDS[c] in kinds)


# normalize() runs per report on the SQLite flush: one tight loop per kind.
_TEXTS = _plan(Kind.TEXT)
_INTS = _plan(Kind.COUNT, Kind.INT)
_BOOLS = _plan(Kind.BOOL)
_RULES: Mapping[Kind, Callable[[str, Any], Any]] = {
    Kind.FLOAT: _float,
    Kind.MONEY: _money,
    Kind.TIME: _time,
    Kind.JSON: _json,
}
_OTHERS = tuple((i, c, d, _RULES[KINDS[c]]) for i, c, d in _plan(*_RULES))
_EMPTY_ROW: list[Any] = [None] * len(DETAIL_COLUMNS)


def normalize(report: Mapping[str, Any], now: datetime) -> Any:
    """One report dict (UsageReport fields) → a DetailRow; None without a request_id.

    Absent values take the column's default (`completed_at` defaults to `now`; ingest
    normally sets it to the receive time). A value no backend can store raises RowRefused.
    """
    if not isinstance(report, Mapping):
        raise RowRefused("", f"a report is a JSON object, not {type(report).__name__}")
    g = report.get
    out = list(_EMPTY_ROW)
    for i, name, default in _TEXTS:
        v = g(name)
        if not v:
            v = default
        elif v.__class__ is not str:
            v = str(v)
        out[i] = clean_text(v) if "\x00" in v else v
    if not out[_AT["request_id"]]:
        return None
    for i, name, default in _INTS:
        v = g(name)
        if v is None:
            out[i] = default
        elif v.__class__ is int and -INT64_MAX <= v <= INT64_MAX:
            out[i] = v
        else:
            out[i] = _int(name, v)
    for i, name, default in _BOOLS:
        v = g(name)
        out[i] = default if v is None else bool(v)
    for i, name, default, rule in _OTHERS:
        v = g(name)
        out[i] = default if v is None else rule(name, v)
    if out[_AT["total_tokens"]] is None:
        out[_AT["total_tokens"]] = out[_AT["input_tokens"]] + out[_AT["output_tokens"]]
    if out[_AT["completed_at"]] is None:
        out[_AT["completed_at"]] = now
    return DetailRow._make(out)


class Batch:
    """Detail rows of one SQLite flush, de-duplicated by request_id (first wins).

    Fed record by record, so a flush holds one record's decoded JSON dicts at a time.
    """

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)
        self.received = 0
        self._rows: dict[str, Any] = {}

    def add(self, report: Mapping[str, Any]) -> None:
        self.received += 1
        rid = report.get("request_id") if isinstance(report, Mapping) else None
        if isinstance(rid, str) and rid in self._rows:
            return
        row = normalize(report, self.now)
        if row is None:
            log.warning("skipping a report without request_id")
            return
        self._rows.setdefault(row.request_id, row)

    def add_payload(self, payload: bytes) -> None:
        """One WAL record: an orjson-encoded JSON array of report dicts."""
        try:
            reports = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise RowRefused("", "a WAL record that is not JSON") from None
        if not isinstance(reports, list):
            raise RowRefused("", "a WAL record that is not a JSON array")
        for report in reports:
            self.add(report)

    def __len__(self) -> int:
        return len(self._rows)

    def sorted_rows(self) -> list[Any]:
        """DetailRows in request_id order (the lock order every replica uses)."""
        return sorted(self._rows.values(), key=attrgetter("request_id"))


# -- rollups -----------------------------------------------------------------------------------


_SPECS = tuple(ROLLUP_SPECS[c] for c in ROLLUP_SUMS if c in ROLLUP_SPECS)
# Plain column sums are read with one attrgetter and added with one map(); the rest call `of`.
_PLAIN = tuple(s for s in _SPECS if s.of is None)
_CALLS = tuple(s for s in _SPECS if s.of is not None)
_ORDER = tuple(s.column for s in _PLAIN + _CALLS)
_plain = attrgetter(*(s.reads[0] for s in _PLAIN))
_calls = tuple((i, s.of) for i, s in enumerate(_CALLS, len(_PLAIN)) if s.of is not None)
_zeros = [s.zero for s in _PLAIN + _CALLS]
_n_plain = len(_PLAIN)
_in_table_order = itemgetter(*(_ORDER.index(c) for c in ROLLUP_SUMS))
_dimensions = attrgetter(*DIMENSIONS)
_DERIVED = tuple(DERIVED_KEY[c] for c in ROLLUP_KEY if c in DERIVED_KEY)


def aggregate(rows: Iterable[Any], dims_keys: Sequence[str] = ()) -> list[Any]:
    """Hour and day rollup deltas (RollupRows) of DetailRows, sorted by the rollup key;
    `dims_keys`: the promoted tags (exporter.store.dims.dims_keys)."""
    hours: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        key = (
            r.completed_at.replace(minute=0, second=0, microsecond=0),
            *_dimensions(r),
            *(value(r, dims_keys) for _sql, value in _DERIVED),
        )
        acc = hours.get(key)
        if acc is None:
            acc = hours[key] = list(_zeros)
        acc[:_n_plain] = map(add, acc, _plain(r))
        for i, of in _calls:
            acc[i] += of(r)
    days: dict[tuple[Any, ...], list[Any]] = {}
    for (bucket, *parts), acc in hours.items():
        key = (bucket.replace(hour=0), *parts)
        day = days.get(key)
        if day is None:
            days[key] = list(acc)
        else:
            day[:] = map(add, day, acc)
    out = []
    for granularity, table in (("hour", hours), ("day", days)):
        for key, acc in table.items():
            out.append(RollupRow._make((granularity, *key, *_in_table_order(acc))))
    out.sort(key=attrgetter(*ROLLUP_KEY))
    return out
