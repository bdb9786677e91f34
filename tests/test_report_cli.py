"""`llm-usage-exporter report` as a real subprocess of the console script: straight against
SQLite and Postgres, and against a running service with a read token. Every figure equals the
independent computation from the stored reports; bad input exits 2 with the reason.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apiexpect import check_stats_doc, figures, make_reports
from helpers import READ_TOKEN, clean_env, cli_command, free_port, start_service

from exporter.store import Store

REPORTS = make_reports(300, seed=21)
LO, HI = "2025-12-30T00:00:00Z", "2026-02-02T00:00:00Z"


def run_report(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli_command(), "report", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"COLUMNS": "200", **(env or {})}),
        check=False,
    )


async def seed(url: str) -> None:
    store = Store.from_url(url)
    try:
        await store.upgrade()
        assert (await store.writer.write(REPORTS)).inserted == len(REPORTS)
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        url: str = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/usage.db"
    asyncio.run(seed(url))
    yield url


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def report_json(*args: str, **kw: Any) -> dict[str, Any]:
    done = run_report(*args, "--format", "json", **kw)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


CASES: Sequence[tuple[Sequence[str], str | None, str]] = [
    (["team", "model"], None, "UTC"),
    (["user"], "day", "America/New_York"),
    (["node"], "month", "Asia/Tokyo"),
]


def test_report_from_the_database_equals_the_reports(database_url: str) -> None:
    # the SQL is the API's (tested per group_by there): one case on Postgres keeps this fast
    for dims, unit, zone in CASES if database_url.startswith("sqlite") else CASES[1:2]:
        group_by = ",".join([*dims, *([unit] if unit else [])])
        args = ["--database-url", database_url, "--from", LO, "--to", HI, "--tz", zone]
        doc = report_json(*args, "--group-by", group_by)
        check_stats_doc(doc, REPORTS, at(LO), at(HI), dims, unit, ZoneInfo(zone))
        if unit != "day":
            continue
        done = run_report(*args, "--group-by", group_by, "--format", "csv")
        assert done.returncode == 0, done.stderr
        rows = list(csv.DictReader(io.StringIO(done.stdout)))
        assert rows == [
            {k: "" if v is None else str(v) for k, v in g.items()} for g in doc["groups"]
        ]


def test_report_table_has_every_group_and_a_totals_row(tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path}/usage.db"  # rendering: one backend is enough
    asyncio.run(seed(database_url))
    done = run_report("--database-url", database_url, "--from", LO, "--to", HI,
                      "--group-by", "team,model")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("│")]
    kept = [r for r in REPORTS if at(LO) <= at(r["completed_at"]) < at(HI)]
    want = figures(kept)
    total = next(ln for ln in lines if "TOTAL" in ln)
    cells = [c.strip() for c in total.strip("│").split("│")]
    assert cells[2] == f"{want['requests']:,}"
    assert cells[3] == f"{want['success_rate']:.2%}"
    assert cells[6] == f"{want['total_tokens']:,}"
    assert Decimal(cells[7]) == want["cost_usd"]
    groups = {(r["team"], r["model"]) for r in kept}
    assert len(lines) == len(groups) + 1  # groups, then the totals


def test_report_through_the_service_matches_the_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/usage.db"
    asyncio.run(seed(url))
    port = free_port()
    tokens = json.dumps([{"name": "grafana", "token": READ_TOKEN, "scopes": ["read"]}])
    service = start_service(
        ["serve", "--data-dir", str(tmp_path / "data"), "--database-url", url, "--port", str(port)],
        tmp_path / "service.log",
        port=port,
        env={"LLM_USAGE_TOKENS": tokens},
    )
    try:
        args = ["--from", LO, "--to", HI, "--group-by", "provider,week", "--top", "2"]
        via_api = report_json("--url", service.url, "--token", READ_TOKEN, *args)
        via_db = report_json("--database-url", url, *args)
        assert via_api == via_db
        check_stats_doc(via_api, REPORTS, at(LO), at(HI), ["provider"], "week", top=2)
        refused = run_report("--url", service.url, "--token", "wrong-token-0123456789", *args)
        assert refused.returncode == 2 and "bearer token" in refused.stderr
        bad = run_report("--url", service.url, "--token", READ_TOKEN, "--group-by", "colour")
        assert bad.returncode == 2 and "unknown group_by 'colour'" in bad.stderr
    finally:
        assert service.stop() == 0, service.logs()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--from", "last tuesday"], "is not a date"),
        (["--filter", "team"], "KEY=VALUE"),
        (["--format", "xml"], "invalid choice"),
    ],
)
def test_report_bad_input_exits_2_with_the_reason(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    done = run_report("--database-url", f"sqlite+aiosqlite:///{tmp_path}/u.db", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert needle in done.stderr


def test_report_on_an_unreachable_service_exits_1() -> None:
    done = run_report("--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "cannot reach" in done.stderr
