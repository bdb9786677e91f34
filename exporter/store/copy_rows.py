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
second rulebook. The shape check itself is `fastpath.checked_values`, shared with SQLite.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any

import orjson

from exporter.store.dims import clean_json
from exporter.store.fastpath import checked_values, record_reports
from exporter.store.rows import DETAIL_COLUMNS, KINDS, Kind, clean_text, normalize

__all__ = [
    "Entry",
    "copy_records",
    "entry_records",
    "fast_values",
    "normalized_values",
    "ordered_reports",
    "stored_request_id",
]

log = logging.getLogger(__name__)

_RID = DETAIL_COLUMNS.index("request_id")
_KEY = itemgetter(0)
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
def fast_values(report: Any) -> list[Any] | None:
    """The values of a report in ingest's own shape, or None: then normalize decides. The
    caller sends records that may hold a NUL in a text value to normalize (`copy_records`
    searches each payload once)."""
    checked = checked_values(report)
    if checked is None:
        return None
    out, plan = checked
    try:
        for i in plan.times:
            out[i] = datetime.fromisoformat(out[i])  # its tzinfo is datetime.UTC itself
    except ValueError:
        return None
    for i in plan.money:
        out[i] = Decimal(out[i])  # canonical: at the store's scale already, exact
    return out


#: (stored request_id, arrival number, report, whether its WAL record may hold a NUL)
Entry = tuple[str, int, Any, bool]


def stored_request_id(report: Any) -> str:
    """The request_id `normalize` stores for a report, by its text rule ('' for none, or for
    what is not a report at all: normalize then skips it or refuses it)."""
    value = report.get("request_id") if isinstance(report, Mapping) else None
    if not value:
        return ""
    if value.__class__ is not str:
        value = str(value)
    return clean_text(value) if "\x00" in value else value


def ordered_reports(payloads: Sequence[bytes]) -> tuple[int, list[Entry]]:
    """(reports received, every report as an Entry) in stored request_id order, byte-wise
    (Python compares str by code point, which is the byte order of their UTF-8, Postgres'
    "C" collation), arrival order among equal ids (the sort is stable). Decodes the JSON:
    CPU-bound, run it in a thread. Raises RowRefused for a record that is not a JSON array."""
    out: list[Entry] = []
    for payload in payloads:
        reports, maybe_nul = record_reports(payload)
        n = len(out)
        out.extend((stored_request_id(r), n + i, r, maybe_nul) for i, r in enumerate(reports))
    out.sort(key=_KEY)
    return len(out), out


def entry_records(entries: Sequence[Entry], now: datetime) -> list[tuple[Any, ...]]:
    """The COPY records of entries: detail values + the arrival number, in the entries' order.

    Raises RowRefused for data no backend can store. Duplicates stay: the flush statement
    keeps the first arrival. CPU-bound: run it in a thread.
    """
    out: list[tuple[Any, ...]] = []
    for key, arrival, report, maybe_nul in entries:
        values = None if maybe_nul else fast_values(report)
        if values is None:
            values = normalized_values(report, now)
            if values is None:
                log.warning("skipping a report without request_id")
                continue
        if values[_RID] != key:  # the order of the flush is this key's: never a silent drift
            raise RuntimeError(f"stored request_id {values[_RID]!r} sorted as {key!r}")
        values.append(arrival)
        out.append(tuple(values))
    return out


def copy_records(
    payloads: Sequence[bytes], now: datetime | None = None
) -> tuple[int, list[tuple[Any, ...]]]:
    """(reports received, COPY records of all of them in request_id order)."""
    received, entries = ordered_reports(payloads)
    return received, entry_records(entries, now or datetime.now(UTC))
