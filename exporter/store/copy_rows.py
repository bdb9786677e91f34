"""WAL record payloads → the records the Postgres flush COPYs.

The values are `rows.normalize`'s (the one set of value rules, shared with SQLite), in the
Python types asyncpg's binary COPY encodes: str, int, bool, float, Decimal, aware datetime,
and the JSON columns as compact text with NUL replaced in their strings (Postgres cannot give
`\\u0000` out of a json value as text, and the rollup `dims` reads the tags with `->>`).
A one-pass variant for ingest's own shape (one itemgetter, a plan per type signature) measured
~20% faster than `normalize` here; not worth a second path yet (bench/RESULTS.md `## Flush`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from exporter.store.dims import clean_json
from exporter.store.errors import RowRefused
from exporter.store.rows import DETAIL_COLUMNS, KINDS, Kind, normalize

__all__ = ["copy_records", "normalized_values"]

log = logging.getLogger(__name__)

_JSON_AT = tuple(i for i, c in enumerate(DETAIL_COLUMNS) if KINDS[c] is Kind.JSON)


def _json_text(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return orjson.dumps(clean_json(value)).decode() if "\\u0000" in text else text


def normalized_values(report: Any, now: datetime) -> list[Any] | None:
    """rows.normalize of one report as COPY values (JSON as text); None without request_id."""
    row = normalize(report, now)
    if row is None:
        return None
    values = list(row)
    for i in _JSON_AT:
        if values[i] is not None:
            values[i] = _json_text(values[i])
    return values


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
        for report in reports:
            values = normalized_values(report, when)
            if values is None:
                log.warning("skipping a report without request_id")
                continue
            values.append(first + len(out))
            out.append(tuple(values))
    return received, out
