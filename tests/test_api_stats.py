"""GET /v1/stats on SQLite and a real Postgres, over real loopback HTTP: every figure equals an
independent computation from the reports the test stored (tests/apiexpect.py), for each
group_by, for ranges crossing hour, day, month and year boundaries, and in non-UTC zones.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient
from apiexpect import check_stats_doc, make_reports
from conftest import MakeClient
from helpers import ADMIN_TOKEN, INGEST_TOKEN, READ_TOKEN, bearer, wait_ready
from pgcluster import PgCluster

from exporter.appkeys import STORE
from exporter.store import Store

REPORTS = make_reports(700)
UTC_ZONE = ZoneInfo("UTC")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


async def _seed(url: str) -> None:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        assert (await store.writer.write(REPORTS)).inserted == len(REPORTS)
    finally:
        await store.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database per backend holding REPORTS, shared by this module's read-only tests."""
    if request.param == "postgres":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        name = cluster.create_database()
        url = cluster.url(name)
    else:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('stats')}/usage.db"
    asyncio.run(_seed(url))
    yield url
    if request.param == "postgres":
        cluster.drop_database(name)


@pytest.fixture
async def client(seeded: str, make_client: MakeClient) -> AsyncIterator[Any]:
    """A live service over the seeded database (it only reads)."""
    c = await make_client(database_url=seeded, retention_days=36500)
    await wait_ready(c)
    yield c


async def stats(c: TestClient[Any, Any], **params: Any) -> dict[str, Any]:
    resp = await c.get("/v1/stats", params=params)
    body = await resp.json()
    assert resp.status == 200, body
    return dict(body)


# (from, to): hour rollups only; day rollups with hour edges; whole days across two months
RANGES = [
    ("2025-12-31T22:00:00Z", "2026-01-01T03:00:00Z"),
    ("2025-12-30T05:00:00Z", "2026-01-02T07:00:00Z"),
    ("2025-12-29T00:00:00Z", "2026-02-03T00:00:00Z"),
]
DIMS = ["model", "user", "team", "operation", "provider", "api_key_id", "node"]


async def test_every_figure_per_group_by_equals_the_reports(client: Any) -> None:
    for lo, hi in RANGES:
        for dims in [[], *([d] for d in DIMS), ["team", "model"], ["node", "user", "provider"]]:
            doc = await stats(client, **{"from": lo, "to": hi, "group_by": ",".join(dims)})
            check_stats_doc(doc, REPORTS, at(lo), at(hi), dims)
    whole = await stats(client, **{"from": RANGES[2][0], "to": RANGES[2][1]})
    assert whole["rollups"] == ["day"]
    edges = await stats(client, **{"from": RANGES[1][0], "to": RANGES[1][1]})
    assert edges["rollups"] == ["day", "hour"]


PERIOD_CASES = [
    ("hour", "UTC", RANGES[0]),
    ("day", "UTC", RANGES[1]),
    ("week", "UTC", RANGES[2]),
    ("month", "UTC", RANGES[2]),
    ("day", "America/New_York", RANGES[2]),
    ("month", "America/New_York", RANGES[2]),
    ("hour", "Asia/Tokyo", RANGES[0]),
    ("day", "Asia/Tokyo", RANGES[1]),
    ("week", "Europe/Paris", RANGES[2]),
]


@pytest.mark.parametrize(("unit", "zone", "span"), PERIOD_CASES)
async def test_calendar_periods_in_a_time_zone_equal_the_reports(
    client: Any, unit: str, zone: str, span: tuple[str, str]
) -> None:
    lo, hi = span
    doc = await stats(client, **{"from": lo, "to": hi, "group_by": f"team,{unit}", "tz": zone})
    check_stats_doc(doc, REPORTS, at(lo), at(hi), ["team"], unit, ZoneInfo(zone))
    if zone != "UTC" and unit == "day":
        assert doc["rollups"] == ["hour"]  # local days are not UTC days
    if unit in ("week", "month"):  # whole UTC days inside, hours at the local edges
        assert doc["rollups"] == (["day"] if zone == "UTC" else ["day", "hour"])


async def test_dates_without_offset_are_midnight_in_tz(client: Any) -> None:
    zone = ZoneInfo("America/New_York")
    doc = await stats(
        client, **{"from": "2025-12-31", "to": "2026-01-02", "tz": zone.key, "group_by": "day"}
    )
    lo = datetime(2025, 12, 31, tzinfo=zone).astimezone(UTC)
    hi = datetime(2026, 1, 2, tzinfo=zone).astimezone(UTC)
    assert doc["from"] == lo.isoformat() and doc["to"] == hi.isoformat()
    check_stats_doc(doc, REPORTS, lo, hi, [], "day", zone)


async def test_top_n_folds_the_rest_into_other(client: Any) -> None:
    lo, hi = RANGES[2]
    for dims, unit, top in [
        (["user"], None, 2),
        (["team", "model"], "month", 3),
        (["node"], None, 9),
    ]:
        params = {"from": lo, "to": hi, "group_by": ",".join([*dims, *([unit] if unit else [])])}
        doc = await stats(client, **params, top=top)
        check_stats_doc(doc, REPORTS, at(lo), at(hi), dims, unit, UTC_ZONE, top=top)
        per_period: dict[Any, list[dict[str, Any]]] = {}
        for row in doc["groups"]:
            per_period.setdefault(row.get(unit) if unit else None, []).append(row)
        for rows in per_period.values():
            named = [r for r in rows if r[dims[0]] != "__other__"]
            assert len(named) <= top
            assert rows[: len(named)] == named  # __other__ comes last


async def test_filters_narrow_every_figure(client: Any) -> None:
    lo, hi = RANGES[2]
    filters = {"team": ["red"], "model": ["gpt-4o", "llama-3"]}
    params: list[tuple[str, str]] = [("from", lo), ("to", hi), ("group_by", "user,day")]
    params += [(k, v) for k, vs in filters.items() for v in vs]
    resp = await client.get("/v1/stats", params=params)
    doc = await resp.json()
    assert resp.status == 200, doc
    check_stats_doc(doc, REPORTS, at(lo), at(hi), ["user"], "day", UTC_ZONE, filters)


async def test_csv_holds_the_same_figures_as_json(client: Any) -> None:
    lo, hi = RANGES[1]
    params = {"from": lo, "to": hi, "group_by": "model,day"}
    doc = await stats(client, **params)
    for extra, headers in (({"format": "csv"}, {}), ({}, {"Accept": "text/csv"})):
        resp = await client.get("/v1/stats", params={**params, **extra}, headers=headers)
        assert resp.status == 200 and resp.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await resp.text())))
        assert len(rows) == len(doc["groups"])
        for got, want in zip(rows, doc["groups"], strict=True):
            assert got == {k: "" if v is None else str(v) for k, v in want.items()}


async def test_percentiles_are_null_past_the_audit_retention(make_client: MakeClient) -> None:
    c = await make_client(retention_days=30)
    await wait_ready(c)
    await c.app[STORE].writer.write(REPORTS)
    lo, hi = RANGES[2]
    doc = await stats(c, **{"from": lo, "to": hi, "group_by": "model"})
    assert doc["percentiles"] is False and "retention" in doc["percentiles_note"]
    check_stats_doc(doc, REPORTS, at(lo), at(hi), ["model"], pct=False)


async def test_percentiles_false_answers_from_the_rollups_alone(client: Any) -> None:
    lo, hi = RANGES[1]
    doc = await stats(client, **{"from": lo, "to": hi, "group_by": "team", "percentiles": "false"})
    assert doc["percentiles"] is False and doc["percentiles_note"] == "not asked"
    check_stats_doc(doc, REPORTS, at(lo), at(hi), ["team"], pct=False)


BAD: Sequence[tuple[dict[str, str], str]] = [
    ({"from": "yesterday"}, "RFC 3339"),
    ({"to": "2026-13-01"}, "RFC 3339"),
    ({"from": "2026-01-02", "to": "2026-01-01"}, "after"),
    ({"from": "2020-01-01", "to": "2026-01-01"}, "limited to 400 days"),
    ({"group_by": "colour"}, "allowed: model"),
    ({"group_by": "day,month"}, "one period"),
    ({"group_by": "model,model"}, "twice"),
    ({"group_by": "tag:project"}, "promoted tags"),
    ({"group_by": "tag:bad key"}, "must match"),
    ({"colour": "red"}, "unknown parameter"),
    ({"tz": "Mars/Olympus"}, "IANA"),
    ({"top": "0"}, "from 1 to 1000"),
    ({"top": "x"}, "from 1 to 1000"),
    ({"format": "xml"}, "json or csv"),
    ({"percentiles": "maybe"}, "true or false"),
    ({"from": "2026-01-01", "to": "2026-03-01", "group_by": "hour", "tz": "UTC"}, ""),
    ({"from": "2025-01-01", "to": "2026-01-31", "group_by": "hour"}, "longer period"),
    ({"from": "1999-12-31"}, "between 2000"),
    ({"model": "x" * 300}, "256 characters"),
]


async def test_bad_parameters_get_400_saying_what_is_allowed(make_client: MakeClient) -> None:
    c = await make_client()
    await wait_ready(c)
    for params, needle in BAD:
        resp = await c.get("/v1/stats", params=params)
        body = await resp.json()
        if not needle:  # a valid request among the bad ones: the checks are not over-eager
            assert resp.status == 200, body
            continue
        assert resp.status == 400, (params, body)
        assert needle in body["error"], (params, body)


async def test_stats_need_the_read_scope(make_client: MakeClient) -> None:
    c = await make_client(with_tokens=True)
    await wait_ready(c)
    assert (await c.get("/v1/stats")).status == 401
    assert (await c.get("/v1/stats", headers=bearer(INGEST_TOKEN))).status == 403
    for token in (READ_TOKEN, ADMIN_TOKEN):
        assert (await c.get("/v1/stats", headers=bearer(token))).status == 200
