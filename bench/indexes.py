"""What each usage_details index costs the flush, on a throwaway Postgres.

For each index set, a fresh database gets `--batches` flushes of `--batch` new reports
through the real `StoreWriter` (COPY + one statement per flush, as the service runs it), the sets
taking turns; the figure is the median reports/s of the flushes after the first. The sets:
the indexes the read API uses (completed_at, trace_id), each one dropped, the two
per-user/per-team indexes 0005 removed added back, trace_id as a partial index and completed_at
as BRIN.

    python bench/indexes.py                   # prints markdown
    python bench/indexes.py --write-results   # ...and updates "## Detail indexes" in RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import machine_note, md_table, now_utc, replace_section
from common import report as bench_report
from flush import cluster_cpu
from pgcluster import PgCluster, start_cluster

from exporter.store import Store

KEPT = ("ix_usage_details_completed_at", "ix_usage_details_trace_id")
EXTRA = {
    "ix_usage_details_user_completed_at": '("user", completed_at)',
    "ix_usage_details_team_completed_at": "(team, completed_at)",
    "ix_usage_details_trace_id_partial": "(trace_id) WHERE trace_id <> ''",
    "ix_usage_details_completed_at_brin": "USING brin (completed_at)",
}
SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (indexes to drop, extra indexes to create)
    "read API set (completed_at, trace_id)": ((), ()),
    "without trace_id": (("ix_usage_details_trace_id",), ()),
    "without completed_at": (("ix_usage_details_completed_at",), ()),
    "none (primary key only)": (KEPT, ()),
    "+ (user, completed_at), (team, completed_at) (before 0005)": ((), tuple(EXTRA)),
    "trace_id partial (WHERE trace_id <> '')": (
        ("ix_usage_details_trace_id",),
        ("ix_usage_details_trace_id_partial",),
    ),
    "completed_at as BRIN (no order: /v1/requests and retention need one)": (
        ("ix_usage_details_completed_at",),
        ("ix_usage_details_completed_at_brin",),
    ),
}


async def run_sets(cluster: PgCluster, batch: int, batches: int) -> dict[str, tuple[float, float]]:
    """(median reports/s, median Postgres CPU µs/report) per set; the sets take turns batch
    by batch, so load from other jobs on the box hits them alike."""
    stores: dict[str, Store] = {}
    names: list[str] = []
    try:
        for name, (drop, add) in SETS.items():
            db = cluster.create_database()
            names.append(db)
            store = stores[name] = Store.from_url(cluster.url(db))
            await store.upgrade()
            async with store.engine.begin() as conn:
                for index in drop:
                    await conn.exec_driver_sql(f"DROP INDEX {index}")
                for index in add:
                    await conn.exec_driver_sql(
                        f"CREATE INDEX {index} ON usage_details {EXTRA[index]}"
                    )
        rates: dict[str, list[float]] = {name: [] for name in SETS}
        cpus: dict[str, list[float]] = {name: [] for name in SETS}
        for b in range(batches):
            # half the reports belong to a trace of 4 calls, as from an agent pipeline
            payload = orjson.dumps(
                [
                    {**bench_report(i, f"b{b}-{i}"), "trace_id": f"t-{i // 4}" if i % 2 else ""}
                    for i in range(b * batch, (b + 1) * batch)
                ]
            )
            for name, store in stores.items():
                cpu0, began = cluster_cpu(cluster), time.perf_counter()
                result = await store.writer.write_payloads([payload])
                elapsed = time.perf_counter() - began
                assert result.inserted == batch
                if b:  # the first flush warms caches and plans
                    rates[name].append(batch / elapsed)
                    cpus[name].append((cluster_cpu(cluster) - cpu0) / batch * 1e6)
        return {
            name: (statistics.median(rates[name]), statistics.median(cpus[name])) for name in SETS
        }
    finally:
        for store in stores.values():
            await store.close()
        for db in names:
            cluster.drop_database(db)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=20_000)
    p.add_argument("--batches", type=int, default=9)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    cluster = start_cluster(fsync=False)
    rows = []
    try:
        medians = asyncio.run(run_sets(cluster, args.batch, args.batches))
        base, base_cpu = next(iter(medians.values()))
        for name, (rate, cpu) in medians.items():
            rows.append([name, f"{rate:,.0f}", f"{rate / base:.2f}", f"{cpu:.1f}",
                         f"{cpu - base_cpu:+.1f}"])  # fmt: skip
    finally:
        cluster.destroy()
    body = "\n".join([
        f"`python bench/indexes.py` ({now_utc()}; {machine_note()})",
        "",
        f"Flush throughput into usage_details + rollups per index set ({args.batches} flushes "
        f"of {args.batch:,} new reports each into a growing table, the sets taking turns, "
        "median of all but the first; Postgres 15, fsync off; *Postgres CPU* is the whole "
        "cluster's, less noisy than wall time on a shared box):",
        "",
        md_table(["usage_details indexes", "reports/s", "vs read API set",
                  "Postgres CPU µs/report", "vs read API set"], rows),
    ])  # fmt: skip
    print(body)
    if args.write_results:
        replace_section("Detail indexes", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
