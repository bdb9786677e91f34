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
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from exporter.store.dims import clean_json
from exporter.store.fastpath import checked_values, record_reports
from exporter.store.rows import DETAIL_COLUMNS, KINDS, Kind, normalize

__all__ = ["copy_records", "fast_values", "normalized_values"]

log = logging.getLogger(__name__)

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
        reports, maybe_nul = record_reports(payload)
        received += len(reports)
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
