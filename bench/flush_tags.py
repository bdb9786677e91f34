"""What promoted tags cost the Postgres flush: the same reports, with and without `dims`.

The data of bench/flush.py (`--reports` reports over `--keys` keys in one hour), each report
carrying tags (`env`, `project`, `feature`, `region`; see `tagged`), flushed through `StoreWriter`
in transactions of `--batch` reports into a fresh database per run, on one throwaway cluster:
promoted_tags none, (env, project), and five keys. Runs alternate, `--rounds` times each; the
table gives the median wall time and Postgres CPU time (steadier on a shared box), and their
ratios to no promoted tags.

    python bench/flush_tags.py             # the cost of computing dims (tags follow the key)
    python bench/flush_tags.py --spread    # ...plus the cost of the rollup rows tags add
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
from common import fmt_int, md_table
from flush import cluster_cpu, make_payloads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgcluster import PgCluster, start_cluster

from exporter.store import Store

CONFIGS: dict[str, tuple[str, ...]] = {
    "no promoted tags": (),
    "promoted: env, project": ("env", "project"),
    "promoted: 5 keys": ("env", "project", "feature", "region", "tier"),
}


def tagged(payloads: Sequence[bytes], spread: bool) -> list[bytes]:
    """The reports with tags: by default a function of the rollup key (model, user), so
    promoting them adds no rollup rows and the difference is the cost of computing `dims`;
    `spread`: independent of the key (each promoted key multiplies the rollup rows)."""
    out = []
    for p in payloads:
        reports = orjson.loads(p)
        for i, r in enumerate(reports):
            n = i if spread else int(r["user"].rsplit("-", 1)[1]) + int(r["model"].rsplit("-")[1])
            r["tags"] = {"env": ("prod", "dev", "staging")[n % 3], "project": f"p{n % 17}",
                         "feature": f"f{n % 5}", "region": f"eu-{n % 2}"}  # fmt: skip
        out.append(orjson.dumps(reports))
    return out


async def one_run(
    cluster: PgCluster, promoted: tuple[str, ...], payloads: list[bytes], batch: int
) -> tuple[float, float]:
    """(wall seconds, Postgres CPU seconds) of flushing `payloads` into a fresh database."""
    db = cluster.create_database()
    store = Store.from_url(cluster.url(db), promoted_tags=promoted)
    try:
        await store.upgrade()
        await store.ping()
        per = max(1, batch // max(1, len(orjson.loads(payloads[0]))))
        cpu, start = cluster_cpu(cluster), time.perf_counter()
        for i in range(0, len(payloads), per):
            await store.writer.write_payloads(payloads[i : i + per])
        return time.perf_counter() - start, cluster_cpu(cluster) - cpu
    finally:
        await store.close()
        cluster.drop_database(db)


async def bench(args: argparse.Namespace) -> str:
    payloads = tagged(make_payloads(args.reports, args.keys, args.record), args.spread)
    cluster = start_cluster(fsync=args.fsync)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpus: dict[str, list[float]] = {name: [] for name in CONFIGS}
    try:
        for rnd in range(args.rounds):
            order = list(CONFIGS.items())
            for name, promoted in order[rnd % len(order) :] + order[: rnd % len(order)]:
                wall, cpu = await one_run(cluster, promoted, payloads, args.batch)
                times[name].append(wall)
                cpus[name].append(cpu)
                print(f"round {rnd}: {name}: {wall:.2f}s, server CPU {cpu:.2f}s", file=sys.stderr)
    finally:
        cluster.destroy()
    med = statistics.median
    base, base_cpu = med(times["no promoted tags"]), med(cpus["no promoted tags"])
    rows = [
        [name, fmt_int(args.reports), f"{med(t):.2f}", fmt_int(args.reports / med(t)),
         f"{med(t) / base:.2f}×", f"{med(cpus[name]):.2f}", f"{med(cpus[name]) / base_cpu:.2f}×"]
        for name, t in times.items()
    ]  # fmt: skip
    head = [
        "promoted_tags",
        "reports",
        "median s",
        "reports/s",
        "vs none",
        "server CPU s",
        "vs none",
    ]
    return md_table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--record", type=int, default=100, help="reports per WAL record")
    p.add_argument("--batch", type=int, default=50_000, help="reports per transaction")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--spread", action="store_true", help="tags independent of the rollup key")
    print(asyncio.run(bench(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
