"""Expected storage contents, computed independently of exporter.store, and the check.

`assert_stored_exactly(store, reports)`: the details hold exactly the distinct request_ids
sent (first occurrence wins) and the hour and day rollups equal, key by key, the aggregates of
those reports computed here in plain Python with exact Decimal costs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from types import FrameType
from typing import Any

import orjson
import pytest
import storequeries as queries
from storequeries import Totals

from exporter.money import json_default
from exporter.store import Store
from exporter.usage import Operation, Status, UsageReport

BASE = datetime(2026, 3, 1, 21, 0, tzinfo=UTC)  # a few hours before a day boundary
Q = Decimal("1e-10")


def report(i: int, **overrides: Any) -> dict[str, Any]:
    """A validated report as ingest writes it into the WAL (orjson of UsageReport fields)."""
    fields: dict[str, Any] = {
        "request_id": f"req-{i}",
        "model": ["gpt-4o", "claude-sonnet", "llama"][i % 3],
        "provider": ["openai", "anthropic", ""][i % 3],
        "operation": Operation.CHAT if i % 4 else Operation.EMBEDDING,
        "user": ["alice", "bob", ""][i % 3],
        "team": ["red", ""][i % 2],
        "api_key_id": ["key-1", "key-2", ""][i % 3],
        "trace_id": f"trace-{i % 5}",
        "input_tokens": 100 + i,
        "output_tokens": 10 + i % 7,
        "cached_input_tokens": i % 50,
        "reasoning_tokens": i % 3,
        "status": Status.ERROR if i % 11 == 0 else Status.SUCCESS,
        "completed_at": BASE + timedelta(minutes=17 * i),
        "duration_ms": float(i % 100),
        "cost_usd": round(0.000123 * (i + 1), 9),
    }
    fields.update(overrides)
    r = UsageReport(**fields)
    return dict(orjson.loads(orjson.dumps(r.__dict__, default=json_default)))


def exact_cost(value: Any) -> Decimal:
    if value is None:
        return Decimal(0).quantize(Q)
    # the documented rule (docs/pricing.md): exact decimal text, half-even at 1e-10
    text = repr(value) if isinstance(value, float) else str(value)
    return Decimal(text).quantize(Q, rounding=ROUND_HALF_EVEN)


def distinct(reports: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """First occurrence of each request_id wins, as in the database."""
    first: dict[str, Mapping[str, Any]] = {}
    for r in reports:
        first.setdefault(r["request_id"], r)
    return list(first.values())


def _totals(rs: Sequence[Mapping[str, Any]]) -> Totals:
    return Totals(
        requests=len(rs),
        errors=sum(r["status"] != "success" for r in rs),
        input_tokens=sum(r["input_tokens"] for r in rs),
        output_tokens=sum(r["output_tokens"] for r in rs),
        cached_input_tokens=sum(r["cached_input_tokens"] for r in rs),
        cache_creation_input_tokens=sum(r["cache_creation_input_tokens"] for r in rs),
        reasoning_tokens=sum(r["reasoning_tokens"] for r in rs),
        cost_usd=sum((exact_cost(r["cost_usd"]) for r in rs), Decimal(0).quantize(Q)),
        duration_ms_sum=sum(r["duration_ms"] or 0.0 for r in rs),
        unpriced=sum(r["cost_usd"] is None for r in rs),
    )


def expected_rollups(reports: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, ...], Totals]:
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in distinct(reports):
        done = datetime.fromisoformat(r["completed_at"]).astimezone(UTC)
        dims = (*(r[k] for k in ("model", "provider", "operation", "user", "team",
                                 "api_key_id", "node")), "{}")  # fmt: skip
        hour = done.replace(minute=0, second=0, microsecond=0)
        groups.setdefault(("hour", hour, *dims), []).append(r)
        groups.setdefault(("day", hour.replace(hour=0), *dims), []).append(r)
    return {k: _totals(v) for k, v in groups.items()}


async def assert_stored_exactly(s: Store, reports: Iterable[Mapping[str, Any]]) -> None:
    """Details and both rollup granularities hold exactly the distinct reports."""
    reports = list(reports)
    want_rows = expected_rollups(reports)
    got_rows = await queries.rollup_rows(s.engine)
    assert {k: v.exact() for k, v in got_rows.items()} == {
        k: v.exact() for k, v in want_rows.items()
    }
    for k, v in want_rows.items():
        assert got_rows[k].duration_ms_sum == pytest.approx(v.duration_ms_sum)
    want = _totals(distinct(reports))
    assert sorted(await queries.request_ids(s.engine)) == sorted(
        r["request_id"] for r in distinct(reports)
    )
    for got in (
        await queries.detail_totals(s.engine),
        await queries.rollup_totals(s.engine, "hour"),
        await queries.rollup_totals(s.engine, "day"),
    ):
        assert got.exact() == want.exact()
        assert got.duration_ms_sum == pytest.approx(want.duration_ms_sum)


async def write_watching_the_loop(
    store: Store, reports: Sequence[Mapping[str, Any]]
) -> tuple[set[str], Any]:
    """Write `reports` as WAL records of 100 plus a replay of the first record, with a
    profiler on this thread (the event loop's): the names of the store functions called on
    the loop, and the write's result. Both flushes' off-loop tests use it."""
    payloads = [orjson.dumps(list(reports[i : i + 100])) for i in range(0, len(reports), 100)]
    payloads.append(payloads[0])  # a replayed record in the same batch
    on_loop: set[str] = set()

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call" and "/exporter/store/" in frame.f_code.co_filename:
            on_loop.add(frame.f_code.co_name)

    sys.setprofile(profile)  # this thread only
    try:
        result = await store.writer.write_payloads(payloads)
    finally:
        sys.setprofile(None)
    assert on_loop, "the profiler saw the write start on the loop"
    return on_loop, result
