"""GET /v1/requests, /v1/requests/{id} and /v1/traces/{id}/usage on both backends, over
real loopback HTTP: keyset pages return every matching row exactly once while new reports
are written concurrently; the trace tree of a multi-level pipeline with concurrent branches
matches the reports' own parent links.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from apiexpect import cost, done_at, make_reports
from conftest import MakeClient
from helpers import wait_ready

from exporter.appkeys import STORE
from exporter.usage import UsageReport

REPORTS = make_reports(400, seed=11)


@pytest.fixture(params=["sqlite", "postgres"])
async def client(request: pytest.FixtureRequest, make_client: MakeClient) -> AsyncIterator[Any]:
    kw: dict[str, Any] = {}
    if request.param == "postgres":
        kw["database_url"] = request.getfixturevalue("pg_url")
    c = await make_client(**kw)
    await wait_ready(c)
    yield c


async def get_json(c: Any, path: str, status: int = 200, **params: Any) -> Any:
    resp = await c.get(path, params=params)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def test_pages_return_every_row_once_while_reports_arrive(client: Any) -> None:
    store = client.app[STORE]
    await store.writer.write(REPORTS)
    lo, hi = datetime(2025, 12, 31, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    matching = {r["request_id"] for r in REPORTS if r["team"] == "red" and lo <= done_at(r) < hi}
    stop = asyncio.Event()

    async def writer() -> int:
        """New reports with completion times all over the range, until the reader is done."""
        rnd, n = random.Random(5), 0
        while not stop.is_set() and n < 2000:
            batch = make_reports(20, seed=rnd.randrange(10**9), prefix=f"late{n}")
            await store.writer.write(batch)
            n += len(batch)
            await asyncio.sleep(0)
        return n

    task = asyncio.create_task(writer())
    seen: list[str] = []
    keys: list[tuple[str, str]] = []
    cursor = None
    while True:
        params = {"team": "red", "from": lo.isoformat(), "to": hi.isoformat(), "limit": 13}
        if cursor:
            params["cursor"] = cursor
        page = await get_json(client, "/v1/requests", **params)
        for row in page["requests"]:
            assert row["team"] == "red"
            assert lo <= datetime.fromisoformat(row["completed_at"]) < hi
            seen.append(row["request_id"])
            keys.append(
                (datetime.fromisoformat(row["completed_at"]).isoformat(), row["request_id"])
            )
        cursor = page["next_cursor"]
        if cursor is None:
            break
        await asyncio.sleep(0.005)  # let the writer land reports between pages
    stop.set()
    written = await task
    assert written > 0
    assert len(seen) == len(set(seen)), "a row came twice"
    assert matching <= set(seen), f"missing {sorted(matching - set(seen))[:5]}"
    assert keys == sorted(keys, reverse=True)  # newest first, strictly by the key


SHOWN = ("model", "provider", "operation", "user", "team", "api_key_id", "node", "trace_id",
         "status", "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens",
         "duration_ms", "ttft_ms")  # fmt: skip


async def test_one_request_is_the_stored_report(client: Any) -> None:
    await client.app[STORE].writer.write(REPORTS[:50])
    for r in REPORTS[:50:7]:
        row = await get_json(client, f"/v1/requests/{r['request_id']}")
        for field in SHOWN:
            assert row[field] == r[field], field
        assert (Decimal(row["cost_usd"]) if row["cost_usd"] is not None else cost(r)) == cost(r)
        assert datetime.fromisoformat(row["completed_at"]) == done_at(r)
    await get_json(client, "/v1/requests/nope", status=404)
    await get_json(client, "/v1/requests/" + "x" * 200, status=400)


async def test_bad_request_parameters_get_400(client: Any) -> None:
    for params, needle in (
        ({"cursor": "garbage!"}, "cursor"),
        ({"limit": "0"}, "from 1 to 1000"),
        ({"limit": "5000"}, "from 1 to 1000"),
        ({"colour": "x"}, "allowed:"),
        ({"from": "2026-02-01", "to": "2026-01-01"}, "after"),
        ({"from": "soon"}, "RFC 3339"),
    ):
        body = await get_json(client, "/v1/requests", status=400, **params)
        assert needle in body["error"], (params, body)


async def test_nul_and_broken_utf8_in_parameters_are_answered_not_5xx(client: Any) -> None:
    await client.app[STORE].writer.write(REPORTS[:5])
    for path, status in (
        ("/v1/requests?model=%00x&user=%ff", 200),
        ("/v1/stats?model=a%00&team=%ed%a0%80", 200),
        ("/v1/requests/a%00b", 404),
        ("/v1/traces/t%00/usage", 404),
    ):
        resp = await client.get(path)
        assert resp.status == status, (path, await resp.text())


# -- traces ---------------------------------------------------------------------------------

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def step(rid: str, parent: str, node: str, start_s: float, dur_s: float, i: int) -> dict[str, Any]:
    r = UsageReport(
        request_id=rid,
        trace_id="pipe-1",
        parent_id=parent,
        node=node,
        model="gpt-4o",
        input_tokens=100 * i + 7,
        output_tokens=10 * i + 3,
        cached_input_tokens=i,
        cost_usd=0.000123 * i + 0.01,
        started_at=T0 + timedelta(seconds=start_s),
        completed_at=T0 + timedelta(seconds=start_s + dur_s),
    )
    return dict(r.__dict__)


#: planner → (retrieve-a ‖ retrieve-b, overlapping in time) → writers → a critic under one
PIPELINE = [
    ("plan", "", "planner", 0, 2),
    ("ra", "plan", "retriever", 2, 5),
    ("rb", "plan", "retriever", 2.5, 3),
    ("wa1", "ra", "writer", 7, 1),
    ("wa2", "ra", "writer", 7.2, 1.5),
    ("wb1", "rb", "writer", 5.5, 2),
    ("crit", "wa2", "critic", 8.7, 0.4),
    ("orphan", "gone", "writer", 20, 1),  # parent never reported: a root of its own
]


def expected_tree(reports: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_id = {r["request_id"]: r for r in reports}
    kids: dict[str, list[str]] = {rid: [] for rid in by_id}
    for r in reports:
        if r["parent_id"] in by_id:
            kids[r["parent_id"]].append(r["request_id"])

    def subtree(rid: str) -> list[str]:
        out = [rid]
        for k in kids[rid]:
            out += subtree(k)
        return out

    want = {}
    for rid in by_id:
        rs = [by_id[x] for x in subtree(rid)]
        want[rid] = {
            "children": sorted(kids[rid]),
            "input_tokens": sum(r["input_tokens"] for r in rs),
            "total_tokens": sum(r["total_tokens"] for r in rs),
            "cost_usd": sum(cost({"cost_usd": r["cost_usd"]}) for r in rs),
            "duration_ms": sum(r["duration_ms"] for r in rs),
            "span_ms": (
                max(r["completed_at"] for r in rs) - min(r["started_at"] for r in rs)
            ).total_seconds()
            * 1000,
            "own_cost": cost({"cost_usd": by_id[rid]["cost_usd"]}),
        }
    return want


def walk(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out, stack = [], list(nodes)
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n["children"])
    return out


async def test_trace_tree_of_a_pipeline_with_concurrent_branches(client: Any) -> None:
    reports = [step(*row, i) for i, row in enumerate(PIPELINE, 1)]
    await client.app[STORE].writer.write(reports)
    doc = await get_json(client, "/v1/traces/pipe-1/usage")
    want = expected_tree(reports)
    assert [n["request_id"] for n in doc["tree"]] == ["plan", "orphan"]
    nodes = {n["request_id"]: n for n in walk(doc["tree"])}
    assert set(nodes) == set(want) and len(walk(doc["tree"])) == len(reports)
    for rid, w in want.items():
        n = nodes[rid]
        assert sorted(c["request_id"] for c in n["children"]) == w["children"], rid
        assert n["cumulative"]["input_tokens"] == w["input_tokens"], rid
        assert n["cumulative"]["total_tokens"] == w["total_tokens"], rid
        assert Decimal(n["cumulative"]["cost_usd"]) == w["cost_usd"], rid
        assert Decimal(n["own"]["cost_usd"]) == w["own_cost"], rid
        assert n["cumulative"]["duration_ms"] == pytest.approx(w["duration_ms"]), rid
        assert n["span_ms"] == pytest.approx(w["span_ms"]), rid
    # concurrent branches: the wall time of the plan is less than its summed durations
    assert nodes["plan"]["span_ms"] < nodes["plan"]["cumulative"]["duration_ms"]
    assert doc["requests"] == len(reports)
    assert Decimal(doc["totals"]["cost_usd"]) == sum(
        cost({"cost_usd": r["cost_usd"]}) for r in reports
    )
    per_node = {b["node"]: b for b in doc["by_node"]}
    for name in {r["node"] for r in reports}:
        mine = [r for r in reports if r["node"] == name]
        assert per_node[name]["requests"] == len(mine)
        assert per_node[name]["total_tokens"] == sum(r["total_tokens"] for r in mine)


async def test_otlp_span_ids_link_parents_and_cycles_are_cut(client: Any) -> None:
    spans = [("t9-aaaa", ""), ("t9-bbbb", "aaaa"), ("t9-cccc", "bbbb")]
    loop = [("x1", "x2"), ("x2", "x1")]  # hostile parent ids pointing at each other
    reports = [step(rid, parent, "svc", i, 1, i) | {"trace_id": "t9"}
               for i, (rid, parent) in enumerate(spans + loop, 1)]  # fmt: skip
    await client.app[STORE].writer.write(reports)
    doc = await get_json(client, "/v1/traces/t9/usage")
    nodes = walk(doc["tree"])
    assert sorted(n["request_id"] for n in nodes) == sorted(r["request_id"] for r in reports)
    root = next(n for n in doc["tree"] if n["request_id"] == "t9-aaaa")
    assert [c["request_id"] for c in root["children"]] == ["t9-bbbb"]
    assert root["cumulative"]["input_tokens"] == sum(r["input_tokens"] for r in reports[:3])
    await get_json(client, "/v1/traces/none/usage", status=404)
