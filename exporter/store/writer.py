"""The exactly-once batch write: details de-duplicate, rollups add only what was new.

One transaction per batch:

1. insert the details in request_id order (every replica takes unique-index locks in the same
   order, so they never deadlock) with `ON CONFLICT (request_id) DO NOTHING RETURNING`; a
   duplicate inside the batch loses to its first occurrence, as a later retry would;
2. aggregate only the rows really inserted into hour and day deltas (UTC buckets of
   completed_at);
3. upsert the deltas additively in sorted key order;
4. commit. A crash or failure before the commit leaves nothing behind; a replay after the
   commit inserts no detail, hence adds nothing to the rollups.

Postgres runs all of it as ONE statement over `unnest($1::json[])` of the WAL records as they
are: parsing, ordering, aggregation and both upserts happen inside the server. The exporter's
event loop, which also serves ingest, does no per-report work, and a whole flush is one round
trip with one bind parameter (asyncpg's 32767-parameter limit never applies). bench/RESULTS.md
has the measurements against typed-array unnest and multi-row VALUES. SQLite (embedded) gets
the same protocol from Python: multi-row VALUES chunked under its bound-variable limit and an
exact `dec_add` for costs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.store.db import backend_name
from exporter.store.tables import COST_QUANTUM, ROLLUP_KEY, ROLLUP_SUMS, decimal_text

log = logging.getLogger(__name__)

DETAIL_COLUMNS: tuple[str, ...] = (
    "request_id", "model", "provider", "operation", "user", "team", "api_key_id", "trace_id",
    "parent_id", "node", "input_tokens", "output_tokens", "cached_input_tokens",
    "cache_creation_input_tokens", "reasoning_tokens", "total_tokens", "cost_usd", "status",
    "error_type", "stream", "completed", "estimated", "output_chunk_count",
    "request_content_bytes", "started_at", "completed_at", "duration_ms", "ttft_ms", "source",
)  # fmt: skip
ROLLUP_COLUMNS: tuple[str, ...] = ROLLUP_KEY + ROLLUP_SUMS
_DIMENSIONS = ("model", "provider", "operation", "user", "team", "api_key_id")
_TOKENS = ("input_tokens", "output_tokens", "cached_input_tokens",
           "cache_creation_input_tokens", "reasoning_tokens")  # fmt: skip

# Positions in a detail row (a tuple in DETAIL_COLUMNS order).
_I = {name: i for i, name in enumerate(DETAIL_COLUMNS)}
_STR_FIELDS = ("request_id", "model", "provider", "operation", "user", "team", "api_key_id",
               "trace_id", "parent_id", "node", "status", "error_type", "source")  # fmt: skip
# Defaults for absent or empty values; the Postgres statement applies the same ones.
_STR_DEFAULTS = {"operation": "other", "status": "success"}

Row = tuple[Any, ...]
_ZERO = Decimal(0).quantize(COST_QUANTUM)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch did: `inserted` reports were new, the rest were already stored."""

    received: int
    inserted: int
    rollup_rows: int

    @property
    def duplicates(self) -> int:
        return self.received - self.inserted


def _q(name: str) -> str:
    return f'"{name}"'


def _cols(names: Iterable[str]) -> str:
    return ", ".join(_q(n) for n in names)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _clean_payload(payload: bytes) -> bytes:
    """Replace NUL characters (Postgres text cannot hold them) in a record's strings."""
    reports = orjson.loads(payload)
    for report in reports:
        for key, value in report.items():
            if isinstance(value, str) and "\x00" in value:
                report[key] = _clean(value)
    return orjson.dumps(reports)


# -- normalization (SQLite path; the Postgres statement does the same in SQL) --------------


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(dt, datetime):
        raise TypeError(f"timestamp must be RFC 3339 text or datetime, not {type(value)!r}")
    if dt.tzinfo is UTC:
        return dt
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _cost(value: Any) -> Decimal | None:
    """Exact cost: a float through its shortest repr (0.1 → 0.1, not 0.1000…0555)."""
    if value is None:
        return None
    # Half away from zero, as Postgres rounds into NUMERIC(20,10): both backends agree.
    text = repr(value) if isinstance(value, float) else str(value)
    return Decimal(text).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


def _clean(value: str) -> str:
    """Postgres text cannot hold NUL; both backends store U+FFFD instead."""
    return value.replace("\x00", "\ufffd")


def normalize(report: Mapping[str, Any], now: datetime) -> Row | None:
    """One report dict (UsageReport fields) → a detail row; None without a request_id.

    `completed_at` defaults to `now` (ingest normally sets it to the receive time).
    """
    g = report.get
    strings = []
    for field in _STR_FIELDS:
        value = g(field)
        if not value:
            value = _STR_DEFAULTS.get(field, "")
        elif not isinstance(value, str):
            value = str(value)
        if "\x00" in value:
            value = _clean(value)
        strings.append(value)
    (request_id, model, provider, operation, user, team, api_key_id, trace_id, parent_id, node,
     status, error_type, source) = strings  # fmt: skip
    if not request_id:
        return None
    input_tokens = g("input_tokens") or 0
    output_tokens = g("output_tokens") or 0
    total = g("total_tokens")
    stream, completed, estimated = g("stream"), g("completed"), g("estimated")
    return (
        request_id,
        model,
        provider,
        operation,
        user,
        team,
        api_key_id,
        trace_id,
        parent_id,
        node,
        input_tokens,
        output_tokens,
        g("cached_input_tokens") or 0,
        g("cache_creation_input_tokens") or 0,
        g("reasoning_tokens") or 0,
        input_tokens + output_tokens if total is None else total,
        _cost(g("cost_usd")),
        status,
        error_type,
        bool(stream),
        True if completed is None else bool(completed),
        bool(estimated),
        g("output_chunk_count"),
        g("request_content_bytes"),
        _ts(g("started_at")),
        _ts(g("completed_at")) or now,
        g("duration_ms"),
        g("ttft_ms"),
        source,
    )


class Batch:
    """Detail rows of one SQLite flush, de-duplicated by request_id (first wins).

    Fed record by record, so a flush holds one record's decoded JSON dicts at a time.
    """

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)
        self.received = 0
        self._rows: dict[str, Row] = {}

    def add(self, report: Mapping[str, Any]) -> None:
        self.received += 1
        rid = report.get("request_id")
        if isinstance(rid, str) and rid in self._rows:
            return
        row = normalize(report, self.now)
        if row is None:
            log.warning("skipping a report without request_id")
            return
        self._rows.setdefault(row[0], row)

    def add_payload(self, payload: bytes) -> None:
        """One WAL record: an orjson-encoded JSON array of report dicts."""
        for report in orjson.loads(payload):
            self.add(report)

    def __len__(self) -> int:
        return len(self._rows)

    def sorted_rows(self) -> list[Row]:
        return sorted(self._rows.values(), key=itemgetter(0))


def canonical_dims(tags: Any, promoted: Sequence[str]) -> str:
    """The rollup `dims` key part: the promoted tags a report carries, as sorted JSON."""
    if not promoted or not isinstance(tags, Mapping):
        return "{}"
    kept = {k: str(tags[k]) for k in sorted(promoted) if tags.get(k) not in (None, "")}
    return orjson.dumps(kept).decode() if kept else "{}"


def aggregate(rows: Iterable[Row], dims_of: Mapping[str, str] | None = None) -> list[Row]:
    """Hour and day rollup deltas of detail rows, in ROLLUP_COLUMNS order, sorted by key.

    `dims_of` maps request_id → the canonical promoted-tag JSON (absent: '{}').
    """
    i_model, i_cost, i_status = _I["model"], _I["cost_usd"], _I["status"]
    i_in, i_completed, i_dur = _I["input_tokens"], _I["completed_at"], _I["duration_ms"]
    i_ttft, i_node, i_est = _I["ttft_ms"], _I["node"], _I["estimated"]
    dims_get = (dims_of or {}).get
    hours: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        bucket = r[i_completed].replace(minute=0, second=0, microsecond=0)
        key = (bucket, *r[i_model : i_model + 6], r[i_node], dims_get(r[0], "{}"))
        acc = hours.get(key)
        if acc is None:
            acc = hours[key] = [0, 0, 0, 0, 0, 0, 0, _ZERO, 0.0, 0, 0.0, 0, 0, 0]
        acc[0] += 1
        status = r[i_status]
        if status != "success":
            acc[1] += 1
            if status == "cancelled":
                acc[12] += 1
        acc[2] += r[i_in]
        acc[3] += r[i_in + 1]
        acc[4] += r[i_in + 2]
        acc[5] += r[i_in + 3]
        acc[6] += r[i_in + 4]
        if r[i_cost] is not None:
            acc[7] += r[i_cost]
        if r[i_dur] is not None:
            acc[8] += r[i_dur]
            acc[9] += 1
        if r[i_ttft] is not None:
            acc[10] += r[i_ttft]
            acc[11] += 1
        if r[i_est]:
            acc[13] += 1
    days: dict[tuple[Any, ...], list[Any]] = {}
    for (bucket, *parts), acc in hours.items():
        key = (bucket.replace(hour=0), *parts)
        day = days.get(key)
        if day is None:
            days[key] = list(acc)
        else:
            for j, v in enumerate(acc):
                day[j] += v
    out = [("hour", *k, *a) for k, a in hours.items()]
    out += [("day", *k, *a) for k, a in days.items()]
    out.sort(key=itemgetter(*range(len(ROLLUP_KEY))))
    return out


# -- Postgres: one statement ----------------------------------------------------------------

_PG_DEFAULTS: dict[str, str] = {
    **{c: f"coalesce(r.{_q(c)}, '')" for c in _STR_FIELDS},
    "operation": "coalesce(nullif(r.operation, ''), 'other')",
    "status": "coalesce(nullif(r.status, ''), 'success')",
    **{c: f"coalesce(r.{_q(c)}, 0)" for c in _TOKENS},
    "total_tokens": "coalesce(r.total_tokens, coalesce(r.input_tokens, 0) "
    "+ coalesce(r.output_tokens, 0))",
    "stream": "coalesce(r.stream, false)",
    "completed": "coalesce(r.completed, true)",
    "estimated": "coalesce(r.estimated, false)",
    "completed_at": "coalesce(r.completed_at, now())",
}
_KEY_C = ", ".join(f'{_q(c)} COLLATE "C"' for c in _DIMENSIONS)

# Assembled from the column constants above, never from data. Row order is the lock order:
# request_id for the details, the rollup key for the rollups, byte-wise ("C") so it is cheap
# and the same on every replica whatever the database's default collation.
PG_WRITE_SQL = f"""
WITH src AS (
    SELECT r.*, p.pn
    FROM unnest($1::json[]) WITH ORDINALITY AS p(doc, pn)
    CROSS JOIN LATERAL json_populate_recordset(NULL::usage_details, p.doc)
        WITH ORDINALITY AS r
), ins AS (
    INSERT INTO usage_details ({_cols(DETAIL_COLUMNS)})
    SELECT {", ".join(_PG_DEFAULTS.get(c, f"r.{_q(c)}") for c in DETAIL_COLUMNS)}
    FROM src AS r
    WHERE r.request_id <> ''
    ORDER BY r.request_id COLLATE "C", r.pn, r.ordinality
    ON CONFLICT (request_id) DO NOTHING
    RETURNING completed_at, {_cols(_DIMENSIONS)}, node, status, {_cols(_TOKENS)}, cost_usd,
        duration_ms, ttft_ms, estimated
), hourly AS (
    SELECT date_trunc('hour', completed_at, 'UTC') AS bucket_start, {_cols(_DIMENSIONS)},
        node, '{{}}'::text AS dims,
        count(*) AS requests,
        count(*) FILTER (WHERE status <> 'success') AS errors,
        {", ".join(f"sum({_q(c)}) AS {_q(c)}" for c in _TOKENS)},
        coalesce(sum(cost_usd), 0) AS cost_usd,
        coalesce(sum(duration_ms), 0) AS duration_ms_sum,
        count(duration_ms) AS duration_count,
        coalesce(sum(ttft_ms), 0) AS ttft_ms_sum,
        count(ttft_ms) AS ttft_count,
        count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
        count(*) FILTER (WHERE estimated) AS estimated
    FROM ins
    GROUP BY 1, {_cols(_DIMENSIONS)}, node
), deltas AS (
    SELECT 'hour' AS granularity, * FROM hourly
    UNION ALL
    SELECT 'day', date_trunc('day', bucket_start, 'UTC'), {_cols(_DIMENSIONS)}, node, dims,
        {", ".join(f"sum({_q(c)})" for c in ROLLUP_SUMS)}
    FROM hourly
    GROUP BY 2, {_cols(_DIMENSIONS)}, node, dims
), up AS (
    INSERT INTO usage_rollups ({_cols(ROLLUP_COLUMNS)})
    SELECT * FROM deltas
    ORDER BY granularity COLLATE "C", bucket_start, {_KEY_C}, node COLLATE "C", dims COLLATE "C"
    ON CONFLICT ({_cols(ROLLUP_KEY)}) DO UPDATE SET
        {", ".join(f"{_q(c)} = usage_rollups.{_q(c)} + excluded.{_q(c)}" for c in ROLLUP_SUMS)}
    RETURNING 1
)
SELECT (SELECT count(*) FROM src), (SELECT count(*) FROM ins), (SELECT count(*) FROM up)
"""  # noqa: S608


# -- SQLite: multi-row VALUES ----------------------------------------------------------------

SQLITE_MAX_VARIABLES = 32766  # SQLite's default limit since 3.32


def sqlite_timestamp(dt: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text for a UTC datetime (so ORM reads parse it back)."""
    if dt is None:
        return None
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} "
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond:06d}"
    )


def _sqlite_values(
    rows: Sequence[Row], ts_cols: Sequence[int], dec_cols: Sequence[int]
) -> list[Any]:
    params: list[Any] = []
    for r in rows:
        values = list(r)
        for i in ts_cols:
            values[i] = sqlite_timestamp(values[i])
        for i in dec_cols:
            if values[i] is not None:
                values[i] = decimal_text(values[i])
        params.extend(values)
    return params


def _chunks(rows: Sequence[Row], width: int) -> Iterable[Sequence[Row]]:
    size = max(1, min(1000, SQLITE_MAX_VARIABLES // width))
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _placeholders(n_rows: int, width: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return ", ".join([one] * n_rows)


_SQLITE_DETAIL_TS = (_I["started_at"], _I["completed_at"])
_SQLITE_DETAIL_DEC = (_I["cost_usd"],)
_SQLITE_ROLLUP_TS = (ROLLUP_COLUMNS.index("bucket_start"),)
_SQLITE_ROLLUP_DEC = (ROLLUP_COLUMNS.index("cost_usd"),)
_SQLITE_ADDITIVE = ", ".join(
    f"{_q(c)} = dec_add(usage_rollups.{_q(c)}, excluded.{_q(c)})"
    if c == "cost_usd"
    else f"{_q(c)} = usage_rollups.{_q(c)} + excluded.{_q(c)}"
    for c in ROLLUP_SUMS
)


def _prepare(payloads: Sequence[bytes]) -> tuple[int, list[Row]]:
    batch = Batch()
    for payload in payloads:
        batch.add_payload(payload)
    return batch.received, batch.sorted_rows()


async def _sqlite_write(conn: AsyncConnection, rows: list[Row]) -> tuple[set[str], list[Row]]:
    width = len(DETAIL_COLUMNS)
    inserted: set[str] = set()
    for chunk in _chunks(rows, width):
        sql = (
            f"INSERT INTO usage_details ({_cols(DETAIL_COLUMNS)}) VALUES "  # noqa: S608
            f"{_placeholders(len(chunk), width)} "
            "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
        )
        params = _sqlite_values(chunk, _SQLITE_DETAIL_TS, _SQLITE_DETAIL_DEC)
        result = await conn.exec_driver_sql(sql, tuple(params))
        inserted.update(r[0] for r in result.fetchall())
    new_rows = rows if len(inserted) == len(rows) else [r for r in rows if r[0] in inserted]
    rollups = await asyncio.to_thread(aggregate, new_rows)
    width = len(ROLLUP_COLUMNS)
    for chunk in _chunks(rollups, width):
        sql = (
            f"INSERT INTO usage_rollups ({_cols(ROLLUP_COLUMNS)}) VALUES "  # noqa: S608
            f"{_placeholders(len(chunk), width)} "
            f"ON CONFLICT ({_cols(ROLLUP_KEY)}) DO UPDATE SET {_SQLITE_ADDITIVE}"
        )
        params = _sqlite_values(chunk, _SQLITE_ROLLUP_TS, _SQLITE_ROLLUP_DEC)
        await conn.exec_driver_sql(sql, tuple(params))
    return inserted, rollups


class StoreWriter:
    """Writes batches of reports exactly once; safe to run in several replicas at once."""

    #: Session settings for the flush transaction: sorts and hash aggregates of a large batch
    #: stay in memory instead of spilling to disk.
    PG_WORK_MEM = "64MB"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.backend = backend_name(engine.url)

    async def write(self, reports: Iterable[Mapping[str, Any]]) -> WriteResult:
        """Store report dicts (UsageReport fields, JSON-ready or Python values) at once."""
        payload = orjson.dumps(list(reports), default=_json_default)
        return await self.write_payloads([payload])

    async def write_payloads(self, payloads: Sequence[bytes]) -> WriteResult:
        """Store WAL record payloads (orjson arrays of report dicts) in one transaction."""
        if self.backend == "postgresql":
            return await self._write_postgres(payloads)
        # Per-report Python work runs in a thread, so the event loop keeps serving ingest.
        received, rows = await asyncio.to_thread(_prepare, payloads)
        if not rows:
            return WriteResult(received, 0, 0)
        async with self.engine.begin() as conn:
            inserted, rollups = await _sqlite_write(conn, rows)
        return WriteResult(received, len(inserted), len(rollups))

    async def _write_postgres(self, payloads: Sequence[bytes]) -> WriteResult:
        docs = [(_clean_payload(p) if b"\\u0000" in p else p).decode() for p in payloads]
        if not docs:
            return WriteResult(0, 0, 0)
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            pg: Any = raw.driver_connection
            try:
                async with pg.transaction():
                    await pg.execute(f"SET LOCAL work_mem = '{self.PG_WORK_MEM}'")
                    received, inserted, rollups = await pg.fetchrow(PG_WRITE_SQL, docs)
            except BaseException:
                # Broken, or cancelled mid-statement: never hand it back to the pool.
                await conn.invalidate()
                raise
        return WriteResult(received, inserted, rollups)
