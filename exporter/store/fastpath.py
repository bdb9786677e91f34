"""The shape ingest writes, recognised in a few C-level calls per report, for both flushes.

A WAL report in ingest's own shape has every detail column present with its exact JSON type,
canonical cost text and UTC timestamps as orjson writes them. `checked_values` finds that in
one `itemgetter`, one `map(type, …)` to look up a plan per type signature, and the int range
check; each backend then converts the timestamps and costs it binds (`copy_rows` for the
Postgres COPY, `sqlite_bind` for SQLite). Anything else is None: `rows.normalize`, the one set
of value rules, decides. The fast paths must give exactly what normalize gives (checked in
tests/test_pg_copy_write.py and tests/test_sqlite_bind.py): an optimisation, never a second
rulebook.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import orjson

from exporter.store.errors import RowRefused
from exporter.store.rows import DETAIL_COLUMNS, INT64_MAX, KINDS, Kind

__all__ = ["AT", "Plan", "checked_values", "micro_text", "record_reports"]

#: a detail column's position in the values
AT = {c: i for i, c in enumerate(DETAIL_COLUMNS)}
_values = itemgetter(*DETAIL_COLUMNS)
#: orjson's text of an aware UTC datetime, with or without microseconds
_UTC_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?\+00:00")
#: money_text of a non-negative cost at the store's scale (what ingest's json_default writes)
_MONEY_TEXT = re.compile(r"(0|[1-9][0-9]{0,9})\.[0-9]{10}")
#: text columns whose empty value normalize replaces (request_id: the row is skipped)
_NON_EMPTY = tuple(AT[c] for c in ("request_id", "operation", "status"))
#: kinds whose None normalize keeps as None (but completed_at and total_tokens, derived)
_NULL_OK = frozenset({Kind.INT, Kind.FLOAT, Kind.MONEY, Kind.JSON, Kind.TIME})
_NULL_NOT_OK = frozenset({AT["completed_at"], AT["total_tokens"]})
#: the JSON types of each kind taken as they are (or converted, below)
_FAST_TYPES: dict[Kind, tuple[type, ...]] = {
    Kind.TEXT: (str,), Kind.COUNT: (int,), Kind.INT: (int,), Kind.BOOL: (bool,),
    Kind.FLOAT: (float, int), Kind.TIME: (str,), Kind.MONEY: (str,), Kind.JSON: (dict, list),
}  # fmt: skip


class Plan:
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
            plan = Plan(types)
        except LookupError:
            plan = _SLOW
        if len(_plans) < 4096:  # signatures are few (which optional fields are null)
            _plans[types] = plan
    return plan


def checked_values(report: Any) -> tuple[list[Any], Plan] | None:
    """A report's detail values and their plan, or None (then normalize decides): ints in
    range, floats as float, JSON columns as compact text without NUL; the timestamps
    (`plan.times`, their layout checked, not their ranges) and costs (`plan.money`,
    canonical) still as text, for the backend to convert."""
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
    for i in plan.money:
        if _MONEY_TEXT.fullmatch(out[i]) is None:
            return None
    for i in plan.jsons:
        out[i] = orjson.dumps(out[i]).decode()
        if "\\u0000" in out[i]:
            return None
    return out, plan


def micro_text(text: str) -> str:
    """A checked UTC timestamp's text as `YYYY-MM-DD HH:MM:SS.ffffff` (SQLite's layout)."""
    return f"{text[:10]} {text[11:26]}" if len(text) == 32 else f"{text[:10]} {text[11:19]}.000000"


def record_reports(payload: bytes) -> tuple[list[Any], bool]:
    """A WAL record's report dicts, and whether the record may hold a NUL in some string."""
    try:
        reports = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise RowRefused("", "a WAL record that is not JSON") from None
    if not isinstance(reports, list):
        raise RowRefused("", "a WAL record that is not a JSON array")
    # orjson writes U+0000 as this escape (a raw NUL is not valid JSON): one search per record
    return reports, b"\\u0000" in payload
