"""Re-pricing: recompute stored costs with today's price data and price file.

How a price added after the fact, or a corrected price file, reaches last month's bill. Audit
rows in [since, until) (optionally one model) whose cost was computed (never a client-sent
cost) are priced again, each at its own `completed_at`, by the same `Pricer` ingest uses. Rows
whose cost or unpriced reason changes are updated, and the hour and day rollups move by the
exact difference (cost, and the unpriced count), in ONE transaction per batch: a crash leaves
whole batches done, and running again changes nothing that is already right (idempotent).

Batches are read in (completed_at, request_id) order inside their transaction, locked on
Postgres (FOR UPDATE) and under SQLite's write lock, so two runs, or a run beside the
flusher, never double-apply a difference. Rows already purged by retention cannot be re-priced;
their rollups keep the old cost. A report's rollup row is found by the whole key: `node`, and
`dims` computed from its tags with the promoted_tags in force now (exporter.store.dims), so
hours flushed under other promoted_tags keep their old rollup cost (docs/configuration.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.money import ZERO, CostOverCap, money_text
from exporter.pricing import Pricer, Unpriced
from exporter.store.dims import dims_keys, dims_text
from exporter.store.tables import usage_details, usage_rollups

__all__ = ["ModelChange", "RepriceReport", "reprice"]

#: The rollup key besides granularity, bucket and `dims` (computed from the row's tags).
_DIMENSIONS = ("model", "provider", "operation", "user", "team", "api_key_id", "node")
_PRICED_BY = (
    "request_id", "completed_at", "provider", "model", "service_tier", "input_tokens",
    "output_tokens", "cached_input_tokens", "cache_creation_input_tokens",
    "cache_creation_1h_input_tokens", "reasoning_tokens", "input_audio_tokens",
    "cached_audio_input_tokens", "output_audio_tokens", "input_image_tokens",
    "output_image_tokens", "web_search_requests", "operation", "user", "team", "api_key_id",
    "cost_usd", "unpriced_reason", "node", "tags",
)  # fmt: skip


@dataclass(slots=True)
class ModelChange:
    """What re-pricing changed for one model."""

    rows: int = 0
    old_cost: Decimal = ZERO
    new_cost: Decimal = ZERO
    newly_priced: int = 0
    newly_unpriced: int = 0

    @property
    def delta(self) -> Decimal:
        return self.new_cost - self.old_cost


@dataclass(slots=True)
class RepriceReport:
    """The whole run: rows scanned and, per model, what changed."""

    scanned: int = 0
    changed: int = 0
    batches: int = 0
    dry_run: bool = False
    by_model: dict[str, ModelChange] = field(default_factory=dict)

    @property
    def delta(self) -> Decimal:
        return sum((c.delta for c in self.by_model.values()), ZERO)

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "scanned": self.scanned,
            "changed": self.changed,
            "batches": self.batches,
            "delta_usd": money_text(self.delta),
            "models": {
                m: {
                    "rows": c.rows,
                    "old_cost_usd": money_text(c.old_cost),
                    "new_cost_usd": money_text(c.new_cost),
                    "delta_usd": money_text(c.delta),
                    "newly_priced": c.newly_priced,
                    "newly_unpriced": c.newly_unpriced,
                }
                for m, c in sorted(self.by_model.items())
            },
        }

    def as_text(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        lines = [
            f"scanned {self.scanned} audit row(s); {verb} {self.changed} in {self.batches} "
            f"batch(es); total difference {money_text(self.delta)} USD"
        ]
        if self.by_model:
            lines.append(
                f"{'model':<40} {'rows':>7} {'old USD':>20} {'new USD':>20} {'delta USD':>20} "
                f"{'priced':>7} {'unpriced':>8}"
            )
            for m, c in sorted(self.by_model.items()):
                lines.append(
                    f"{m[:40]:<40} {c.rows:>7} {money_text(c.old_cost):>20} "
                    f"{money_text(c.new_cost):>20} {money_text(c.delta):>20} "
                    f"{c.newly_priced:>7} {c.newly_unpriced:>8}"
                )
        return "\n".join(lines)


def _new_price(pricer: Pricer, row: Mapping[str, Any]) -> tuple[Decimal | None, str]:
    try:
        value = pricer.price(row)
    except CostOverCap:
        return None, "over_cap"  # stored costs stay within the rollup column's range
    if isinstance(value, Unpriced):
        return None, value.value
    return value, ""


def _buckets(at: datetime) -> tuple[tuple[str, datetime], tuple[str, datetime]]:
    hour = at.replace(minute=0, second=0, microsecond=0)
    return ("hour", hour), ("day", hour.replace(hour=0))


async def _batch(
    conn: AsyncConnection,
    pricer: Pricer,
    where: Any,
    after: tuple[datetime, str] | None,
    size: int,
    report: RepriceReport,
    is_pg: bool,
    keys: tuple[str, ...],
) -> tuple[datetime, str] | None:
    """One transaction's work; returns the last key read (None when the range is done)."""
    t = usage_details
    conds = [where]
    if after is not None:
        conds.append(
            or_(
                t.c.completed_at > after[0],
                and_(t.c.completed_at == after[0], t.c.request_id > after[1]),
            )
        )
    stmt = (
        select(*(t.c[c] for c in _PRICED_BY))
        .where(and_(*conds))
        .order_by(t.c.completed_at, t.c.request_id)
        .limit(size)
    )
    if is_pg:
        stmt = stmt.with_for_update()
    rows = [dict(r._mapping) for r in (await conn.execute(stmt)).all()]
    if not rows:
        return None
    report.scanned += len(rows)
    updates: list[dict[str, Any]] = []
    deltas: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [ZERO, 0])
    for row in rows:
        cost, reason = _new_price(pricer, row)
        old = row["cost_usd"]
        if cost == old and reason == row["unpriced_reason"]:
            continue
        change = report.by_model.setdefault(row["model"], ModelChange())
        change.rows += 1
        change.old_cost += old or ZERO
        change.new_cost += cost or ZERO
        change.newly_priced += old is None and cost is not None
        change.newly_unpriced += old is not None and cost is None
        updates.append({"rid": row["request_id"], "cost": cost, "reason": reason})
        diff = (cost or ZERO) - (old or ZERO)
        unpriced = (cost is None) - (old is None)
        for bucket in _buckets(row["completed_at"]):
            acc = deltas[(*bucket, *(row[c] for c in _DIMENSIONS), dims_text(row["tags"], keys))]
            acc[0] += diff
            acc[1] += unpriced
    report.changed += len(updates)
    if updates and not report.dry_run:
        await conn.execute(
            update(t)
            .where(t.c.request_id == bindparam("rid"))
            .values(cost_usd=bindparam("cost"), unpriced_reason=bindparam("reason")),
            updates,
        )
        r = usage_rollups
        add = (
            r.c.cost_usd + bindparam("d", type_=r.c.cost_usd.type)
            if is_pg
            else func.dec_add(r.c.cost_usd, bindparam("d", type_=r.c.cost_usd.type))
        )
        key_match = [r.c.granularity == bindparam("g"), r.c.bucket_start == bindparam("b")]
        key_match += [r.c[c] == bindparam(f"k_{c}") for c in _DIMENSIONS]
        key_match.append(r.c.dims == bindparam("k_dims"))
        params = [
            {"g": k[0], "b": k[1], "k_dims": k[-1], "d": d[0], "u": d[1],
             **{f"k_{c}": v for c, v in zip(_DIMENSIONS, k[2:-1], strict=True)}}
            for k, d in sorted(deltas.items(), key=lambda kv: tuple(map(str, kv[0])))
        ]  # fmt: skip
        await conn.execute(
            update(r)
            .where(and_(*key_match))
            .values(cost_usd=add, unpriced=r.c.unpriced + bindparam("u")),
            params,
        )
    last = rows[-1]
    report.batches += 1
    return last["completed_at"], last["request_id"]


async def reprice(
    engine: AsyncEngine,
    pricer: Pricer,
    since: datetime,
    until: datetime,
    model: str | None = None,
    *,
    dry_run: bool = False,
    batch_size: int = 1000,
    promoted_tags: Iterable[str] = (),
) -> RepriceReport:
    """Re-price computed costs of audit rows completed in [since, until); `promoted_tags` as
    the flusher wrote the rollups (the rollup row of a report is found by its `dims`)."""
    keys = dims_keys(promoted_tags)
    t = usage_details
    conds = [t.c.completed_at >= since, t.c.completed_at < until, t.c.cost_sent.is_(False)]
    if model is not None:
        conds.append(t.c.model == model)
    where = and_(*conds)
    is_pg = engine.dialect.name == "postgresql"
    report = RepriceReport(dry_run=dry_run)
    after: tuple[datetime, str] | None = None
    while True:
        async with engine.begin() as conn:
            if not is_pg:
                # take SQLite's write lock first, so no flush commits between read and write
                await conn.execute(text("DELETE FROM usage_rollups WHERE 0"))
            after = await _batch(conn, pricer, where, after, batch_size, report, is_pg, keys)
            if dry_run:
                await conn.rollback()
        if after is None:
            return report
