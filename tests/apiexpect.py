"""Expected read-API figures, computed independently of exporter.store / exporter.api from the
raw reports a test sent: plain Python over dicts, stdlib `statistics` for percentiles,
`zoneinfo` for calendar periods, Decimal for money.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from exporter.usage import UsageReport

Q = Decimal("1e-10")
UTC_ZONE = ZoneInfo("UTC")
TOKENS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_creation_input_tokens",
          "reasoning_tokens")  # fmt: skip
#: around a year end and a month end, so ranges cross hour, day, month and year boundaries
START = datetime(2025, 12, 29, 0, 0, tzinfo=UTC)
END = datetime(2026, 2, 3, 0, 0, tzinfo=UTC)
HOT = (datetime(2025, 12, 31, 18, 0, tzinfo=UTC), datetime(2026, 1, 31, 18, 0, tzinfo=UTC))


def make_reports(n: int, seed: int = 7, prefix: str = "r") -> list[dict[str, Any]]:
    """`n` validated reports (as the WAL holds them), dense around the two boundaries."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3:
            hot = HOT[i % 2]
            done = hot + timedelta(seconds=rnd.randrange(0, 14 * 3600))
        else:
            done = START + timedelta(seconds=rnd.randrange(0, int((END - START).total_seconds())))
        status = rnd.choice(["success"] * 6 + ["error", "cancelled"])
        inp = rnd.randrange(0, 5000)
        cached = rnd.randrange(0, inp // 2 + 1)
        out_t = rnd.randrange(0, 900)
        fields: dict[str, Any] = {
            "request_id": f"{prefix}-{i}",
            "model": rnd.choice(["gpt-4o", "claude-sonnet", "llama-3"]),
            "provider": rnd.choice(["openai", "anthropic", ""]),
            "operation": rnd.choice(["chat", "chat", "embedding"]),
            "user": rnd.choice(["alice", "bob", "carol", ""]),
            "team": rnd.choice(["red", "blue", ""]),
            "api_key_id": rnd.choice(["k1", "k2"]),
            "node": rnd.choice(["planner", "retriever", "writer", ""]),
            "trace_id": f"t{i % 17}",
            "input_tokens": inp,
            "cached_input_tokens": cached,
            "cache_creation_input_tokens": rnd.randrange(0, inp - cached + 1) if i % 5 == 0 else 0,
            "output_tokens": out_t,
            "reasoning_tokens": rnd.randrange(0, out_t + 1) if i % 4 == 0 else 0,
            "status": status,
            "estimated": i % 9 == 0,
            "completed_at": done,
            "duration_ms": None if i % 7 == 0 else round(rnd.uniform(5, 9000), 3),
            "ttft_ms": None if i % 3 == 0 else round(rnd.uniform(1, 800), 3),
            "cost_usd": None if i % 13 == 0 else round(rnd.uniform(0, 0.5), 9),
        }
        r = UsageReport(**fields)
        out.append(dict(orjson.loads(orjson.dumps(r.__dict__, default=str))))
    return out


def done_at(r: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(r["completed_at"]).astimezone(UTC)


def cost(r: Mapping[str, Any]) -> Decimal:
    v = r["cost_usd"]
    if v is None:
        return Decimal(0).quantize(Q)
    # the reports carry at most 9 decimals: no rounding rule comes into play
    return Decimal(repr(v) if isinstance(v, float) else str(v)).quantize(Q, ROUND_HALF_EVEN)


def period_label(when: datetime, unit: str | None, tz: ZoneInfo) -> str | None:
    if unit is None:
        return None
    hour = when.replace(minute=0, second=0, microsecond=0)
    if unit == "hour":
        return hour.astimezone(tz).isoformat()
    local = hour.astimezone(tz)
    day = datetime(local.year, local.month, local.day, tzinfo=tz)
    if unit == "day":
        return day.isoformat()
    if unit == "week":
        monday = day.date() - timedelta(days=day.weekday())
        return datetime(monday.year, monday.month, monday.day, tzinfo=tz).isoformat()
    return datetime(local.year, local.month, 1, tzinfo=tz).isoformat()


def percentile(values: Sequence[float], pc: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pc - 1]


def figures(rs: Sequence[Mapping[str, Any]], pct: bool = True) -> dict[str, Any]:
    n = len(rs)
    errors = sum(r["status"] != "success" for r in rs)
    sums = {k: sum(r[k] for r in rs) for k in TOKENS}
    total = sums["input_tokens"] + sums["output_tokens"]
    durs = [r["duration_ms"] for r in rs if r["duration_ms"] is not None]
    ttfts = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
    out: dict[str, Any] = {
        "requests": n,
        "errors": errors,
        "cancelled": sum(r["status"] == "cancelled" for r in rs),
        "estimated": sum(bool(r["estimated"]) for r in rs),
        "success_rate": (n - errors) / n if n else None,
        **sums,
        "total_tokens": total,
        "cost_usd": sum((cost(r) for r in rs), Decimal(0).quantize(Q)),
        "avg_duration_ms": sum(durs) / len(durs) if durs else None,
        "p50_duration_ms": percentile(sorted(durs), 50) if pct else None,
        "p95_duration_ms": percentile(sorted(durs), 95) if pct else None,
        "avg_ttft_ms": sum(ttfts) / len(ttfts) if ttfts else None,
        "p50_ttft_ms": percentile(sorted(ttfts), 50) if pct else None,
        "p95_ttft_ms": percentile(sorted(ttfts), 95) if pct else None,
        "avg_input_tokens": sums["input_tokens"] / n if n else None,
        "avg_output_tokens": sums["output_tokens"] / n if n else None,
        "avg_total_tokens": total / n if n else None,
    }
    return out


def expected_stats(
    reports: Iterable[Mapping[str, Any]],
    since: datetime,
    until: datetime,
    dims: Sequence[str] = (),
    unit: str | None = None,
    tz: ZoneInfo = UTC_ZONE,
    filters: Mapping[str, Sequence[str]] | None = None,
    top: int | None = None,
    pct: bool = True,
) -> tuple[dict[tuple[Any, ...], dict[str, Any]], dict[str | None, dict[str, Any]]]:
    """(groups by (dims..., period label), totals by period label) for /v1/stats."""
    kept = []
    for r in reports:
        hour = done_at(r).replace(minute=0, second=0, microsecond=0)
        if not since <= hour < until:
            continue
        if any(r[k] not in v for k, v in (filters or {}).items()):
            continue
        kept.append(r)
    if top is not None and dims:
        ranking: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
        for r in kept:
            ranking.setdefault(tuple(r[d] for d in dims), []).append(r)
        ordered = sorted(
            ranking,
            key=lambda k: (-sum(cost(r) for r in ranking[k]), -len(ranking[k]), k),
        )
        keep = set(ordered[:top])
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    totals: dict[str | None, list[Mapping[str, Any]]] = {}
    for r in kept:
        key = tuple(r[d] for d in dims)
        if top is not None and dims and key not in keep:
            key = ("__other__",) * len(dims)
        label = period_label(done_at(r), unit, tz)
        groups.setdefault((*key, label), []).append(r)
        totals.setdefault(label, []).append(r)
    return (
        {k: figures(v, pct) for k, v in groups.items()},
        {k: figures(v, pct) for k, v in totals.items()},
    )


def assert_figures(got: Mapping[str, Any], want: Mapping[str, Any], where: str) -> None:
    for name, value in want.items():
        g = got[name]
        if name == "cost_usd":
            assert "e" not in g.lower(), (where, g)
            assert Decimal(g) == value, (where, name, g, value)
        elif value is None:
            assert g is None, (where, name, g)
        elif isinstance(value, float):
            assert g == pytest.approx(value, rel=1e-9, abs=1e-9), (where, name, g, value)
        else:
            assert g == value, (where, name, g, value)


def check_stats_doc(
    doc: Mapping[str, Any],
    reports: Sequence[Mapping[str, Any]],
    since: datetime,
    until: datetime,
    dims: Sequence[str] = (),
    unit: str | None = None,
    tz: ZoneInfo = UTC_ZONE,
    filters: Mapping[str, Sequence[str]] | None = None,
    top: int | None = None,
    pct: bool = True,
) -> None:
    """Every figure of a /v1/stats document equals the independent computation."""
    groups, totals = expected_stats(reports, since, until, dims, unit, tz, filters, top, pct)
    got = {(*(row[d] for d in dims), row[unit] if unit else None): row for row in doc["groups"]}
    assert len(got) == len(doc["groups"]), "a group appears twice"
    assert set(got) == set(groups)
    for key, want in groups.items():
        assert_figures(got[key], want, f"group {key}")
    got_totals = {row[unit] if unit else None: row for row in doc["totals"]}
    if not totals and unit is None:
        totals = {None: figures([], pct)}
    assert set(got_totals) == set(totals)
    for key, want in totals.items():
        assert_figures(got_totals[key], want, f"totals {key}")
