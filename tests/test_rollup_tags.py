"""Promoted tags as rollup dimensions, on SQLite and a real Postgres.

Reports with varied tags (promoted keys, none, only non-promoted keys, empty values, hostile
values) go through the real service (loopback HTTP ingest, WAL, flush); `/v1/stats` grouped
and filtered by `tag:<key>` must equal an independent computation from the raw reports
(tests/apiexpect.py), the stored `dims` must equal the canonical JSON the test builds with the
stdlib `json`, and both backends must store the same `dims` for the same reports.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from apiexpect import check_stats_doc, done_at, make_reports
from conftest import MakeClient
from helpers import free_port, no_5xx, run_cli, start_service, wait_ready
from sqlalchemy import text

from exporter.appkeys import FLUSHER, STORE
from exporter.store import Store

#: Deliberately unsorted: the canonical `dims` orders keys itself.
PROMOTED = ["project", "env"]
HOSTILE = [
    "'); drop table usage_rollups; --",
    'a "quoted" \\ back\\slash',
    "line\nbreak\ttab\r\x01\x1f\x7f",
    "é 漢字 😀 \u2028\u2029 \ufeff",
    "x" * 256,  # the longest value ingest accepts
    "{}",
    '","env":"forged',
]
TAG_SETS: list[dict[str, str] | None] = [
    None,
    {},
    {"env": "prod"},
    {"env": "dev", "project": "apollo"},
    {"project": "apollo", "feature": "search"},  # a non-promoted key beside a promoted one
    {"feature": "chat", "tier": "gold"},  # only non-promoted keys
    {"env": ""},  # an empty value: the same group as no tag
    *({"env": h, "project": HOSTILE[-1 - i]} for i, h in enumerate(HOSTILE)),
]
RANGES = [
    ("2025-12-31T22:00:00Z", "2026-01-01T03:00:00Z"),  # hour rollups
    ("2025-12-30T05:00:00Z", "2026-01-02T07:00:00Z"),  # day rollups with hour edges
    ("2025-12-29T00:00:00Z", "2026-02-03T00:00:00Z"),  # whole days over two months
]


def tagged_reports(n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for r in make_reports(n, seed=seed, prefix=prefix):
        tags = rnd.choice(TAG_SETS)
        r["tags"] = None if tags is None else dict(tags)
        if r["cost_usd"] is None:  # sent, so ingest does not price it (the oracle sums costs)
            r["cost_usd"] = f"0.{rnd.randrange(10**9):010d}"
        out.append(r)
    return out


REPORTS = tagged_reports(400, seed=3, prefix="tg")


def at(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def tag_value(r: Mapping[str, Any], key: str) -> str:
    """What a report groups under for tag:<key>: its value, '' without one."""
    return str((r.get("tags") or {}).get(key) or "")


def with_tag_columns(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The reports with a `tag:<key>` field per promoted key, as apiexpect groups by fields."""
    return [{**r, **{f"tag:{k}": tag_value(r, k) for k in PROMOTED}} for r in reports]


def _no_nul(v: Any) -> Any:
    if isinstance(v, str):
        return v.replace("\x00", "\ufffd")
    if isinstance(v, dict):
        return {_no_nul(k): _no_nul(x) for k, x in v.items()}
    return [_no_nul(x) for x in v] if isinstance(v, list) else v


def canonical_dims(tags: Any) -> str:
    """The stored `dims` by the documented rule, built with the stdlib json module."""
    if not isinstance(tags, dict):
        return "{}"
    kept = {}
    for k in PROMOTED:
        v = tags.get(k)
        if v is not None and not isinstance(v, str):  # only a direct writer call sends these
            v = json.dumps(_no_nul(v), separators=(",", ":"), ensure_ascii=False)
        if v:
            kept[k] = v.replace("\x00", "\ufffd")[:256]
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_KEY = ("model", "provider", "operation", "user", "team", "api_key_id", "node")


def expected_hour_rows(reports: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, ...], int]:
    """(bucket, key columns…, dims) → requests of the hour rollups."""
    out: dict[tuple[Any, ...], int] = {}
    for r in reports:
        hour = done_at(r).replace(minute=0, second=0, microsecond=0)
        key = (hour, *(r[c] for c in _KEY), canonical_dims(r.get("tags")))
        out[key] = out.get(key, 0) + 1
    return out


async def stored_hour_rows(engine: Any) -> dict[tuple[Any, ...], int]:
    cols = ", ".join(f'"{c}"' for c in _KEY)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    f"SELECT bucket_start, {cols}, dims, requests FROM usage_rollups "
                    "WHERE granularity = 'hour'"
                )
            )
        ).all()
    out = {}
    for row in rows:
        when = row[0] if isinstance(row[0], datetime) else datetime.fromisoformat(row[0])
        out[(when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC), *row[1:-1])] = row[
            -1
        ]
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        url: str = request.getfixturevalue("pg_url")
        yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path}/usage.db"


@pytest.fixture
async def service(database_url: str, make_client: MakeClient) -> AsyncIterator[Any]:
    """A live service with promoted tags that ingested and flushed REPORTS."""
    c = await make_client(database_url=database_url, promoted_tags=PROMOTED)
    await wait_ready(c)
    for start in range(0, len(REPORTS), 100):
        resp = await c.post("/v1/usage", json=REPORTS[start : start + 100])
        body = await resp.json()
        assert resp.status == 202, body
        assert body["accepted"] == len(REPORTS[start : start + 100]), body
    while await c.app[FLUSHER].flush_once():
        pass
    yield c


async def stats(c: Any, **params: Any) -> dict[str, Any]:
    resp = await c.get("/v1/stats", params=params)
    body = await resp.json()
    assert resp.status == 200, body
    return dict(body)


async def test_group_by_and_filter_on_promoted_tags_equal_the_reports(service: Any) -> None:
    reports = with_tag_columns(REPORTS)
    for lo, hi in RANGES:
        for dims in (["tag:env", "model"], ["tag:project", "tag:env"], ["team", "tag:project"]):
            doc = await stats(service, **{"from": lo, "to": hi, "group_by": ",".join(dims)})
            check_stats_doc(doc, reports, at(lo), at(hi), dims)
    lo, hi = RANGES[2]
    cases = (("tag:project", ["apollo"]), ("tag:env", ["prod", HOSTILE[0]]), ("tag:env", [""]))
    for key, values in cases:
        params = [("from", lo), ("to", hi), ("group_by", "model")] + [(key, v) for v in values]
        resp = await service.get("/v1/stats", params=params)
        doc = await resp.json()
        assert resp.status == 200, doc
        check_stats_doc(doc, reports, at(lo), at(hi), ["model"], filters={key: values})
        assert doc["totals"][0]["requests"] > 0  # the filter matched something
    # reports without the tag (or with an empty value) are the '' group
    doc = await stats(service, **{"from": lo, "to": hi, "group_by": "tag:env"})
    none = next(g for g in doc["groups"] if g["tag:env"] == "")
    assert none["requests"] == sum(tag_value(r, "env") == "" for r in REPORTS)


def by_dims(rows: Mapping[tuple[Any, ...], int]) -> dict[tuple[datetime, str], int]:
    """(hour, dims) → requests (ingest may fill other key parts, e.g. the provider)."""
    out: dict[tuple[datetime, str], int] = {}
    for key, n in rows.items():
        out[(key[0], key[-1])] = out.get((key[0], key[-1]), 0) + n
    return out


async def test_stored_dims_are_the_canonical_json_of_the_promoted_tags(service: Any) -> None:
    stored = await stored_hour_rows(service.app[STORE].engine)
    assert by_dims(stored) == by_dims(expected_hour_rows(REPORTS))
    assert any('"env":' in k[-1] and '"project":' in k[-1] for k in stored)


async def test_a_tag_that_is_not_promoted_is_refused_naming_the_promoted_ones(
    service: Any,
) -> None:
    for params in ({"group_by": "tag:feature"}, {"tag:tier": "gold"}):
        resp = await service.get("/v1/stats", params=params)
        body = await resp.json()
        assert resp.status == 400, body
        assert "promoted tags: project, env" in body["error"], body
    # hostile values in the query string are bound, never spliced into SQL
    for value in HOSTILE:
        resp = await service.get("/v1/stats", params={"tag:env": value, "group_by": "tag:env"})
        assert resp.status == 200, await resp.text()


async def test_hostile_tags_at_ingest_get_4xx_or_are_stored_never_5xx(
    make_client: MakeClient,
) -> None:
    c = await make_client(promoted_tags=PROMOTED)
    await wait_ready(c)
    statuses = []
    bad = [
        {"env": "x" * 10_000},
        {"env": 5},
        {"it's": "a key with a quote"},
        {"env": "nul\x00inside"},
        {f"k{i}": "v" for i in range(50)},
    ]
    for i, tags in enumerate(bad):
        resp = await c.post("/v1/usage", json={"model": "m", "request_id": f"h{i}", "tags": tags})
        statuses.append(resp.status)
    no_5xx(statuses)
    assert all(400 <= s < 500 for s in statuses), statuses
    ok = [{"model": "m", "request_id": f"ok{i}", "tags": {"env": h}} for i, h in enumerate(HOSTILE)]
    resp = await c.post("/v1/usage", json=ok)
    assert resp.status == 202, await resp.text()
    await c.app[FLUSHER].flush_once()
    resp = await c.get("/v1/stats", params={"group_by": "tag:env"})
    got = {g["tag:env"]: g["requests"] for g in (await resp.json())["groups"]}
    assert got == dict.fromkeys(HOSTILE, 1)


def _direct_reports() -> list[dict[str, Any]]:
    """Reports as a direct writer caller may pass them (no ingest validation): values past
    the ingest bound, NUL, non-string values."""
    out = tagged_reports(120, seed=11, prefix="dw")
    odd: list[Any] = [
        {"env": "y" * 5000, "project": "ok"},
        {"env": "nul\x00here"},
        {"env": 7, "project": ["a"]},
        {"env": {"nested": "x"}, "project": None},
        {"env": {"deep": "nul\x00"}, "project": 1.5, "other": "nul\x00", "k\x00": "v"},
        {"env": True, "project": False, "feature": "x"},
        ["not", "an", "object"],
    ]
    for i, tags in enumerate(odd):
        out[i]["tags"] = tags
    return out


async def _write(url: str, reports: list[dict[str, Any]]) -> dict[tuple[Any, ...], int]:
    store = Store.from_url(url, promoted_tags=PROMOTED)
    try:
        await store.upgrade()
        result = await store.writer.write(reports)
        assert result.inserted == len(reports)
        return await stored_hour_rows(store.engine)
    finally:
        await store.close()


def test_both_backends_store_the_same_dims_for_the_same_reports(
    pg_url: str, tmp_path: Path
) -> None:
    reports = _direct_reports()
    on_pg = asyncio.run(_write(pg_url, reports))
    on_sqlite = asyncio.run(_write(f"sqlite+aiosqlite:///{tmp_path}/same.db", reports))
    assert on_pg == on_sqlite
    assert on_pg == expected_hour_rows(reports)
    dims = {k[-1] for k in on_pg}
    assert json.dumps({"env": "y" * 256, "project": "ok"}, separators=(",", ":")) in dims
    assert '{"env":"nul\ufffdhere"}' in dims


async def _seed_for_cli(url: str) -> None:
    store = Store.from_url(url, promoted_tags=PROMOTED)
    try:
        await store.upgrade()
        assert (await store.writer.write(REPORTS)).inserted == len(REPORTS)
    finally:
        await store.close()


def test_cli_report_groups_by_a_promoted_tag_from_the_database_and_the_service(
    database_url: str, tmp_path: Path
) -> None:
    asyncio.run(_seed_for_cli(database_url))
    lo, hi = RANGES[1]
    env = {"LLM_USAGE_PROMOTED_TAGS": json.dumps(PROMOTED), "LLM_USAGE_RETENTION_DAYS": "36500"}
    args = ["--from", lo, "--to", hi, "--group-by", "tag:env,model",
            "--filter", "tag:project=apollo", "--format", "json"]  # fmt: skip
    done = run_cli("report", "--database-url", database_url, *args, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    if database_url.startswith("sqlite"):  # the API path is the same on both backends
        port = free_port()
        serve = ["serve", "--data-dir", str(tmp_path / "data"), "--database-url", database_url,
                 "--port", str(port)]  # fmt: skip
        service = start_service(serve, tmp_path / "service.log", port=port, env=env)
        try:
            via_api = run_cli("report", "--url", service.url, *args, env=env, timeout=60)
            assert via_api.returncode == 0, via_api.stderr
            assert json.loads(via_api.stdout) == doc
        finally:
            assert service.stop() == 0, service.logs()
    check_stats_doc(
        doc,
        with_tag_columns(REPORTS),
        at(lo),
        at(hi),
        ["tag:env", "model"],
        filters={"tag:project": ["apollo"]},
    )


async def _reprice_case(url: str, price_file: Path) -> None:
    from exporter.pricing import Pricer
    from exporter.reprice import reprice

    reports = tagged_reports(150, seed=5, prefix="rp")
    for r in reports:
        r.update(model="late-model", provider="", cost_usd=None)  # unpriced when stored
    store = Store.from_url(url, promoted_tags=PROMOTED)
    try:
        await store.upgrade()
        assert (await store.writer.write(reports)).inserted == len(reports)
        result = await reprice(
            store.engine,
            Pricer(price_file),
            at("2025-01-01T00:00:00Z"),
            at("2027-01-01T00:00:00Z"),
            promoted_tags=PROMOTED,
        )
        assert result.changed == len(reports)
        async with store.engine.connect() as conn:
            details = (
                await conn.execute(
                    text("SELECT completed_at, node, tags, cost_usd FROM usage_details")
                )
            ).all()
            rollups = (
                await conn.execute(
                    text(
                        "SELECT bucket_start, node, dims, cost_usd, unpriced FROM usage_rollups "
                        "WHERE granularity = 'hour'"
                    )
                )
            ).all()
    finally:
        await store.close()
    want: dict[tuple[str, str, str], Decimal] = {}
    for when, node, tags, cost in details:
        hour = str(when)[:13]
        tags = json.loads(tags) if isinstance(tags, str) else tags
        key = (hour, node, canonical_dims(tags))
        want[key] = want.get(key, Decimal(0)) + Decimal(str(cost))
    got: dict[tuple[str, str, str], Decimal] = {}
    for when, node, dims, cost, unpriced in rollups:
        assert unpriced == 0
        key = (str(when)[:13], node, dims)
        got[key] = got.get(key, Decimal(0)) + Decimal(str(cost))
    assert got == want  # each rollup row moved by its own reports' difference, once
    assert sum(want.values()) > 0


def test_reprice_moves_each_rollup_row_of_a_node_and_tag_set_once(
    pg_url: str, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text('models:\n  - model: late-model\n    input_mtok: "3"\n    output_mtok: "9"\n')
    asyncio.run(_reprice_case(pg_url, prices))
    asyncio.run(_reprice_case(f"sqlite+aiosqlite:///{tmp_path}/reprice.db", prices))


async def _seed_in_two_settings(url: str, before: list[dict[str, Any]], after: list[Any]) -> None:
    for promoted, reports in ((["env"], before), (PROMOTED, after)):
        store = Store.from_url(url, promoted_tags=promoted)
        try:
            await store.upgrade()
            assert (await store.writer.write(reports)).inserted == len(reports)
        finally:
            await store.close()


async def test_a_newly_promoted_key_reads_empty_for_hours_flushed_before(
    database_url: str, make_client: MakeClient
) -> None:
    reports = tagged_reports(200, seed=9, prefix="pc")
    before, after = reports[:100], reports[100:]
    await _seed_in_two_settings(database_url, before, after)
    c = await make_client(database_url=database_url, promoted_tags=PROMOTED)
    await wait_ready(c)
    # `project` was not promoted when `before` was flushed: those reports are in ''
    expect = with_tag_columns(after) + [
        {**r, "tag:env": tag_value(r, "env"), "tag:project": ""} for r in before
    ]
    lo, hi = RANGES[2]
    for dims in (["tag:project"], ["tag:env", "model"]):
        # (p50/p95 come from the audit rows, which carry every tag: docs/configuration.md)
        params = {"from": lo, "to": hi, "group_by": ",".join(dims), "percentiles": "false"}
        doc = await stats(c, **params)
        check_stats_doc(doc, expect, at(lo), at(hi), dims, pct=False)
