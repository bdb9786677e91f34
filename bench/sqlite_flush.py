"""The embedded (SQLite) flush's CPU per report, in-process: `StoreWriter.write_payloads`.

WAL records as ingest writes them (`--record` validated reports each, orjson of the
UsageReport fields, priced), written in transactions of `--batch` reports into a fresh
migrated SQLite file: first into an empty table, then a second batch onto the filled one.
CPU time of the whole process (the worker thread that binds rows and aiosqlite's thread that
runs the statements included), best of `--rounds`: on a shared box wall time is noise, CPU
time much less so. Compare two trees by running this script with each on PYTHONPATH (from a
directory holding neither, so the path decides which `exporter` is imported).

    python bench/sqlite_flush.py --reports 50000 --rounds 3
    python bench/sqlite_flush.py --reports 50000 --rounds 3 --process   # in the flush process:
        # this process's CPU and the child's (store/flush_process.py), after a warm-up write
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
from common import proc_cpu_seconds, report

import exporter
from exporter.ingest.pipeline import Ingestor
from exporter.money import json_default
from exporter.pricing import Pricer
from exporter.store import Store


def payloads(n: int, record: int, tag: str) -> list[bytes]:
    """WAL record payloads of `n` validated, priced reports (as `Ingestor` writes them)."""
    ingestor = Ingestor.__new__(Ingestor)  # validate_batch needs only these settings
    ingestor._pricer = Pricer(None)
    ingestor._bytes_per_token, ingestor._tokens_per_chunk = 4.0, 1.0
    ingestor._user_attributes, ingestor._max_age, ingestor._max_skew = (), None, None
    now = datetime.now(UTC)
    out = []
    for start in range(0, n, record):
        items = [report(i, f"{tag}-{i}") for i in range(start, min(n, start + record))]
        reports, errors = ingestor.validate_batch(items, None, now)
        assert not errors, errors
        out.append(orjson.dumps([r.__dict__ for r in reports], default=json_default))
    return out


def _child_cpu(store: Store) -> float:
    process = getattr(store.writer, "process", None)
    pid = None if process is None else process.pid
    return 0.0 if pid is None else proc_cpu_seconds(pid)


async def one_round(n: int, record: int, in_child: bool) -> list[float]:
    """CPU µs/report [into an empty table, onto a table holding one batch already], and with
    `in_child` the flush process's beside them: [parent empty, parent filled, child empty,
    child filled]."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-sqlite-flush-"))
    url = f"sqlite+aiosqlite:///{workdir}/usage.db"
    store = Store.from_url(url, flush_process=True) if in_child else Store.from_url(url)
    try:
        await store.upgrade()
        if in_child:  # start the child (its imports are not the flush's CPU)
            await store.writer.write_payloads(payloads(1, 1, "warm"))
        figures, child = [], []
        for tag in ("a", "b"):
            batch = payloads(n, record, tag)
            started, child0 = time.process_time(), _child_cpu(store)
            result = await store.writer.write_payloads(batch)
            figures.append((time.process_time() - started) / n * 1e6)
            child.append((_child_cpu(store) - child0) / n * 1e6)
            assert result.inserted == n, (result.inserted, n)
        return figures + child if in_child else figures
    finally:
        await store.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", type=int, default=50_000, help="reports per transaction")
    p.add_argument("--record", type=int, default=100, help="reports per WAL record")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--process", action="store_true", help="flush in the SQLite flush process")
    args = p.parse_args(argv)
    runs = [asyncio.run(one_round(args.reports, args.record, args.process))
            for _ in range(args.rounds)]  # fmt: skip
    best = [min(r[i] for r in runs) for i in range(len(runs[0]))]
    where = "in the flush process; this process" if args.process else "in process"
    print(
        f"{Path(exporter.__file__).parent.parent}: SQLite flush of {args.reports:,} reports "
        f"{where}, CPU µs/report (best of {args.rounds}): empty table {best[0]:.1f}, "
        f"filled table {best[1]:.1f}"
        + (f"; the child: empty {best[2]:.1f}, filled {best[3]:.1f}" if args.process else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
