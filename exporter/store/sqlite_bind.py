"""WAL record payloads → SQLite parameter tuples of `usage_details`, in one pass per report.

The SQLite flush's per-report Python, kept to a few C-level calls for the shape ingest writes
(every field present, each with its exact JSON type, canonical cost and UTC timestamp text):
one `itemgetter` for the values, one `map(type, …)` to look up a per-type-signature plan, the
int range check, the two timestamps rewritten as text, the tags dumped. Anything else (a
missing field, a coercion, a NUL, a non-canonical cost or timestamp, an out-of-range integer)
goes through `rows.normalize` and its binders, the one set of value rules; the fast path must
give exactly the tuple the slow path gives (tests/test_sqlite_bind.py checks it on varied
reports), so it is an optimisation, never a second rulebook.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

import orjson

from exporter.store.errors import RowRefused
from exporter.store.rows import DETAIL_COLUMNS, INT64_MAX, KINDS, Kind, normalize
from exporter.store.tables import decimal_text

__all__ = ["BIND", "bind_row", "prepare_params", "sqlite_timestamp"]

log = logging.getLogger(__name__)


def sqlite_timestamp(dt: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text for a UTC datetime (so ORM reads parse it back)."""
    if dt is None:
        return None
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} "
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond:06d}"
    )


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _money_text(value: Any) -> str | None:
    return None if value is None else decimal_text(value)


#: how a DetailRow value of each kind becomes a value SQLite binds (others bind as they are)
BIND: Mapping[Kind, Callable[[Any], Any]] = {
    Kind.TIME: sqlite_timestamp,
    Kind.MONEY: _money_text,
    Kind.JSON: _json_text,
}
_DETAIL_BIND = tuple((i, BIND[KINDS[c]]) for i, c in enumerate(DETAIL_COLUMNS) if KINDS[c] in BIND)


def bind_row(row: Any) -> tuple[Any, ...]:
    """A DetailRow (rows.normalize) as the tuple SQLite binds."""
    values = list(row)
    for i, bind in _DETAIL_BIND:
        values[i] = bind(values[i])
    return tuple(values)


# -- the fast path -----------------------------------------------------------------------------
_AT = {c: i for i, c in enumerate(DETAIL_COLUMNS)}
_RID = _AT["request_id"]
_values = itemgetter(*DETAIL_COLUMNS)
#: orjson's text of an aware UTC datetime, with or without microseconds
_UTC_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?\+00:00")
#: money_text of a non-negative cost at the store's scale (what json_default writes)
_MONEY_TEXT = re.compile(r"(0|[1-9][0-9]{0,9})\.[0-9]{10}")
#: columns whose empty value normalize replaces (request_id: the row is skipped)
_NON_EMPTY = tuple(
    _AT[c] for c in DETAIL_COLUMNS if c == "request_id" or c in ("operation", "status")
)
#: kinds whose None the slow path keeps as None (but completed_at and total_tokens: below)
_NULL_OK = frozenset({Kind.INT, Kind.FLOAT, Kind.MONEY, Kind.JSON, Kind.TIME})
_NULL_NOT_OK = frozenset({_AT["completed_at"], _AT["total_tokens"]})


class _Plan:
    """What one type signature of a report's values needs beyond copying them."""

    __slots__ = ("floats", "ints", "jsons", "money", "times")

    def __init__(self, types: Sequence[type]) -> None:
        ints: list[int] = []
        self.floats: list[int] = []
        self.times: list[int] = []
        self.money: list[int] = []
        self.jsons: list[int] = []
        for i, (column, t) in enumerate(zip(DETAIL_COLUMNS, types, strict=True)):
            kind = KINDS[column]
            if t is type(None):
                if kind not in _NULL_OK or i in _NULL_NOT_OK:
                    raise LookupError(column)
            elif kind is Kind.TEXT:
                if t is not str:
                    raise LookupError(column)
            elif kind in (Kind.COUNT, Kind.INT):
                if t is not int:
                    raise LookupError(column)
                ints.append(i)
            elif kind is Kind.BOOL:
                if t is not bool:
                    raise LookupError(column)
            elif kind is Kind.FLOAT:
                if t is int:
                    self.floats.append(i)
                elif t is not float:
                    raise LookupError(column)
            elif kind is Kind.TIME:
                if t is not str:
                    raise LookupError(column)
                self.times.append(i)
            elif kind is Kind.MONEY:
                if t is not str:
                    raise LookupError(column)
                self.money.append(i)
            elif kind is Kind.JSON:
                if t is not dict and t is not list:
                    raise LookupError(column)
                self.jsons.append(i)
            else:  # pragma: no cover - a new kind needs a rule here
                raise LookupError(column)
        self.ints: Callable[[Sequence[Any]], Any] | None = (
            None if not ints else itemgetter(*ints) if len(ints) > 1 else _one(ints[0])
        )


def _one(i: int) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    return lambda values: (values[i],)


_SLOW: Any = object()
_plans: dict[tuple[type, ...], Any] = {}


def _plan_of(types: tuple[type, ...]) -> Any:
    plan = _plans.get(types)
    if plan is None:
        try:
            plan = _Plan(types)
        except LookupError:
            plan = _SLOW
        if len(_plans) < 4096:  # signatures are few (which optional fields are null)
            _plans[types] = plan
    return plan


def _fast(report: Any) -> tuple[Any, ...] | None:
    """The bound values of a report in ingest's own shape, or None (then normalize decides)."""
    try:
        values = _values(report)
    except (KeyError, TypeError):
        return None
    plan = _plan_of(tuple(map(type, values)))
    if plan is _SLOW:
        return None
    for i in _NON_EMPTY:
        if not values[i]:
            return None
    if plan.ints is not None:
        ints = plan.ints(values)
        if max(ints) > INT64_MAX or min(ints) < -INT64_MAX - 1:
            return None
    out = list(values)
    for i in plan.floats:
        out[i] = float(out[i])
    for i in plan.times:
        text = out[i]
        match = _UTC_TEXT.fullmatch(text)
        if match is None:
            return None
        try:
            datetime.fromisoformat(text)  # the layout is right; are the fields in range?
        except ValueError:
            return None
        out[i] = f"{text[:10]} {text[11:26]}" if match[1] else f"{text[:10]} {text[11:19]}.000000"
    for i in plan.money:
        if _MONEY_TEXT.fullmatch(out[i]) is None:
            return None
    for i in plan.jsons:
        out[i] = orjson.dumps(out[i]).decode()
    # a tuple, not the list: the cyclic GC stops tracking a tuple of plain values at its first
    # collection, while a flush's 100k lists would be traversed by every full collection
    return tuple(out)


def _reports(payload: bytes) -> tuple[list[Any], bool]:
    """A WAL record's report dicts, and whether the record may hold a NUL in some string."""
    try:
        reports = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise RowRefused("", "a WAL record that is not JSON") from None
    if not isinstance(reports, list):
        raise RowRefused("", "a WAL record that is not a JSON array")
    # orjson writes U+0000 as this escape (a raw NUL is not valid JSON): one search per record
    return reports, b"\\u0000" in payload


def prepare_params(payloads: Iterable[bytes], now: datetime) -> tuple[int, list[tuple[Any, ...]]]:
    """(reports received, distinct rows as SQLite binds them, in request_id order).

    De-duplicated by request_id, first wins; a report without request_id is skipped (logged).
    Raises RowRefused for data no backend can store.
    """
    received = 0
    rows: dict[str, Any] = {}
    for payload in payloads:
        reports, maybe_nul = _reports(payload)
        received += len(reports)
        for report in reports:
            rid = report.get("request_id") if report.__class__ is dict else None
            if rid.__class__ is str and rid in rows:
                continue
            out = None if maybe_nul else _fast(report)
            if out is None:
                row = normalize(report, now)
                if row is None:
                    log.warning("skipping a report without request_id")
                    continue
                rows.setdefault(row.request_id, bind_row(row))
            else:
                rows[out[_RID]] = out
    return received, sorted(rows.values(), key=itemgetter(_RID))
