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
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from operator import itemgetter
from typing import Any

import orjson

from exporter.store.fastpath import AT, checked_values, micro_text, record_reports
from exporter.store.rows import DETAIL_COLUMNS, KINDS, Kind, normalize
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
_RID = AT["request_id"]


def _fast(report: Any) -> tuple[Any, ...] | None:
    """The bound values of a report in ingest's own shape, or None (then normalize decides)."""
    checked = checked_values(report)
    if checked is None:
        return None
    out, plan = checked
    for i in plan.times:
        try:
            datetime.fromisoformat(out[i])  # the layout is right; are the fields in range?
        except ValueError:
            return None
        out[i] = micro_text(out[i])
    # a tuple, not the list: the cyclic GC stops tracking a tuple of plain values at its first
    # collection, while a flush's 100k lists would be traversed by every full collection
    return tuple(out)


def prepare_params(payloads: Iterable[bytes], now: datetime) -> tuple[int, list[tuple[Any, ...]]]:
    """(reports received, distinct rows as SQLite binds them, in request_id order).

    De-duplicated by request_id, first wins; a report without request_id is skipped (logged).
    Raises RowRefused for data no backend can store.
    """
    received = 0
    rows: dict[str, Any] = {}
    for payload in payloads:
        reports, maybe_nul = record_reports(payload)
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
