"""The SQLite flush's one-pass binding gives exactly what the value rules (rows.normalize)
give, and a flush runs a number of statements that does not grow with its reports."""

from __future__ import annotations

import asyncio
import gc
import math
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from storecheck import BASE, report

from exporter.store import Store
from exporter.store.db import _sqlite_on_connect
from exporter.store.errors import RowRefused
from exporter.store.rows import DETAIL_COLUMNS, normalize
from exporter.store.sqlite_bind import _fast, bind_row, prepare_params
from exporter.store.write_sqlite import SQLITE_MAX_VARIABLES, _split, _write_rows, prepare

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _by_the_rules(reports: list[Any]) -> list[tuple[Any, ...]]:
    """What rows.normalize and the binders make of the reports: first request_id wins."""
    rows: dict[str, tuple[Any, ...]] = {}
    for r in reports:
        row = normalize(r, NOW)
        if row is not None:
            rows.setdefault(row.request_id, bind_row(row))
    return [rows[k] for k in sorted(rows)]


def _variants() -> list[dict[str, Any]]:
    """Reports as ingest writes them, and shapes only the slow path may take."""
    base = [report(i) for i in range(40)]
    base += [report(100, tags={"team": "a", "env": "prod"}, cost_usd=None)]
    base += [report(101, started_at=BASE, completed_at=BASE.replace(microsecond=0))]
    base += [report(102, cost_usd="9999.5", duration_ms=None, ttft_ms=12.5)]
    base += [report(103, output_chunk_count=7, request_content_bytes=4000, stream=True)]
    odd: list[dict[str, Any]] = [
        {**report(200), "cost_usd": "1.5"},  # not at the store's scale
        {**report(201), "cost_usd": 0.25},  # a JSON number
        {**report(202), "cost_usd": "-0.5000000000"},  # negative: normalize's business
        {**report(203), "completed_at": "2026-03-01T21:00:00+02:00"},  # not UTC
        {**report(204), "completed_at": "2026-03-01T21:00:00.123+00:00"},  # milliseconds
        {**report(205), "completed_at": "2026-03-01 21:00:00+00:00"},  # space separator
        {**report(206), "completed_at": None},  # defaults to now
        {**report(207), "operation": ""},  # defaults to "other"
        {**report(208), "user": 17},  # text from a number
        {**report(209), "duration_ms": 250},  # an int where a float goes
        {**report(210), "total_tokens": None},  # derived
        {**report(211), "stream": None},  # the column default
        {**report(212), "model": "a\x00b"},  # NUL → U+FFFD
        {k: v for k, v in report(213).items() if k != "team"},  # a missing field
        {**report(214), "input_tokens": 2**63 - 1},  # the largest storable
        {**report(215), "extra": "ignored"},
        {**report(0), "model": "a later copy loses"},
        {**report(216), "request_id": ""},  # skipped
    ]
    return base + odd


def test_one_pass_binding_equals_the_value_rules() -> None:
    reports = _variants()
    payloads = [orjson.dumps(reports[i : i + 7]) for i in range(0, len(reports), 7)]
    received, rows = prepare_params(payloads, NOW)
    assert received == len(reports)
    expected = _by_the_rules(reports)
    assert len(rows) == len(reports) - 2  # the later copy of req-0, the empty request_id
    assert [tuple(r) for r in rows] == expected
    # ingest's own shape takes the one-pass path (else the flush is slow again, silently)
    assert all(_fast(r) is not None for r in reports[:44])


@pytest.mark.parametrize(
    ("field", "value"),
    [("input_tokens", 2**63), ("input_tokens", "many"), ("cost_usd", "NaN"),
     ("completed_at", "2026-13-01T00:00:00+00:00"), ("tags", "a string"), ("duration_ms", True)],
)  # fmt: skip
def test_one_pass_binding_refuses_what_the_rules_refuse(field: str, value: object) -> None:
    payload = orjson.dumps([report(1), {**report(2), field: value}])
    with pytest.raises(RowRefused) as info:
        prepare_params([payload], NOW)
    assert info.value.field == field


def _migrated(tmp_path: Path) -> sqlite3.Connection:
    async def upgrade() -> None:
        store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/usage.db")
        await store.upgrade()
        await store.close()

    asyncio.run(upgrade())
    db = sqlite3.connect(tmp_path / "usage.db")
    _sqlite_on_connect(db, None)  # type: ignore[arg-type]  # the engine's own setup
    return db


def _statements_of_one_flush(db: sqlite3.Connection, reports: list[Any]) -> tuple[int, int]:
    payloads = [orjson.dumps(reports[i : i + 100]) for i in range(0, len(reports), 100)]
    _, rows = prepare(payloads)
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        db.execute("BEGIN")
        inserted, _ = _write_rows(db, rows)
        db.execute("COMMIT")
    finally:
        db.set_trace_callback(None)
    return inserted, len(statements)


def test_a_flush_runs_statements_per_chunk_never_per_report(tmp_path: Path) -> None:
    db = _migrated(tmp_path)
    try:
        small = [report(i) for i in range(300)]
        big = [report(i, completed_at=BASE + timedelta(seconds=i)) for i in range(300, 6300)]
        inserted_small, n_small = _statements_of_one_flush(db, small)
        inserted_big, n_big = _statements_of_one_flush(db, big + small)  # a replay in it
        assert (inserted_small, inserted_big) == (300, 6000)
        # the same fixed statements, plus one more per chunk of detail rows (narrow or full)
        full_chunk = min(1000, SQLITE_MAX_VARIABLES // len(DETAIL_COLUMNS))
        assert n_big - n_small <= math.ceil(6300 / full_chunk) + 1
        assert n_small <= 8, n_small
        (requests,) = db.execute(
            "SELECT sum(requests) FROM usage_rollups WHERE granularity = 'hour'"
        ).fetchone()
        assert requests == 6300
    finally:
        db.close()


def test_binding_keeps_utc_text_and_exact_costs() -> None:
    r = report(1, completed_at=datetime(2026, 3, 1, 21, 5, 7, 42, tzinfo=timezone(timedelta(0))))
    (_, rows) = prepare_params([orjson.dumps([r])], NOW)
    row = _by_the_rules([r])[0]
    assert tuple(rows[0]) == row
    assert "2026-03-01 21:05:07.000042" in row


def test_rows_left_at_database_defaults_read_back_as_bound(tmp_path: Path) -> None:
    """Rows inserted without the columns the database fills hold what binding them would."""
    db = _migrated(tmp_path)
    try:
        # (not the largest storable count: two of them overflow a rollup sum)
        reports = [r for r in _variants() if r["input_tokens"] < 2**62]
        _, rows = prepare_params([orjson.dumps(reports)], NOW)
        narrow, full = _split(rows)
        assert narrow and full  # both statements are exercised
        db.execute("BEGIN")
        _write_rows(db, rows)
        db.execute("COMMIT")
        cols = ", ".join(f'"{c}"' for c in DETAIL_COLUMNS)
        stored = db.execute(f"SELECT {cols} FROM usage_details ORDER BY request_id").fetchall()
        as_bound = [tuple(int(v) if isinstance(v, bool) else v for v in r) for r in rows]
        assert stored == as_bound
    finally:
        db.close()


def test_prepared_rows_leave_the_cyclic_gc() -> None:
    """A flush holds ~100k rows at once: as lists, every full GC pass would walk them all."""
    reports = [report(i) for i in range(500)]
    _, rows = prepare_params([orjson.dumps(reports)], NOW)
    gc.collect()
    assert not [r for r in rows if gc.is_tracked(r)]
