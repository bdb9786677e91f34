"""The Postgres write before the COPY staging table, kept for `bench/flush.py --variants`.

One statement over the WAL records as they are: `unnest($1::json[])` of the payloads feeds
`json_populate_recordset`, so Postgres parses every report (bench/RESULTS.md `## Flush`).
Not used by the service; no promoted tags (dims '{}').
"""

from __future__ import annotations

from collections.abc import Iterable

from exporter.store.rows import (
    DERIVED_KEY,
    DETAIL_COLUMNS,
    DIMENSIONS,
    EMPTY_TEXT_DEFAULTS,
    KINDS,
    ROLLUP_COLUMNS,
    ROLLUP_SPECS,
    Kind,
    bool_default,
)
from exporter.store.tables import ROLLUP_KEY, ROLLUP_SUMS

__all__ = ["JSON_WRITE_SQL"]


def _q(name: str) -> str:
    return f'"{name}"'


def _cols(names: Iterable[str]) -> str:
    return ", ".join(_q(n) for n in names)


def _value_sql(name: str) -> str:
    """The column's value from the JSON record `r`, with the same defaults as rows.normalize."""
    col = f"r.{_q(name)}"
    kind = KINDS[name]
    if kind is Kind.TEXT:
        default = EMPTY_TEXT_DEFAULTS.get(name, "")
        return f"coalesce(nullif({col}, ''), '{default}')" if default else f"coalesce({col}, '')"
    if name == "total_tokens":
        return f"coalesce({col}, coalesce(r.input_tokens, 0) + coalesce(r.output_tokens, 0))"
    if kind is Kind.COUNT:
        return f"coalesce({col}, 0)"
    if kind is Kind.BOOL:
        return f"coalesce({col}, {str(bool_default(name)).lower()})"
    if name == "completed_at":
        return f"coalesce({col}, now())"
    return col


_RETURNING = tuple(
    dict.fromkeys(
        ("completed_at", *DIMENSIONS, *(c for s in ROLLUP_SPECS.values() for c in s.reads))
    )
)
_KEY_C = ", ".join(f'{_q(c)} COLLATE "C"' for c in ROLLUP_KEY[2:])
_DERIVED_SQL = "".join(f", {DERIVED_KEY[c][0]} AS {_q(c)}" for c in ROLLUP_KEY if c in DERIVED_KEY)
_DERIVED_COLS = "".join(f", {_q(c)}" for c in ROLLUP_KEY if c in DERIVED_KEY)

JSON_WRITE_SQL = f"""
WITH src AS (
    SELECT r.*, p.pn
    FROM unnest($1::json[]) WITH ORDINALITY AS p(doc, pn)
    CROSS JOIN LATERAL json_populate_recordset(NULL::usage_details, p.doc)
        WITH ORDINALITY AS r
), ins AS (
    INSERT INTO usage_details ({_cols(DETAIL_COLUMNS)})
    SELECT {", ".join(_value_sql(c) for c in DETAIL_COLUMNS)}
    FROM src AS r
    WHERE r.request_id <> ''
    ORDER BY r.request_id COLLATE "C", r.pn, r.ordinality
    ON CONFLICT (request_id) DO NOTHING
    RETURNING {_cols(_RETURNING)}
), hourly AS (
    SELECT date_trunc('hour', completed_at, 'UTC') AS bucket_start, {_cols(DIMENSIONS)}
        {_DERIVED_SQL}, {", ".join(f"{ROLLUP_SPECS[c].sql} AS {_q(c)}" for c in ROLLUP_SUMS)}
    FROM ins
    GROUP BY 1, {_cols(DIMENSIONS)}
), deltas AS (
    SELECT 'hour' AS granularity, * FROM hourly
    UNION ALL
    SELECT 'day', date_trunc('day', bucket_start, 'UTC'), {_cols(DIMENSIONS)}{_DERIVED_COLS},
        {", ".join(f"sum({_q(c)})" for c in ROLLUP_SUMS)}
    FROM hourly
    GROUP BY 2, {_cols(DIMENSIONS)}{_DERIVED_COLS}
), up AS (
    INSERT INTO usage_rollups ({_cols(ROLLUP_COLUMNS)})
    SELECT * FROM deltas
    ORDER BY granularity COLLATE "C", bucket_start, {_KEY_C}
    ON CONFLICT ({_cols(ROLLUP_KEY)}) DO UPDATE SET
        {", ".join(f"{_q(c)} = usage_rollups.{_q(c)} + excluded.{_q(c)}" for c in ROLLUP_SUMS)}
    RETURNING 1
)
SELECT (SELECT count(*) FROM src), (SELECT count(*) FROM ins), (SELECT count(*) FROM up)
"""
