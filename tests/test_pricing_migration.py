"""Migration 0004_pricing on a database holding 0001-era rows, both backends: unpriced rows (cost 0
with tokens) become NULL with a reason, and each rollup row's `unpriced` counts its details."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from exporter.store import Store
from exporter.store.migrate import head_revision
from exporter.store.tables import usage_details, usage_rollups

BASE = datetime(2026, 3, 1, 10, 15, tzinfo=UTC)
# (request_id, model, user, input, output, cost, minutes after BASE)
OLD_ROWS = [
    ("a", "mystery", "ann", 100, 10, "0", 0),  # unpriced before 0002: cost 0 with tokens
    ("b", "mystery", "ann", 200, 0, "0", 5),
    ("c", "mystery", "bob", 0, 0, "0", 7),  # no tokens: a real zero
    ("d", "gpt-4o", "ann", 100, 10, "0.5", 9),
    ("e", "mystery", "ann", 1, 1, "0", 60 * 26),  # another hour and day
]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite+aiosqlite:///{tmp_path / 'old.sqlite'}"


def _ts(dt: datetime, sqlite: bool) -> Any:
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else dt


async def test_old_unpriced_rows_become_null_and_rollups_count_them(url: str) -> None:
    store = Store.from_url(url)
    try:
        assert await store.upgrade("0001") == "0001"
        sqlite = store.backend == "sqlite"
        rollups: dict[tuple[Any, ...], list[Any]] = {}
        async with store.engine.begin() as conn:
            for rid, model, user, inp, out, cost, minutes in OLD_ROWS:
                at = BASE + timedelta(minutes=minutes)
                await conn.execute(
                    text(
                        'INSERT INTO usage_details (request_id, model, operation, "user", '
                        "input_tokens, output_tokens, cost_usd, status, completed_at) VALUES "
                        "(:rid, :model, 'chat', :user, :inp, :out, :cost, 'success', :at)"
                    ),
                    {"rid": rid, "model": model, "user": user, "inp": inp, "out": out,
                     "cost": cost if sqlite else Decimal(cost), "at": _ts(at, sqlite)},
                )  # fmt: skip
                hour = at.replace(minute=0, second=0, microsecond=0)
                for g, bucket in (("hour", hour), ("day", hour.replace(hour=0))):
                    acc = rollups.setdefault((g, bucket, model, user), [0, Decimal(0)])
                    acc[0] += 1
                    acc[1] += Decimal(cost)
            for (g, bucket, model, user), (n, cost) in rollups.items():
                await conn.execute(
                    text(
                        "INSERT INTO usage_rollups (granularity, bucket_start, model, provider, "
                        'operation, "user", team, api_key_id, requests, cost_usd) VALUES '
                        "(:g, :b, :model, '', 'chat', :user, '', '', :n, :cost)"
                    ),
                    {"g": g, "b": _ts(bucket, sqlite), "model": model, "user": user, "n": n,
                     "cost": str(cost) if sqlite else cost},
                )  # fmt: skip

        assert await store.upgrade() == head_revision()

        want_null = {r[0] for r in OLD_ROWS if r[5] == "0" and r[3] + r[4] > 0}
        want_unpriced: Counter[tuple[Any, ...]] = Counter()
        for rid, model, user, *_, minutes in OLD_ROWS:
            if rid in want_null:
                hour = (BASE + timedelta(minutes=minutes)).replace(minute=0)
                want_unpriced[("hour", hour, model, user)] += 1
                want_unpriced[("day", hour.replace(hour=0), model, user)] += 1
        d, r = usage_details.c, usage_rollups.c
        async with store.engine.connect() as conn:
            details = {
                row.request_id: row
                for row in await conn.execute(
                    select(d.request_id, d.cost_usd, d.unpriced_reason, d.cost_sent)
                )
            }
            got = {
                (row.granularity, row.bucket_start, row.model, row.user): row.unpriced
                for row in await conn.execute(
                    select(r.granularity, r.bucket_start, r.model, r.user, r.unpriced)
                )
            }
        assert {rid for rid, row in details.items() if row.cost_usd is None} == want_null
        assert all(details[rid].unpriced_reason == "unknown_model" for rid in want_null)
        assert details["c"].cost_usd == 0 and details["d"].cost_usd == Decimal("0.5")
        assert not any(row.cost_sent for row in details.values())
        assert {k: v for k, v in got.items() if v} == dict(want_unpriced)
        assert set(got) == set(rollups)
    finally:
        await store.close()
