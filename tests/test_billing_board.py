"""The Grafana billing board's SQL against the real schema, filled by the real writer.

Each database test gets a fresh database on the throwaway Postgres 15 cluster (`pg_url`), runs
the Alembic migrations (`Store.upgrade`) and stores a varied set of `UsageReport`s through the
exactly-once writer (`Store.write`), which builds the hour and day rollups the board reads.
Then every billing query and variable query of `dashboards/generate.py` runs, with the
Grafana macros and variables expanded the way Grafana's Postgres data source does, and its
rows are compared with figures computed here, independently, from the reports that were sent.

Queries run in a session time zone west of UTC (America/New_York): the board must not depend
on it, and day buckets at 00:00 UTC fall on the previous local day there.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
from helpers import load_dashboard_generator

from exporter.store import Store
from exporter.store.migrate import head_revision
from exporter.store.tables import usage_rollups
from exporter.usage import UsageReport

ROOT = Path(__file__).resolve().parent.parent


gen = load_dashboard_generator()

BOARD = "llm-billing"
#: The range the board is queried with: two whole UTC months (2024 is a leap year).
START, END = "2024-01-01T00:00:00Z", "2024-02-29T23:59:59Z"
FIRST_DAY, LAST_DAY = date(2024, 1, 1), date(2024, 2, 29)
SESSION_TIME_ZONE = "America/New_York"
TOP = 20  # the per-user and per-model panels show the top 20 keys, the rest as '(other)'
QUANTUM = Decimal("1e-10")  # usage_rollups.cost_usd is NUMERIC(20,10)

TOTALS = {
    "Spend in range (USD)",
    "Requests in range",
    "Tokens in range (input + output)",
    "Cached input tokens in range",
}
PANELS = TOTALS | {
    "variable team",
    "variable user",
    "variable model",
    "Spend per day by team (USD)",
    "Spend per day by user (USD)",
    "Spend per day by model (USD)",
    "Spend per month by team (USD)",
    "Spend per month by user (USD)",
    "Spend per month by model (USD)",
    "Monthly usage by team, user and model",
    "Daily usage by team, user and model",
}


def billing_queries() -> dict[str, str]:
    """{panel title or 'variable <name>': SQL} of the billing board, one query each."""
    queries = [(title, sql) for uid, title, sql in gen.postgres_queries() if uid == BOARD]
    out = dict(queries)
    assert len(out) == len(queries), "two billing queries share a title"
    return out


# -- the reports ------------------------------------------------------------------------------

#: (team, user, model, provider, operation) of the regular callers; '' means absent.
CALLERS = (
    ("team-a", "alice", "gpt-4o", "openai", "chat"),
    ("team-a", "bob", "claude-3-5-sonnet", "anthropic", "chat"),
    ("team-b", "carol", "gpt-4o-mini", "openai", "chat"),
    ("team-b", "alice", "gpt-4o", "openai", "responses"),  # one user in two teams
    ("", "", "claude-3-5-sonnet", "anthropic", "chat"),  # no team, no user
    ("r&d's", "dave", "text-embedding-3-small", "openai", "embedding"),  # quote in a value
)
#: Days with traffic, in both months; Jan 31 / Feb 1 straddle a month boundary.
DAYS = (
    date(2024, 1, 1),
    date(2024, 1, 15),
    date(2024, 1, 31),
    date(2024, 2, 1),
    date(2024, 2, 14),
    date(2024, 2, 29),
)
LOAD_USERS = 22  # u01..u22 in team-load: with the others, more users than the top 20


def _at(day: date, hour: int, minute: int = 0, second: float = 0.0) -> str:
    dt = datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
    return (dt + timedelta(seconds=second)).isoformat().replace("+00:00", "Z")


def _report(n: int, **fields: Any) -> dict[str, Any]:
    """One report as it reaches the writer (UsageReport validated, JSON-ready)."""
    report = UsageReport(request_id=f"req-{n:05d}", **fields).model_dump(mode="json")
    RAW_COST[report["request_id"]] = fields.get("cost_usd")  # as the client sent it
    return report


#: request_id → the cost as sent (validation rounds it to 1e-10 by the one rule)
RAW_COST: dict[str, float | None] = {}


def build_reports() -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []

    def add(**fields: Any) -> None:
        reports.append(_report(len(reports), **fields))

    for d, day in enumerate(DAYS):
        for c, (team, user, model, provider, operation) in enumerate(CALLERS):
            for i in range(3):
                k = (d * len(CALLERS) + c) * 3 + i
                input_tokens = 1000 + 37 * k
                output_tokens = 0 if operation == "embedding" else 50 + 13 * k
                status = "error" if k % 5 == 0 else "cancelled" if k % 11 == 0 else "success"
                # Costs with up to 17 significant digits: rounding to NUMERIC(20,10) matters.
                cost: float | None = 0.001234567891 * (k + 1) + 0.37 * (c + 1) + 0.0713 * d
                if operation == "embedding" and i == 0:
                    cost = None  # unpriced: counts as 0
                add(
                    model=model,
                    provider=provider,
                    operation=operation,
                    user=user,
                    team=team,
                    api_key_id=f"key-{c % 3}",
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    cached_input_tokens=100 * (k % 4),
                    cache_creation_input_tokens=10 * (k % 3),
                    reasoning_tokens=output_tokens // 3 if model == "gpt-4o" else 0,
                    status=status,
                    cost_usd=cost,
                    completed_at=_at(day, (5 * k + 3 * i) % 24, (7 * k) % 60, 0.25 * i),
                    duration_ms=100.0 + k,
                )
    for u in range(1, LOAD_USERS + 1):
        add(
            model="gpt-4o-mini",
            provider="openai",
            user=f"u{u:02d}",
            team="team-load",
            input_tokens=10 * u,
            output_tokens=u,
            cost_usd=0.2500000000123 * u,
            completed_at=_at(date(2024, 2, 14), u % 24, u),
        )
    # Around the month boundary, in UTC; in New York all three are still January 31.
    for n, when in enumerate(("2024-01-31T23:59:59.999Z", "2024-02-01T00:00:00Z",
                              "2024-02-01T03:30:00Z")):  # fmt: skip
        add(model="gpt-4o", provider="openai", user="alice", team="team-a", input_tokens=7,
            output_tokens=3, cost_usd=0.0000000001 * (n + 1), completed_at=when)  # fmt: skip
    # Exact decimals: a float error (0.30000000000000004), half-even rounding (5e-11 → 0),
    # below the quantum (1e-11 → 0), more than 10 decimals (…01234 → …0123).
    for cost in (0.1, 0.2, 0.1 + 0.2, 5e-11, 1e-11, 123.45678901234):
        add(model="gpt-4o", provider="openai", user="auditor", team="audit", input_tokens=1,
            cost_usd=cost, completed_at=_at(date(2024, 1, 20), 12))  # fmt: skip
    # Outside the range (the day before, the day after) with costs that would show.
    for when, user, team in (("2023-12-31T23:59:59Z", "alice", "team-a"),
                             ("2024-03-01T00:00:00Z", "zed", "team-old")):  # fmt: skip
        add(model="gpt-4-32k", provider="openai", user=user, team=team, input_tokens=5000,
            output_tokens=5000, cost_usd=1000.0, completed_at=when)  # fmt: skip
    return reports


REPORTS = build_reports()
BATCH = 40


def exact_cost(value: float | str | None) -> Decimal:
    """The cost one report adds to the rollups: the sent float's shortest decimal form rounded
    half-even to NUMERIC(20,10) (the one rule, docs/pricing.md); no cost adds 0."""
    if value is None:
        return Decimal(0)
    text = repr(value) if isinstance(value, float) else value
    return Decimal(text).quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


def shown(value: str) -> str:
    """A key as the board shows and filters it."""
    return value or "(none)"


@dataclass(frozen=True)
class Stored:
    """One report as the billing board sees it through the daily rollups."""

    day: datetime  # 00:00 UTC of the report's UTC day
    team: str
    user: str
    model: str
    provider: str
    errors: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_creation_input_tokens: int
    reasoning_tokens: int
    cost: Decimal

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> Stored:
        done = datetime.fromisoformat(r["completed_at"].replace("Z", "+00:00")).astimezone(UTC)
        return cls(
            day=datetime(done.year, done.month, done.day, tzinfo=UTC),
            team=shown(r["team"]),
            user=shown(r["user"]),
            model=shown(r["model"]),
            provider=r["provider"],
            errors=int(r["status"] != "success"),
            input_tokens=r["input_tokens"],
            output_tokens=r["output_tokens"],
            cached_input_tokens=r["cached_input_tokens"],
            cache_creation_input_tokens=r["cache_creation_input_tokens"],
            reasoning_tokens=r["reasoning_tokens"],
            cost=exact_cost(RAW_COST[r["request_id"]]),
        )


STORED = [Stored.of(r) for r in REPORTS]
IN_RANGE = [s for s in STORED if FIRST_DAY <= s.day.date() <= LAST_DAY]

Selection = Mapping[str, Sequence[str]]


def selected(selection: Selection) -> list[Stored]:
    return [
        s for s in IN_RANGE if all(getattr(s, var) in values for var, values in selection.items())
    ]


# -- the expected rows, computed from the reports ---------------------------------------------


def _cost(rows: Iterable[Stored]) -> Decimal:
    return sum((s.cost for s in rows), Decimal(0))


def _top_keys(rows: Sequence[Stored], who: str) -> set[str]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for s in rows:
        totals[getattr(s, who)] += s.cost
    ranked = sorted(totals.values(), reverse=True)
    if len(ranked) > TOP:
        # a tie at the cut would make the SQL's choice arbitrary: the data must avoid it
        assert ranked[TOP - 1] != ranked[TOP], f"test data: tie at the top-{TOP} cut of {who}"
    return {k for k, v in totals.items() if len(ranked) <= TOP or v >= ranked[TOP - 1]}


_PER_BUCKET = re.compile(r"Spend per (day|month) by (team|user|model) \(USD\)")
_EXPORT = {
    "Monthly usage by team, user and model": ("month", "%Y-%m"),
    "Daily usage by team, user and model": ("day", "%Y-%m-%d"),
}
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens",
                 "cache_creation_input_tokens", "reasoning_tokens")  # fmt: skip


def expected(title: str, selection: Selection) -> list[dict[str, Any]]:
    """The rows one billing query must return for `selection` (absent variables: All)."""
    rows = selected(selection)
    if title.startswith("variable "):  # not chained: the time range only
        who = title.removeprefix("variable ")
        return [{"value": v} for v in sorted({getattr(s, who) for s in IN_RANGE})]
    if title == "Spend in range (USD)":
        return [{"spend_usd": float(_cost(rows))}]
    if title == "Requests in range":
        return [{"requests": len(rows)}]
    if title == "Tokens in range (input + output)":
        return [{"tokens": sum(s.input_tokens + s.output_tokens for s in rows)}]
    if title == "Cached input tokens in range":
        return [{"cached_input_tokens": sum(s.cached_input_tokens for s in rows)}]
    if m := _PER_BUCKET.fullmatch(title):
        period, who = m.groups()
        top = None if who == "team" else _top_keys(rows, who)
        series: dict[tuple[datetime, str], Decimal] = defaultdict(Decimal)
        for s in rows:
            bucket = s.day if period == "day" else s.day.replace(day=1)
            key = getattr(s, who)
            series[bucket, key if top is None or key in top else "(other)"] += s.cost
        return [
            {"time": t, "metric": k, "spend_usd": float(v)} for (t, k), v in sorted(series.items())
        ]
    if title in _EXPORT:
        name, fmt = _EXPORT[title]
        groups: dict[tuple[str, ...], list[Stored]] = defaultdict(list)
        for s in rows:
            groups[s.day.strftime(fmt), s.team, s.user, s.model, s.provider].append(s)
        out = [
            {
                name: period,
                "team": team,
                "user": user,
                "model": model,
                "provider": provider,
                "requests": len(g),
                "errors": sum(s.errors for s in g),
                **{f: sum(getattr(s, f) for s in g) for f in _TOKEN_FIELDS},
                "cost_usd": _cost(g),
            }
            for (period, team, user, model, provider), g in groups.items()
        ]
        out.sort(key=lambda r: (r[name], -r["cost_usd"], r["team"], r["user"], r["model"],
                                r["provider"]))  # fmt: skip
        return out
    raise KeyError(f"{title!r}: a new billing query; add its expected rows here")


# -- the database -----------------------------------------------------------------------------


class BillingDb:
    """A migrated database holding REPORTS, queried like Grafana queries it."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def fetch(self, sql: str) -> list[dict[str, Any]]:
        async with self.store.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            pg: Any = raw.driver_connection
            async with pg.transaction():
                await pg.execute(f"SET LOCAL TIME ZONE '{SESSION_TIME_ZONE}'")
                records = await pg.fetch(sql)
        return [dict(r) for r in records]

    async def run(self, title: str, selection: Selection | None = None) -> list[dict[str, Any]]:
        sql = gen.expand_sql(
            billing_queries()[title], start=START, end=END, variables=selection or {}
        )
        assert "$" not in sql, sql
        rows = await self.fetch(sql)
        if title.startswith("variable "):
            assert all(len(r) == 1 for r in rows), f"{title}: a variable query has one column"
            return [{"value": next(iter(r.values()))} for r in rows]
        return rows


@pytest.fixture
async def billing(pg_url: str) -> AsyncIterator[BillingDb]:
    store = Store.from_url(pg_url)
    try:
        assert await store.upgrade() == head_revision()
        batches = [REPORTS[i : i + BATCH] for i in range(0, len(REPORTS), BATCH)]
        for batch in batches:
            result = await store.writer.write(batch)
            assert (result.received, result.inserted) == (len(batch), len(batch))
        retry = await store.writer.write(batches[1])  # a flush replayed after a crash
        assert (retry.inserted, retry.rollup_rows) == (0, 0)
        yield BillingDb(store)
    finally:
        await store.close()


async def assert_query(db: BillingDb, title: str, selection: Selection) -> list[dict[str, Any]]:
    rows = await db.run(title, selection)
    want = expected(title, selection)
    assert rows, f"{title}: no rows for {dict(selection)}"
    assert rows == want, f"{title} for {dict(selection)}"
    return rows


# -- tests ------------------------------------------------------------------------------------


def test_the_board_has_the_queries_tested_here() -> None:
    assert set(billing_queries()) == PANELS


def test_billing_sql_conventions() -> None:
    columns = {c.name for c in usage_rollups.columns}
    for title, query in billing_queries().items():
        assert "FROM usage_rollups" in query, title
        assert "granularity = 'day'" in query, title
        # whole UTC days that overlap the picked range (not BETWEEN, which drops a partial
        # first day and keeps all of a partial last one)
        assert "bucket_start >= date_trunc('day', $__timeFrom()::timestamptz, 'UTC')" in query
        assert "bucket_start < $__timeTo()::timestamptz" in query, title
        bare = re.sub(r"'(?:[^']|'')*'", "''", query).replace('"user"', "").replace("$user", "")
        assert not re.search(r"\buser\b", bare), f"{title}: user is reserved in Postgres, quote it"
        for col in re.findall(r"SUM\((\w+)", query):
            assert col in columns, f"{title}: no column {col}"


def test_test_data_is_varied() -> None:
    """The oracle below is only as good as the data: make sure it covers what it should."""
    assert len({s.team for s in IN_RANGE}) >= 5 and "(none)" in {s.team for s in IN_RANGE}
    assert len({s.user for s in IN_RANGE}) > TOP + 1
    assert len({s.model for s in IN_RANGE}) >= 4
    assert {s.day.strftime("%Y-%m") for s in IN_RANGE} == {"2024-01", "2024-02"}
    assert len({s.day for s in IN_RANGE}) >= 6
    assert 0 < sum(s.errors for s in IN_RANGE) < len(IN_RANGE)
    assert any(r["cost_usd"] is None for r in REPORTS)
    assert len(STORED) - len(IN_RANGE) == 2
    # costs really have more decimals than NUMERIC(20,10) keeps
    raw = [RAW_COST[r["request_id"]] for r in REPORTS]
    assert sum(exact_cost(c) != Decimal(repr(c)) for c in raw if c is not None) > 50


async def test_schema_and_rollups_come_from_the_real_writer(billing: BillingDb) -> None:
    rows = await billing.fetch(
        "SELECT granularity, count(*) AS n, SUM(requests) AS requests, SUM(cost_usd) AS cost "
        "FROM usage_rollups GROUP BY 1 ORDER BY 1"
    )
    everything = len(REPORTS), _cost(STORED)
    assert [(r["granularity"], r["requests"], r["cost"]) for r in rows] == [
        ("day", *everything),
        ("hour", *everything),
    ]
    # more hour rows than day rows: the board's `granularity = 'day'` is what stops double
    # counting, and the queries below would see twice the spend without it
    assert rows[1]["n"] > rows[0]["n"] > 0
    details = await billing.fetch("SELECT count(*) AS n, SUM(cost_usd) AS c FROM usage_details")
    assert details == [{"n": len(REPORTS), "c": _cost(STORED)}]


async def test_every_query_with_all_variables(billing: BillingDb) -> None:
    for title in billing_queries():
        await assert_query(billing, title, {})


async def test_every_query_for_each_single_variable_value(billing: BillingDb) -> None:
    """Every value each variable offers, alone, through every query of the board."""
    tried = 0
    for variable in ("team", "user", "model"):
        values = [r["value"] for r in await billing.run(f"variable {variable}")]
        assert len(values) >= 4, variable
        for value in values:
            for title in billing_queries():
                await assert_query(billing, title, {variable: [value]})
                tried += 1
    assert tried >= 35 * len(PANELS)


@pytest.mark.parametrize(
    "selection",
    [
        {"team": ["team-a", "team-b"]},
        {"team": ["team-b"], "user": ["alice"]},
        {"team": ["(none)"], "model": ["claude-3-5-sonnet"]},
        {"user": ["alice", "u07", "(none)"], "model": ["gpt-4o", "gpt-4o-mini"]},
        {"team": ["r&d's", "audit"], "user": ["dave", "auditor"]},
    ],
    ids=["two-teams", "team-and-user", "none-team-and-model", "multi", "quotes"],
)
async def test_every_query_with_combined_variables(
    billing: BillingDb, selection: dict[str, list[str]]
) -> None:
    for title in billing_queries():
        await assert_query(billing, title, selection)


async def test_a_selection_without_data(billing: BillingDb) -> None:
    """Totals say 0, every other panel is empty, and nothing breaks on the quote."""
    selection = {"user": ["nobody's"]}
    assert not selected(selection)
    for title in billing_queries():
        rows = await billing.run(title, selection)
        if title.startswith("variable "):
            assert rows == expected(title, selection) != [], title
        elif title in TOTALS:
            assert len(rows) == 1 and list(rows[0].values()) == [0], title
        else:
            assert rows == [], title


async def test_monthly_spend_per_team_is_the_exact_sum_of_the_costs_sent(
    billing: BillingDb,
) -> None:
    month_of = {
        "2024-01": datetime(2024, 1, 1, tzinfo=UTC),
        "2024-02": datetime(2024, 2, 1, tzinfo=UTC),
    }
    sent: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in REPORTS:
        month = r["completed_at"][:7]
        if month in month_of:
            sent[month, r["team"] or "(none)"] += exact_cost(RAW_COST[r["request_id"]])
    assert len(sent) >= 9

    export = await billing.run("Monthly usage by team, user and model")
    exported: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for row in export:
        assert isinstance(row["cost_usd"], Decimal)
        exported[row["month"], row["team"]] += row["cost_usd"]
    assert exported == sent  # exact NUMERIC, to the last of the 10 decimals

    chart = await billing.run("Spend per month by team (USD)")
    assert {(r["time"], r["metric"]): r["spend_usd"] for r in chart} == {
        (month_of[m], team): float(cost) for (m, team), cost in sent.items()
    }
    # 0.1 + 0.2 + 0.3(0000000000000004) + 0 (5e-11 half-even) + 0 (1e-11)
    # + 123.4567890123(4), worked out by hand
    assert sent["2024-01", "audit"] == Decimal("124.0567890123")
    total = await billing.run("Spend in range (USD)")
    assert total == [{"spend_usd": float(sum(sent.values(), Decimal(0)))}]


async def test_month_and_day_boundaries_are_utc(billing: BillingDb) -> None:
    """23:59:59.999Z on Jan 31 is January, 00:00Z and 03:30Z on Feb 1 are February, whatever
    the session time zone (New York: all three are Jan 31)."""
    daily = await billing.run("Daily usage by team, user and model", {"user": ["alice"]})
    by_day = defaultdict(int)
    for row in daily:
        by_day[row["day"]] += row["requests"]
    alice_per_day = defaultdict(int)
    for r in REPORTS:
        if r["user"] == "alice" and "2024-01-01" <= r["completed_at"][:10] <= "2024-02-29":
            alice_per_day[r["completed_at"][:10]] += 1
    assert dict(by_day) == dict(alice_per_day)
    assert by_day["2024-01-31"] == 2 * 3 + 1 and by_day["2024-02-01"] == 2 * 3 + 2
    chart = await billing.run("Spend per day by team (USD)", {"team": ["team-a"]})
    # team-a's day buckets: its six days, not Dec 31 (out of range) nor a local "Jan 31"
    assert [r["time"] for r in chart] == [
        datetime(d.year, d.month, d.day, tzinfo=UTC) for d in DAYS
    ]


async def test_per_day_totals_match_the_reports(billing: BillingDb) -> None:
    per_day: dict[datetime, Decimal] = defaultdict(Decimal)
    for s in IN_RANGE:
        per_day[s.day] += s.cost
    for who in ("team", "user", "model"):
        chart = await billing.run(f"Spend per day by {who} (USD)")
        times = [r["time"] for r in chart]
        assert times == sorted(times), f"{who}: a time series must be sorted by time"
        sums: dict[datetime, float] = defaultdict(float)
        for r in chart:
            sums[r["time"]] += r["spend_usd"]
        assert sums.keys() == per_day.keys(), who
        for day, cost in per_day.items():
            assert sums[day] == pytest.approx(float(cost), rel=1e-12, abs=1e-12), (who, day)
    daily = await billing.run("Daily usage by team, user and model")
    exact: dict[str, Decimal] = defaultdict(Decimal)
    for row in daily:
        exact[row["day"]] += row["cost_usd"]
    assert exact == {d.strftime("%Y-%m-%d"): c for d, c in per_day.items()}


async def test_top_users_order_and_other(billing: BillingDb) -> None:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for s in IN_RANGE:
        totals[s.user] += s.cost
    ranking = sorted(totals, key=lambda u: totals[u], reverse=True)
    assert len(set(totals.values())) == len(totals), "test data: user totals must differ"
    for period in ("day", "month"):
        chart = await billing.run(f"Spend per {period} by user (USD)")
        spend: dict[str, float] = defaultdict(float)
        for r in chart:
            spend[r["metric"]] += r["spend_usd"]
        named = set(spend) - {"(other)"}
        assert named == set(ranking[:TOP]), period
        assert spend["(other)"] == pytest.approx(float(sum(totals[u] for u in ranking[TOP:])))
        # the biggest spender really is first, and the series rank like the totals
        top_named = sorted(named, key=lambda u: spend[u], reverse=True)
        assert top_named == ranking[:TOP], period
    assert ranking[0] == "auditor"  # 124.06 USD on one day
    assert "u22" in ranking[:TOP] and "u01" in ranking[TOP:]
