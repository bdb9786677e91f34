"""Migration 0005 on rollups written before it, on SQLite and Postgres: rows whose audit rows
are still there get exact duration/TTFT counts, TTFT sums, cancelled and estimated counts;
rows whose audit rows were purged keep the old definition; node and dims join the key and new
flushes add onto the migrated rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from apiexpect import cost, done_at, figures, make_reports
from sqlalchemy import insert, select

from exporter.store import Store
from exporter.store.stats import StatsQuery, run_stats
from exporter.store.tables import usage_details, usage_rollups

OLD_DIMS = ("model", "provider", "operation", "user", "team", "api_key_id")
#: reports whose audit rows stay (January) and whose audit rows were purged (December)
JAN, DEC31 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2025, 12, 31, tzinfo=UTC)
KEPT = [r for r in make_reports(300, seed=4) if done_at(r) >= JAN]
PURGED = [r for r in make_reports(300, seed=5, prefix="p") if done_at(r) < DEC31]
DETAIL_0001 = ("request_id", "model", "provider", "operation", "user", "team", "api_key_id",
               "trace_id", "parent_id", "node", "input_tokens", "output_tokens",
               "cached_input_tokens", "cache_creation_input_tokens", "reasoning_tokens",
               "total_tokens", "cost_usd", "status", "error_type", "stream", "completed",
               "estimated", "started_at", "completed_at", "duration_ms", "ttft_ms",
               "source")  # fmt: skip


def old_rollups(reports: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, ...], list[Any]]:
    """What the writer before 0005 stored: the old key, the old sums."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for r in reports:
        hour = done_at(r).replace(minute=0, second=0, microsecond=0)
        dims = tuple(r[k] for k in OLD_DIMS)
        groups.setdefault(("hour", hour, *dims), []).append(r)
        groups.setdefault(("day", hour.replace(hour=0), *dims), []).append(r)
    return groups


def detail_values(r: Mapping[str, Any]) -> dict[str, Any]:
    v = {k: r[k] for k in DETAIL_0001}
    v["completed_at"] = done_at(r)
    v["started_at"] = None
    v["cost_usd"] = None if r["cost_usd"] is None else cost(r)
    return v


def rollup_values(key: tuple[Any, ...], rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    f = figures(rs, pct=False)
    out = dict(zip(("granularity", "bucket_start", *OLD_DIMS), key, strict=True))
    for k in ("requests", "errors", "input_tokens", "output_tokens", "cached_input_tokens",
              "cache_creation_input_tokens", "reasoning_tokens"):  # fmt: skip
        out[k] = f[k]
    out["cost_usd"] = f["cost_usd"]
    out["duration_ms_sum"] = sum(r["duration_ms"] or 0.0 for r in rs)
    return out


@pytest.fixture(params=["sqlite", "postgres"])
async def old_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A database at 0001 holding details of KEPT and rollups of KEPT and PURGED."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    store = Store.from_url(url)
    await store.upgrade("0001")
    async with store.engine.begin() as conn:
        await conn.execute(insert(usage_details), [detail_values(r) for r in KEPT])
        rows = [rollup_values(k, v) for k, v in old_rollups(KEPT + PURGED).items()]
        await conn.execute(insert(usage_rollups), rows)
    try:
        yield store
    finally:
        await store.close()


async def test_old_rollups_get_honest_counts_and_new_flushes_add_to_them(old_store: Store) -> None:
    await old_store.upgrade()
    kept_keys = set(old_rollups(KEPT))
    async with old_store.engine.connect() as conn:
        got = {
            (r.granularity, r.bucket_start, *(getattr(r, k) for k in OLD_DIMS)): r
            for r in (await conn.execute(select(usage_rollups))).all()
        }
    want = old_rollups(KEPT + PURGED)
    assert set(got) == set(want)
    for key, rs in want.items():
        row = got[key]
        assert (row.node, row.dims) == ("", "{}")
        assert row.requests == len(rs) and row.cost_usd == figures(rs)["cost_usd"]
        if key in kept_keys:
            assert row.duration_count == sum(r["duration_ms"] is not None for r in rs), key
            assert row.ttft_count == sum(r["ttft_ms"] is not None for r in rs), key
            assert row.ttft_ms_sum == pytest.approx(sum(r["ttft_ms"] or 0.0 for r in rs))
            assert row.cancelled == sum(r["status"] == "cancelled" for r in rs), key
            assert row.estimated == sum(bool(r["estimated"]) for r in rs), key
        else:  # audit rows purged: the old definition, TTFT unknown
            assert row.duration_count == (len(rs) if row.duration_ms_sum > 0 else 0), key
            assert (row.ttft_count, row.ttft_ms_sum) == (0, 0.0)

    # a report into a migrated key (node '') adds onto that row
    first = KEPT[0]
    extra = dict(first, request_id="after-0005", cost_usd=0.25, duration_ms=10.0, ttft_ms=None)
    assert (await old_store.writer.write([extra])).inserted == 1
    hour = done_at(first).replace(minute=0, second=0, microsecond=0)
    day = hour.replace(hour=0)
    q = StatsQuery(day, day + timedelta(days=1), ("model",), filters={"model": (first["model"],)})
    result = await run_stats(old_store.engine, q)
    same_day = [
        r for r in KEPT if done_at(r).date() == hour.date() and r["model"] == first["model"]
    ]
    want_fig = figures([*same_day, extra])
    (group,) = result.groups
    assert group.counts["requests"] == want_fig["requests"]
    assert group.cost_usd == want_fig["cost_usd"] and isinstance(group.cost_usd, Decimal)
    assert group.duration_ms_sum / group.duration_count == pytest.approx(
        want_fig["avg_duration_ms"]
    )
