"""The embedded (SQLite) flush's CPU per report, in-process: `StoreWriter.write_payloads`.

WAL records as ingest writes them (`--record` validated reports each, orjson of the
UsageReport fields, priced), written in transactions of `--batch` reports into a fresh
migrated SQLite file: first into an empty table, then a second batch onto the filled one.
CPU time of the whole process (the worker thread that binds rows and aiosqlite's thread that
runs the statements included), best of `--rounds`: on a shared box wall time is noise, CPU
time much less so. Compare two trees by running this script with each on PYTHONPATH (from a
directory holding neither, so the path decides which `exporter` is imported).

    python bench/sqlite_flush.py --reports 50000 --rounds 3
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
from common import report

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


async def one_round(n: int, record: int) -> tuple[float, float]:
    """(CPU µs/report into an empty table, onto a table holding one batch already)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-sqlite-flush-"))
    store = Store.from_url(f"sqlite+aiosqlite:///{workdir}/usage.db")
    try:
        await store.upgrade()
        figures = []
        for tag in ("a", "b"):
            batch = payloads(n, record, tag)
            started = time.process_time()
            result = await store.writer.write_payloads(batch)
            figures.append((time.process_time() - started) / n * 1e6)
            assert result.inserted == n, (result.inserted, n)
        return figures[0], figures[1]
    finally:
        await store.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", type=int, default=50_000, help="reports per transaction")
    p.add_argument("--record", type=int, default=100, help="reports per WAL record")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    runs = [asyncio.run(one_round(args.reports, args.record)) for _ in range(args.rounds)]
    empty, filled = min(r[0] for r in runs), min(r[1] for r in runs)
    print(
        f"{Path(exporter.__file__).parent.parent}: SQLite flush of {args.reports:,} reports, "
        f"CPU µs/report (best of {args.rounds}): empty table {empty:.1f}, "
        f"filled table {filled:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
