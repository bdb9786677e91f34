"""The embedded (SQLite) flush does its per-report work off the event loop.

A profiler hook on the event loop's thread records every Python function called there while a
batch is written; none of the per-report functions of the write (decoding, row preparation,
parameter binding, the RETURNING fetch, aggregation) may be among them. The stored result is
then checked against totals computed here from the raw reports.
"""

from __future__ import annotations

from pathlib import Path

from storecheck import assert_stored_exactly, report, write_watching_the_loop

from exporter.store import Store

PER_REPORT = {"prepare", "prepare_params", "_fast", "bind_row", "_flat", "_rollup_row",
              "add_payload", "sorted_rows", "_params", "_write_rows", "aggregate",
              "sqlite_timestamp", "_money_text", "_json_text", "decimal_text",
              "checked_values", "micro_text"}  # fmt: skip


async def test_sqlite_flush_runs_no_per_report_work_on_the_event_loop(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/usage.db")
    await store.upgrade()
    reports = [report(i) for i in range(3000)]
    try:
        on_loop, result = await write_watching_the_loop(store, reports)
        assert not on_loop & PER_REPORT, sorted(on_loop & PER_REPORT)
        assert (result.received, result.inserted) == (len(reports) + 100, len(reports))
        await assert_stored_exactly(store, reports)
    finally:
        await store.close()
