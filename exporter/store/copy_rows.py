"""WAL record payloads → the records the Postgres flush COPYs, in one pass per report.

The values are `rows.normalize`'s (the one set of value rules, shared with SQLite), in the
Python types asyncpg's binary COPY encodes: str, int, bool, float, Decimal, aware datetime,
and the JSON columns as compact text with NUL replaced in their strings (Postgres cannot give
`\\u0000` out of a json value as text, and the rollup `dims` reads the tags with `->>`).

For the shape ingest writes (every field present with its exact JSON type, canonical cost
text, UTC timestamps as orjson writes them, no NUL in the record) `fast_values` takes a few
C-level calls: one `itemgetter`, one `map(type, …)` to find a plan per type signature, the int
range check, the timestamps and costs parsed (~5 µs per report vs ~8–11 for `normalize` here).
Anything else goes through `normalize`; the fast path must give exactly what `normalize`
gives (tests/test_pg_copy_write.py checks it on varied reports): an optimisation, never a
second rulebook. (The SQLite flush has the same idea for its own value types.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any

import orjson

from exporter.store.dims import clean_json
from exporter.store.errors import RowRefused
from exporter.store.rows import DETAIL_COLUMNS, INT64_MAX, KINDS, Kind, normalize

__all__ = ["copy_records", "fast_values", "normalized_values"]

log = logging.getLogger(__name__)

_AT = {c: i for i, c in enumerate(DETAIL_COLUMNS)}
_JSON_AT = tuple(i for i, c in enumerate(DETAIL_COLUMNS) if KINDS[c] is Kind.JSON)


def _json_text(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return orjson.dumps(clean_json(value)).decode() if "\\u0000" in text else text


def normalized_values(report: Any, now: datetime) -> list[Any] | None:
    """The slow path: rows.normalize of one report as COPY values (JSON as text); None
    without a request_id."""
    row = normalize(report, now)
    if row is None:
        return None
    values = list(row)
    for i in _JSON_AT:
        if values[i] is not None:
            values[i] = _json_text(values[i])
    return values


# -- the fast path -----------------------------------------------------------------------------
_values = itemgetter(*DETAIL_COLUMNS)
#: orjson's text of an aware UTC datetime, with or without microseconds
_UTC_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?\+00:00")
#: money_text of a non-negative cost at the store's scale (what ingest's json_default writes)
_MONEY_TEXT = re.compile(r"(0|[1-9][0-9]{0,9})\.[0-9]{10}")
#: text columns whose empty value normalize replaces (request_id: the row is skipped)
_NON_EMPTY = tuple(_AT[c] for c in ("request_id", "operation", "status"))
#: kinds whose None normalize keeps as None (but completed_at and total_tokens, derived)
_NULL_OK = frozenset({Kind.INT, Kind.FLOAT, Kind.MONEY, Kind.JSON, Kind.TIME})
_NULL_NOT_OK = frozenset({_AT["completed_at"], _AT["total_tokens"]})
#: the JSON types of each kind the fast path takes as they are (or converts, below)
_FAST_TYPES: dict[Kind, tuple[type, ...]] = {
    Kind.TEXT: (str,), Kind.COUNT: (int,), Kind.INT: (int,), Kind.BOOL: (bool,),
    Kind.FLOAT: (float, int), Kind.TIME: (str,), Kind.MONEY: (str,), Kind.JSON: (dict, list),
}  # fmt: skip


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
                continue
            if t not in _FAST_TYPES[kind]:
                raise LookupError(column)
            if kind in (Kind.COUNT, Kind.INT):
                ints.append(i)
            elif kind is Kind.FLOAT and t is int:
                self.floats.append(i)
            elif kind is Kind.TIME:
                self.times.append(i)
            elif kind is Kind.MONEY:
                self.money.append(i)
            elif kind is Kind.JSON:
                self.jsons.append(i)
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


def fast_values(report: Any) -> list[Any] | None:
    """The values of a report in ingest's own shape, or None: then normalize decides. The
    caller sends records that may hold a NUL in a text value to normalize (`copy_records`
    searches each payload once)."""
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
        if _UTC_TEXT.fullmatch(out[i]) is None:
            return None
        try:
            out[i] = datetime.fromisoformat(out[i])  # its tzinfo is datetime.UTC itself
        except ValueError:
            return None
    for i in plan.money:
        if _MONEY_TEXT.fullmatch(out[i]) is None:
            return None
        out[i] = Decimal(out[i])  # canonical: at the store's scale already, exact
    for i in plan.jsons:
        out[i] = orjson.dumps(out[i]).decode()
        if "\\u0000" in out[i]:
            return None
    return out


def copy_records(
    payloads: Sequence[bytes], first: int = 0, now: datetime | None = None
) -> tuple[int, list[tuple[Any, ...]]]:
    """(reports received, COPY records: detail values + arrival number `first`, `first`+1…).

    Raises RowRefused for data no backend can store. Duplicates stay: the flush statement
    keeps the first arrival. CPU-bound: run it in a thread.
    """
    when = now or datetime.now(UTC)
    received = 0
    out: list[tuple[Any, ...]] = []
    for payload in payloads:
        try:
            reports = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise RowRefused("", "a WAL record that is not JSON") from None
        if not isinstance(reports, list):
            raise RowRefused("", "a WAL record that is not a JSON array")
        received += len(reports)
        # orjson writes U+0000 as this escape (a raw NUL is not valid JSON): one search
        maybe_nul = b"\\u0000" in payload
        for report in reports:
            values = None if maybe_nul else fast_values(report)
            if values is None:
                values = normalized_values(report, when)
                if values is None:
                    log.warning("skipping a report without request_id")
                    continue
            values.append(first + len(out))
            out.append(tuple(values))
    return received, out
