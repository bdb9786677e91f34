"""GET /v1/stats over a month of rollups for 10M reports, on a throwaway Postgres.

Builds the rollups 10M reports would leave (`--reports` over `--days` days, `--keys` rollup
keys per hour: one per user, over 20 teams, 10 models, 400 API keys), hour rows and the day rows the
flush derives from them, all through SQL `generate_series` (no 10M-row flush needed: the
rollups are what /v1/stats reads). Then runs the real service (`python -m exporter serve`)
on that database and times, over loopback HTTP, `/v1/stats` for the whole range grouped by
team and model:

- `percentiles=false`: the rollup path (the figure the 200 ms target is about);
- the same grouped by team, model and day, and with `top=5`.

The audit table is empty here, so p50/p95 (which scan the audit rows in range) are not part
of these figures: see docs/api.md.

    python bench/stats.py                  # prints markdown
    python bench/stats.py --write-results  # ...and updates "## /v1/stats" in RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import machine_note, md_table, now_utc, our_server, replace_section
from pgcluster import start_cluster

from exporter.store import Store

START = datetime(2026, 10, 1, tzinfo=UTC)

FILL_SQL = """
INSERT INTO usage_rollups (granularity, bucket_start, model, provider, operation, "user",
    team, api_key_id, node, dims, requests, errors, input_tokens, output_tokens,
    cached_input_tokens, cache_creation_input_tokens, reasoning_tokens, cost_usd,
    duration_ms_sum, duration_count, ttft_ms_sum, ttft_count, cancelled, estimated)
SELECT 'hour', $1::timestamptz + h * interval '1 hour',
    'model-' || (k % 10), 'provider-' || (k % 3), 'chat', 'user-' || k,
    'team-' || (k % 20), 'key-' || (k % 400), '', '{}',
    n, n / 20, n * 900, n * 210, n * 300, 0, n * 10, (n * 0.0012345)::numeric(20, 10),
    n * 850.5, n, n * 120.25, n, n / 50, 0
FROM generate_series(0, $2 - 1) AS h, generate_series(0, $3 - 1) AS k,
    LATERAL (SELECT $4::bigint + CASE WHEN h * $3 + k < $5 THEN 1 ELSE 0 END AS n) AS per
"""


async def fill(url: str, reports: int, days: int, keys: int) -> tuple[int, int]:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        hours = days * 24
        base, extra = divmod(reports, hours * keys)
        async with store.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            pg: Any = raw.driver_connection
            columns = [r["attname"] for r in await pg.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'usage_rollups'::regclass "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]  # fmt: skip
            await pg.execute(FILL_SQL, START, hours, keys, base, extra)
            # day rows in the table's own column order (whatever later migrations add)
            await pg.execute(_days_sql(columns))
            await pg.execute("ANALYZE usage_rollups")
            total = await pg.fetchval(
                "SELECT sum(requests) FROM usage_rollups WHERE granularity = 'hour'"
            )
            rows = await pg.fetchval("SELECT count(*) FROM usage_rollups")
        return int(total), int(rows)
    finally:
        await store.close()


_KEY = ("model", "provider", "operation", "user", "team", "api_key_id", "node", "dims")


def _days_sql(columns: Sequence[str]) -> str:
    picks = []
    for c in columns:
        if c == "granularity":
            picks.append("'day'")
        elif c == "bucket_start":
            picks.append("date_trunc('day', bucket_start, 'UTC')")
        elif c in _KEY:
            picks.append(f'"{c}"')
        else:
            picks.append(f'sum("{c}")')
    keys = ", ".join(f'"{c}"' for c in _KEY)
    return (
        f"INSERT INTO usage_rollups SELECT {', '.join(picks)} FROM usage_rollups "
        f"WHERE granularity = 'hour' GROUP BY date_trunc('day', bucket_start, 'UTC'), {keys}"
    )


async def explain(url: str, lo: datetime, hi: datetime) -> tuple[float, str]:
    """Server-side time of the team,model statement (EXPLAIN ANALYZE, the read settings)."""
    from sqlalchemy import text

    from exporter.store.calendar import periods
    from exporter.store.readsql import Sql, bounded
    from exporter.store.stats import StatsQuery, _group_exprs, _rollup_sql

    store = Store.from_url(url)
    try:
        q = StatsQuery(lo, hi, ("team", "model"), percentiles=False)
        sql = Sql("postgresql")
        stmt = _rollup_sql(
            sql, q, periods(lo, hi, None, q.tz), _group_exprs(sql, q, "r", None, True) or [], ""
        )
        times, plan = [], ""
        for _ in range(5):
            async with bounded(store.engine, 60) as conn:
                res = await conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + stmt), sql.params)
                lines = [r[0] for r in res]
            plan = "\n".join(lines)
            times.append(float(lines[-1].split(":")[1].split()[0]))
        return statistics.median(times), plan
    finally:
        await store.close()


def timed(url: str, params: dict[str, str], runs: int) -> tuple[list[float], dict[str, Any]]:
    target = f"{url}/v1/stats?{urllib.parse.urlencode(params)}"
    times, doc = [], {}
    for i in range(runs + 2):
        began = time.perf_counter()
        with urllib.request.urlopen(target, timeout=60) as resp:  # loopback only
            body = resp.read()
        elapsed = (time.perf_counter() - began) * 1000
        doc = orjson.loads(body)
        if i >= 2:  # two warm-up calls: connection pool, plan cache
            times.append(elapsed)
    return sorted(times), doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", type=int, default=10_000_000)
    p.add_argument("--days", type=int, default=31)
    p.add_argument("--keys", type=int, default=2000, help="rollup keys per hour")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    cluster = start_cluster(fsync=False)
    try:
        db = cluster.create_database()
        url = cluster.url(db)
        began = time.perf_counter()
        total, rows = asyncio.run(fill(url, args.reports, args.days, args.keys))
        assert total == args.reports, (total, args.reports)
        print(f"filled {rows:,} rollup rows in {time.perf_counter() - began:.0f}s",
              file=sys.stderr)  # fmt: skip
        lo, hi = START, START + timedelta(days=args.days)
        rng = {"from": lo.isoformat(), "to": hi.isoformat(), "percentiles": "false"}
        cases = [
            ("team,model", {**rng, "group_by": "team,model"}),
            ("team,model,day", {**rng, "group_by": "team,model,day"}),
            ("user, top=5", {**rng, "group_by": "user", "top": "5"}),
        ]
        table = []
        with (
            tempfile.TemporaryDirectory() as tmp,
            our_server(Path(tmp), database_url=url, auto_migrate="false") as server,
        ):
            for name, params in cases:
                times, doc = timed(server.url, params, args.runs)
                assert doc["totals"][0]["requests"] == args.reports or "day" in name
                table.append([
                    name, len(doc["groups"]), f"{statistics.median(times):.1f}",
                    f"{times[int(len(times) * 0.95) - 1]:.1f}", f"{times[-1]:.1f}",
                ])  # fmt: skip
        db_ms, plan = asyncio.run(explain(url, lo, hi))
        print(plan, file=sys.stderr)
        load = os.getloadavg()[0]
    finally:
        cluster.destroy()
    body = "\n".join([
        f"`python bench/stats.py` ({now_utc()}; {machine_note()})",
        "",
        f"{args.reports:,} reports over {args.days} days as {rows:,} rollup rows "
        f"({args.keys:,} keys per hour, hour + day rows), Postgres 15, the real service over "
        f"loopback HTTP, `percentiles=false`, {args.runs} timed calls each after 2 warm-ups:",
        "",
        md_table(["/v1/stats group_by", "groups", "median ms", "p95 ms", "max ms"], table),
        "",
        f"Postgres's own time for the team,model statement (EXPLAIN ANALYZE, median of 5): "
        f"{db_ms:.1f} ms. Load average during the run: {load:.1f} on 2 cores (other jobs "
        "share the box). A 31-day range on whole UTC days reads the day rollups only "
        "(31 buckets per key, one bitmap index scan).",
    ])  # fmt: skip
    print(body)
    if args.write_results:
        replace_section("/v1/stats", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
