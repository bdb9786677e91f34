"""Budget windows and templates against an independent oracle on a real store (SQLite and
Postgres): calendar windows in time zones with DST changes (New York, Berlin, Lord Howe's
30-minute shift), a :45 offset (Kathmandu), month and year ends, a leap day, rolling windows,
and per-user/team/key templates, read before any refresh, after a refresh, and an hour later
with no refresh."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from budget_support import cost_of

from exporter.budgets import BudgetTracker, SpendQuery
from exporter.config import BudgetSpec
from exporter.store import Store
from exporter.usage import UsageReport

T = datetime
FOCUS = [
    T(2026, 1, 31, 23, 30, tzinfo=UTC),  # month end
    T(2026, 3, 8, 7, tzinfo=UTC),  # New York springs forward
    T(2026, 3, 29, 1, tzinfo=UTC),  # Berlin springs forward
    T(2026, 4, 4, 15, tzinfo=UTC),  # Lord Howe falls back 30 minutes
    T(2026, 10, 25, 1, tzinfo=UTC),  # Berlin falls back
    T(2026, 11, 1, 6, tzinfo=UTC),  # New York falls back
    T(2026, 12, 31, 23, 50, tzinfo=UTC),  # year end
    T(2028, 2, 29, 20, tzinfo=UTC),  # leap day
]
ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu"]
USERS, TEAMS, KEYS = ["u0", "u1", "u2", "u3"], ["t0", "t1"], ["k0", "k1", "k2"]


def specs() -> list[BudgetSpec]:
    out = [
        BudgetSpec(name=f"{w}-{z.replace('/', '_')}", window=w, timezone=z, limit_usd=100)
        for z in ZONES
        for w in ("day", "week", "month")
    ]
    out += [BudgetSpec(name=f"rolling-{w}", window=w, limit_usd=100) for w in ("24h", "7d", "30d")]
    # budgets of one kind share one grouped query: per user, per team and user, per team × user
    out += [BudgetSpec(name=f"user-{u}", user=u, window="day", limit_usd=5) for u in USERS]
    out += [BudgetSpec(name=f"{t}-{u}", team=t, user=u, window="7d", limit_usd=5)
            for t in TEAMS for u in USERS[:2]]  # fmt: skip
    out += [BudgetSpec(name=f"{t}-per-user", team=t, per="user", window="month", limit_usd=5)
            for t in TEAMS]  # fmt: skip
    out += [
        BudgetSpec(name="per-user-ny-day", per="user", window="day",
                   timezone="America/New_York", limit_usd=5),
        BudgetSpec(name="per-team-month", per="team", window="month", limit_usd=5),
        BudgetSpec(name="per-key-of-t1-24h", per="api_key_id", team="t1", window="24h",
                   limit_usd=5),
        BudgetSpec(name="u2-week-berlin", user="u2", window="week", timezone="Europe/Berlin",
                   limit_usd=5),
    ]  # fmt: skip
    return out


def periods(at: datetime) -> dict[tuple[str, str], Any]:
    """The local day, ISO week and month of `at` in each zone, and its UTC hour."""
    out: dict[tuple[str, str], Any] = {}
    for z in ZONES:
        d = at.astimezone(ZoneInfo(z)).date()
        out[("day", z)], out[("week", z)], out[("month", z)] = d, d.isocalendar()[:2], d.month
        out[("month", z)] = (d.year, d.month)
    out[("hour", "UTC")] = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return out


def matches(spec: BudgetSpec, value: str, r: dict[str, Any]) -> bool:
    for dim in ("user", "team", "api_key_id", "model"):
        fixed = getattr(spec, dim)
        if fixed is not None and r[dim] != fixed:
            return False
    return spec.per is None or r[spec.per] == value


def in_window(spec: BudgetSpec, now: dict[tuple[str, str], Any], r: dict[str, Any]) -> bool:
    at = r["periods"]
    if spec.window in ("day", "week", "month"):
        key = (spec.window, spec.timezone or "UTC")
        return bool(at[key] == now[key])
    hours = int(spec.window[:-1]) * (24 if spec.window.endswith("d") else 1)
    hour, current = at[("hour", "UTC")], now[("hour", "UTC")]
    return bool(current - timedelta(hours=hours - 1) <= hour <= current)


def make_reports(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for f, focus in enumerate(FOCUS):
        for i in range(40):
            at = focus + timedelta(minutes=rng.randrange(-50 * 60, 50 * 60))
            out.append({
                "request_id": f"o-{f}-{i}", "model": "m", "user": rng.choice(USERS),
                "team": rng.choice(TEAMS), "api_key_id": rng.choice(KEYS),
                "cost_usd": f"0.{rng.randrange(10**12):012d}", "completed_at": at,
            })  # fmt: skip
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_windows_and_templates_match_the_oracle(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(11)
    raw = make_reports(rng)
    reports = [
        UsageReport.model_validate({**r, "completed_at": r["completed_at"].isoformat(),
                                    "cost_usd": float(r["cost_usd"])})
        for r in raw
    ]  # fmt: skip
    exact = {r["request_id"]: cost_of(r["cost_usd"]) for r in raw}
    for r in raw:
        r["periods"] = periods(r["completed_at"])
    url = (
        request.getfixturevalue("pg_url")
        if backend == "postgres"
        else f"sqlite+aiosqlite:///{tmp_path / 'u.db'}"
    )
    store = Store.from_url(url)
    await store.upgrade()
    now = [FOCUS[0] - timedelta(days=3)]
    tracker = BudgetTracker(specs(), SpendQuery(store.engine), clock=lambda: now[0])
    try:
        # as the flusher does: durable (ledger), then commit + drop under the lock; the last
        # segments stay unflushed
        order = list(range(len(reports)))
        rng.shuffle(order)
        for seq, start in enumerate(range(0, len(order), 40), start=1):
            batch = [reports[i] for i in order[start : start + 40]]
            tracker.on_durable(seq, batch)
            if seq <= 5:
                async with tracker.db_lock:
                    await store.writer.write([r.model_dump(mode="json") for r in batch])
                    tracker.on_committed(seq)
        times = sorted(
            {f + timedelta(minutes=m) for f in FOCUS for m in (-61, -1, 0, 31, 600)}
            | {f + timedelta(minutes=m + 60) for f in FOCUS for m in (0, 1)}
        )
        candidates = {
            (b.name, v): [r for r in raw if matches(b.spec, v, r)]
            for b in tracker.budgets
            for v in ([""] if not b.spec.per else USERS + TEAMS + KEYS)
        }
        checked, last_refresh = 0, now[0]
        for instant in times:
            now[0] = instant
            current = periods(instant)
            for phase in ("before refresh", "after refresh"):
                if phase == "after refresh":
                    await tracker.refresh()
                    last_refresh = instant
                # a rolling window more than an hour past its last refresh may read high
                stale = instant - last_refresh > timedelta(hours=1)
                for b in tracker.budgets:
                    for value in [""] if not b.spec.per else USERS + TEAMS + KEYS:
                        want = sum(
                            (exact[r["request_id"]] for r in candidates[b.name, value]
                             if in_window(b.spec, current, r)),
                            Decimal(0),
                        )  # fmt: skip
                        got = tracker.view(b, value).spent
                        where = (b.name, value, instant, phase, got, want)
                        if stale and b.kind.rolling is not None:
                            assert got >= want, where
                        else:
                            assert got == want, where
                        checked += 1
        assert checked > 5_000
        now[0] = T(2029, 1, 1, tzinfo=UTC)
        await tracker.refresh()
        assert len(tracker.ledger) == 3  # dropped segments are forgotten once seen and past
    finally:
        await store.close()


async def test_sqlite_spend_is_exact_for_odd_cost_text_and_past_integer_overflow(
    tmp_path: Path,
) -> None:
    """SQLite sums integer units in SQL; rows not in the canonical ten-decimal text, and sums
    past 2**63 units, fall back to Decimal in Python with the same exact result."""
    from sqlalchemy import text

    from exporter.budgets import stored_spend

    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'u.db'}")
    await store.upgrade()
    at = T(2026, 5, 5, 12, 30, tzinfo=UTC)
    reports = [{"request_id": f"x{i}", "model": "m", "user": f"u{i % 2}", "cost_usd": 0.25,
                "completed_at": at.isoformat()} for i in range(4)]  # fmt: skip
    try:
        await store.writer.write(reports)
        day = (T(2026, 5, 5, tzinfo=UTC), T(2026, 5, 6, tzinfo=UTC))
        got = await stored_spend(store.engine, *day, {}, ["user"])
        assert got == {("u0",): Decimal("0.5"), ("u1",): Decimal("0.5")}
        async with store.engine.begin() as conn:  # odd text, then a sum past int64 units
            await conn.execute(text("UPDATE usage_rollups SET cost_usd = '1.5' WHERE user = 'u0'"))
        got = await stored_spend(store.engine, *day, {}, ["user"])
        assert got == {("u0",): Decimal("1.5"), ("u1",): Decimal("0.5")}
        big = "900000000.0000000000"
        async with store.engine.begin() as conn:
            await conn.execute(text(f"UPDATE usage_rollups SET cost_usd = '{big}'"))
        got = await stored_spend(store.engine, *day, {}, [])
        assert got == {(): Decimal(big) * 2}
    finally:
        await store.close()
