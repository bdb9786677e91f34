"""GET /v1/stats in SQL: sums from the rollups, percentiles from the audit rows.

One statement per question, the same on both backends: the periods of the range (see
exporter.store.calendar) arrive as one JSON parameter joined to the rollups by
(granularity, bucket_start), so a 31-day range reads 31 day-rollup buckets per key, not 744
hours. `top=N` ranks groups by cost over the whole range in SQL and folds the rest into one
`__other__` group, so a high-cardinality group_by returns N+1 rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.calendar import Period, PeriodUnit, periods, segments
from exporter.store.readsql import DIMENSIONS, ReadTimeout, Sql, bounded, cost_from_sum
from exporter.store.tables import COST_QUANTUM, usage_details, usage_rollups

__all__ = ["OTHER", "GroupStats", "StatsQuery", "StatsResult", "run_stats"]

OTHER = "__other__"
ZERO_COST = Decimal(0).quantize(COST_QUANTUM)
#: Outcome counts summed from the rollups (pricing's `unpriced` when its migration is in).
COUNTS = tuple(
    c for c in ("requests", "errors", "cancelled", "estimated", "unpriced") if c in usage_rollups.c
)
TOKENS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_creation_input_tokens",
          "reasoning_tokens")  # fmt: skip
_FLOATS = ("duration_ms_sum", "duration_count", "ttft_ms_sum", "ttft_count")
#: Percentiles by linear interpolation between closest ranks (Postgres percentile_cont), in
#: whole percent so rank arithmetic is integer on both backends and in Python.
PERCENTS = (50, 95)


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """A validated question (exporter.api.params builds it from the query string)."""

    since: datetime
    until: datetime
    group_by: tuple[str, ...] = ()  # DIMENSIONS or "tag:<key>"
    period: PeriodUnit | None = None
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    top: int | None = None
    percentiles: bool = True
    #: why percentiles are off (past the audit retention, not asked), for the answer
    percentiles_note: str | None = None


@dataclass(slots=True)
class GroupStats:
    """Sums of one group (and period), plus percentiles from the audit rows when asked."""

    key: tuple[str, ...]
    period: datetime | None
    counts: dict[str, int]
    tokens: dict[str, int]
    cost_usd: Decimal
    duration_ms_sum: float = 0.0
    duration_count: int = 0
    ttft_ms_sum: float = 0.0
    ttft_count: int = 0
    duration_pct: dict[int, float] = field(default_factory=dict)
    ttft_pct: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class StatsResult:
    groups: list[GroupStats]
    totals: list[GroupStats]  # one per period (a single one without a period unit)
    granularities: tuple[str, ...]
    periods: list[Period]
    percentiles: bool = False
    percentiles_note: str | None = None


def _dim_expr(sql: Sql, alias: str, dim: str, table_has_tags: bool) -> str | None:
    if dim.startswith("tag:"):
        column = "dims" if alias == "r" else "tags"
        return sql.tag(f"{alias}.{column}", dim[4:]) if table_has_tags else None
    if dim not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dim!r}")
    return f'{alias}."{dim}"'


def _where(sql: Sql, alias: str, filters: Mapping[str, tuple[str, ...]], tags: bool) -> str:
    conds = []
    for dim, values in sorted(filters.items()):
        expr = _dim_expr(sql, alias, dim, tags)
        if expr is None:
            conds.append("1 = 0")  # audit rows without tags cannot match a tag filter
            continue
        conds.append(f"{expr} IN ({', '.join(sql.bind(v) for v in values)})")
    return " AND ".join(conds) if conds else "1 = 1"


def _group_exprs(
    sql: Sql, q: StatsQuery, alias: str, top_keys: Sequence[tuple[str, ...]] | None, tags: bool
) -> list[str] | None:
    """The group_by expressions; with `top_keys`, groups outside them become __other__."""
    exprs = []
    for dim in q.group_by:
        e = _dim_expr(sql, alias, dim, tags)
        if e is None:
            return None
        exprs.append(e)
    if top_keys is None or not exprs:
        return exprs
    if not top_keys:
        return [f"'{OTHER}'" for _ in exprs]
    rows = ", ".join("(" + ", ".join(sql.bind(v) for v in k) + ")" for k in top_keys)
    match = f"({', '.join(exprs)}) IN ({rows})" if len(exprs) > 1 else f"{exprs[0]} IN ({rows})"
    if not sql.pg and len(exprs) > 1:
        match = f"({', '.join(exprs)}) IN (VALUES {rows})"
    return [f"CASE WHEN {match} THEN {e} ELSE '{OTHER}' END" for e in exprs]


def _named(period: str, exprs: Sequence[str], sums: Sequence[str], cost: str) -> list[str]:
    """The select list with the names the top-N wrapper reads: pi, k0…, s0…, cost."""
    return [
        f"{period} AS pi",
        *(f"{e} AS k{i}" for i, e in enumerate(exprs)),
        *(f"{e} AS s{i}" for i, e in enumerate(sums)),
        f"{cost} AS cost",
    ]


def _top_sql(sql: Sql, q: StatsQuery, ps: list[Period], exprs: list[str]) -> str:
    """One read for top=N: groups ranked by their cost over the whole range (then requests,
    then the key, a stable cut on ties), the rest folded into __other__, the rank last."""
    keys = [f"k{i}" for i in range(len(exprs))]
    n_sums = len(COUNTS) + len(TOKENS) + len(_FLOATS)
    req = "s0"  # requests is the first count
    inner = _rollup_sql(sql, q, ps, exprs, "")
    part = ", ".join(keys)
    folded = [f"CASE WHEN rk <= {int(q.top or 0)} THEN {k} ELSE '{OTHER}' END" for k in keys]
    sums = [f"sum(s{i})" for i in range(n_sums)]
    group = ", ".join(str(i) for i in range(1, len(keys) + 2))
    return (
        f"SELECT pi, {', '.join([*folded, *sums])}, sum(cost), min(rk) FROM ("  # noqa: S608
        f"SELECT t.*, dense_rank() OVER (ORDER BY kc DESC, kr DESC, {part}) AS rk FROM ("
        f"SELECT g.*, sum(cost) OVER (PARTITION BY {part}) AS kc, "
        f"sum({req}) OVER (PARTITION BY {part}) AS kr FROM ({inner}) AS g) AS t) AS u "
        f"GROUP BY {group}"
    )


#: Up to this many (granularity, range) segments are spelled out as OR-ed index ranges (a
#: bitmap scan on Postgres, the usual 31-day case is one); more are joined from a JSON set.
INLINE_SEGMENTS = 16


def _rollup_sql(sql: Sql, q: StatsQuery, ps: list[Period], exprs: list[str], order: str) -> str:
    segs = segments(ps)
    sums = [f'sum(r."{c}")' for c in (*COUNTS, *TOKENS, *_FLOATS)]
    group = ", ".join(str(i) for i in range(1, len(exprs) + 2))
    where = _where(sql, "r", q.filters, True)
    if len(segs) <= INLINE_SEGMENTS:
        conds = [
            (
                f"(r.granularity = {sql.bind(s.granularity)} AND r.bucket_start >= "
                f"{sql.ts(s.start)} AND r.bucket_start < {sql.ts(s.end)})",
                s.period,
            )
            for s in segs
        ]
        if len({p for _, p in conds}) == 1:  # one period (no calendar grouping): a constant
            period = str(conds[0][1])
        else:
            period = "CASE " + " ".join(f"WHEN {c} THEN {p}" for c, p in conds) + " END"
        cols = _named(period, exprs, sums, sql.cost_sum("r.cost_usd"))
        return (
            f"SELECT {', '.join(cols)} FROM usage_rollups AS r "  # noqa: S608
            f"WHERE ({' OR '.join(c for c, _ in conds)}) AND {where} GROUP BY {group} {order}"
        )
    rows = [{"pi": s.period, "g": s.granularity, "a": s.start, "b": s.end} for s in segs]
    seg = sql.json_rows("seg", rows, {"pi": "int", "g": "text", "a": "ts", "b": "ts"})
    cols = _named("seg.pi", exprs, sums, sql.cost_sum("r.cost_usd"))
    return (
        f"SELECT {', '.join(cols)} FROM {seg} "  # noqa: S608 (whitelisted names, bound values)
        + sql.range_join(
            "seg",
            "usage_rollups",
            "r",
            "r.granularity = seg.g AND r.bucket_start >= seg.a AND r.bucket_start < seg.b",
        )
        + f" WHERE {where} GROUP BY {group} {order}"
    )


async def _rows(
    engine: AsyncEngine, time_limit: float, stmt: str, params: dict[str, Any]
) -> list[Any]:
    async with bounded(engine, time_limit) as conn:
        return list((await conn.execute(text(stmt), params)).all())


def _stats(row: Sequence[Any], n_key: int, pg: bool, ps: list[Period]) -> GroupStats:
    i = 1 + n_key
    counts = {c: int(row[i + j] or 0) for j, c in enumerate(COUNTS)}
    i += len(COUNTS)
    tokens = {c: int(row[i + j] or 0) for j, c in enumerate(TOKENS)}
    i += len(TOKENS)
    dsum, dcount, tsum, tcount = row[i : i + 4]
    return GroupStats(
        key=tuple(str(v) for v in row[1 : 1 + n_key]),
        period=ps[int(row[0])].label,
        counts=counts,
        tokens=tokens,
        cost_usd=cost_from_sum(row[i + 4], pg),
        duration_ms_sum=float(dsum or 0),
        duration_count=int(dcount or 0),
        ttft_ms_sum=float(tsum or 0),
        ttft_count=int(tcount or 0),
    )


async def _percentiles(
    engine: AsyncEngine,
    q: StatsQuery,
    ps: list[Period],
    top_keys: Sequence[tuple[str, ...]] | None,
    grouped: bool,
    time_limit: float,
) -> dict[tuple[int, tuple[str, ...]], tuple[dict[int, float], dict[int, float]]]:
    """Linear-interpolation percentiles (Postgres percentile_cont) of duration and TTFT per
    (period, group) over the audit rows, from row numbers (SQLite has no percentile_cont)."""
    tags = "tags" in usage_details.c
    out: dict[tuple[int, tuple[str, ...]], tuple[dict[int, float], dict[int, float]]] = {}
    for which, column in enumerate(("duration_ms", "ttft_ms")):
        sql = Sql(engine.dialect.name)
        exprs = _group_exprs(sql, q, "d", top_keys, tags) if grouped else []
        if exprs is None:
            return {}
        per = sql.json_rows(
            "per",
            [{"pi": i, "a": p.start, "b": p.end} for i, p in enumerate(ps)],
            {"pi": "int", "a": "ts", "b": "ts"},
        )
        part = ", ".join(["per.pi", *exprs])
        keys = "".join(f", {e} AS k{i}" for i, e in enumerate(exprs))
        ranks = " OR ".join(
            f"rn - 1 IN ((n - 1) * {pc} / 100, (n - 1) * {pc} / 100 + 1)" for pc in PERCENTS
        )
        stmt = (
            f"SELECT period, {', '.join(['n', 'rn', 'v', *(f'k{i}' for i in range(len(exprs)))])} "  # noqa: S608
            f"FROM (SELECT per.pi AS period{keys}, d.{column} AS v, "
            f"row_number() OVER (PARTITION BY {part} ORDER BY d.{column}) AS rn, "
            f"count(*) OVER (PARTITION BY {part}) AS n "
            f"FROM {per} "
            + sql.range_join(
                "per", "usage_details", "d", "d.completed_at >= per.a AND d.completed_at < per.b"
            )
            + " "
            f"WHERE d.{column} IS NOT NULL AND {_where(sql, 'd', q.filters, tags)}) AS ranked "
            f"WHERE {ranks}"
        )
        picked: dict[tuple[int, tuple[str, ...]], tuple[int, dict[int, float]]] = {}
        for row in await _rows(engine, time_limit, stmt, sql.params):
            key = (int(row[0]), tuple(str(v) for v in row[4:]))
            picked.setdefault(key, (int(row[1]), {}))[1][int(row[2]) - 1] = float(row[3])
        for key, (n, values) in picked.items():
            result = out.setdefault(key, ({}, {}))[which]
            for pc in PERCENTS:
                lo, frac = divmod((n - 1) * pc, 100)
                value = values[lo]
                if frac:
                    value += (values[lo + 1] - value) * frac / 100
                result[pc] = value
    return out


async def run_stats(engine: AsyncEngine, q: StatsQuery, time_limit: float = 10.0) -> StatsResult:
    """Answer one stats question: per group (and period) sums, totals per period."""
    ps = periods(q.since, q.until, q.period, q.tz)
    grans = tuple(sorted({s.granularity for s in segments(ps)}))
    if not ps:
        return StatsResult([], [], grans, ps, q.percentiles, q.percentiles_note)
    sql = Sql(engine.dialect.name)
    exprs = _group_exprs(sql, q, "r", None, True) or []
    top_keys: list[tuple[str, ...]] | None = None
    if q.top and q.group_by:
        rows = await _rows(engine, time_limit, _top_sql(sql, q, ps, exprs), sql.params)
        ranked = {tuple(str(v) for v in r[1 : 1 + len(exprs)]): int(r[-1]) for r in rows}
        top_keys = sorted((k for k, rk in ranked.items() if rk <= q.top), key=ranked.__getitem__)
    else:
        rows = await _rows(engine, time_limit, _rollup_sql(sql, q, ps, exprs, ""), sql.params)
    groups = [_stats(r, len(exprs), sql.pg, ps) for r in rows]
    totals = _totals(groups)
    done, note = q.percentiles, q.percentiles_note
    if q.percentiles:
        try:
            await _add_percentiles(engine, q, ps, top_keys, groups, totals, time_limit)
        except ReadTimeout:
            # the sums stand on their own; percentiles over many audit rows may not fit
            done, note = False, f"percentiles took longer than {time_limit:g}s; sums only"
            for g in (*groups, *totals):
                g.duration_pct, g.ttft_pct = {}, {}
    rank = {k: i for i, k in enumerate(top_keys or ())}
    groups.sort(
        key=lambda g: (
            g.period.timestamp() if g.period else 0,
            g.key[0] == OTHER if g.key else False,
            rank.get(g.key, 0),
            -g.cost_usd,
            -g.counts["requests"],
            g.key,
        )
    )
    totals.sort(key=lambda g: g.period.timestamp() if g.period else 0)
    return StatsResult(groups, totals, grans, ps, done, note)


def _totals(groups: Sequence[GroupStats]) -> list[GroupStats]:
    """Per-period totals: the sum of the groups (folding into __other__ keeps every row),
    so the rollups are read once."""
    out: dict[datetime | None, GroupStats] = {}
    for g in groups:
        t = out.get(g.period)
        if t is None:
            out[g.period] = GroupStats((), g.period, dict(g.counts), dict(g.tokens), g.cost_usd,
                                       g.duration_ms_sum, g.duration_count, g.ttft_ms_sum,
                                       g.ttft_count)  # fmt: skip
            continue
        for k, v in g.counts.items():
            t.counts[k] += v
        for k, v in g.tokens.items():
            t.tokens[k] += v
        t.cost_usd += g.cost_usd
        t.duration_ms_sum += g.duration_ms_sum
        t.duration_count += g.duration_count
        t.ttft_ms_sum += g.ttft_ms_sum
        t.ttft_count += g.ttft_count
    return list(out.values())


async def _add_percentiles(
    engine: AsyncEngine,
    q: StatsQuery,
    ps: list[Period],
    top_keys: Sequence[tuple[str, ...]] | None,
    groups: list[GroupStats],
    totals: list[GroupStats],
    time_limit: float,
) -> None:
    index = {p.label: i for i, p in enumerate(ps)}
    for grouped, targets in ((True, groups), (False, totals)):
        if grouped and not q.group_by:
            targets = [*groups, *totals]  # the same groups: one query answers both
        elif not grouped and not q.group_by:
            continue
        pct = await _percentiles(engine, q, ps, top_keys, grouped, time_limit)
        for g in targets:
            d, t = pct.get((index[g.period], g.key), ({}, {}))
            g.duration_pct, g.ttft_pct = d, t
