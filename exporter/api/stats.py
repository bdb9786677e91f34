"""GET /v1/stats: usage per group and period, as JSON or CSV; the one place that defines the
figures (the `report` CLI command and the billing board use the same definitions):

- success_rate = (requests - errors) / requests, errors counting every non-success status;
- avg_duration_ms = duration sum / reports that carried a duration (same for TTFT);
- avg_*_tokens = token sum / requests; cost_usd is the exact decimal sum, as a string;
- p50/p95 from the audit rows (linear interpolation), null past their retention.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from exporter.api.figures import TokenSums
from exporter.api.params import ParamError, parse_stats, wants_csv
from exporter.httputil import Route, error_response, json_response
from exporter.store.readsql import ReadError
from exporter.store.stats import (
    COUNTS,
    PERCENTS,
    TOKENS,
    ZERO_COST,
    GroupStats,
    StatsQuery,
    StatsResult,
)
from exporter.store.stats import run_stats as _run
from exporter.store.tables import decimal_text

__all__ = ["STAT_FIELDS", "StatsHandler", "StatsResponse", "stat_fields", "stats_document"]


def _ratio(num: float, den: int) -> float | None:
    return num / den if den else None


def stat_fields(g: GroupStats) -> dict[str, Any]:
    """The figures of one group, in STAT_FIELDS order."""
    n = g.counts["requests"]
    total_tokens = g.tokens["input_tokens"] + g.tokens["output_tokens"]
    out: dict[str, Any] = dict(g.counts)
    out["success_rate"] = _ratio(n - g.counts["errors"], n)
    out.update(g.tokens)
    out["total_tokens"] = total_tokens
    out["cost_usd"] = decimal_text(g.cost_usd)
    out["avg_duration_ms"] = _ratio(g.duration_ms_sum, g.duration_count)
    for pc in PERCENTS:
        out[f"p{pc}_duration_ms"] = g.duration_pct.get(pc)
    out["avg_ttft_ms"] = _ratio(g.ttft_ms_sum, g.ttft_count)
    for pc in PERCENTS:
        out[f"p{pc}_ttft_ms"] = g.ttft_pct.get(pc)
    out["avg_input_tokens"] = _ratio(g.tokens["input_tokens"], n)
    out["avg_output_tokens"] = _ratio(g.tokens["output_tokens"], n)
    out["avg_total_tokens"] = _ratio(total_tokens, n)
    return out


_EMPTY = GroupStats((), None, dict.fromkeys(COUNTS, 0), dict.fromkeys(TOKENS, 0), ZERO_COST)
STAT_FIELDS: tuple[str, ...] = tuple(stat_fields(_EMPTY))


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def _group_row(q: StatsQuery, g: GroupStats) -> dict[str, Any]:
    """group_by values first (None in the totals), then the period, then the figures."""
    key = g.key or (None,) * len(q.group_by)
    row: dict[str, Any] = dict(zip(q.group_by, key, strict=True))
    if q.period is not None:
        row[q.period] = _iso(g.period)
    row.update(stat_fields(g))
    return row


def stats_document(q: StatsQuery, result: StatsResult) -> dict[str, Any]:
    """The JSON answer (also what `report --format json` prints)."""
    totals = list(result.totals)
    if not totals and q.period is None:
        totals = [_EMPTY]
    return {
        "from": q.since.astimezone(UTC).isoformat(),
        "to": q.until.astimezone(UTC).isoformat(),
        "tz": q.tz.key,
        "group_by": [*q.group_by, *([q.period] if q.period else [])],
        "filters": {k: list(v) for k, v in sorted(q.filters.items())},
        "top": q.top,
        "rollups": list(result.granularities),
        "percentiles": result.percentiles,
        "percentiles_note": result.percentiles_note,
        "groups": [_group_row(q, g) for g in result.groups],
        "totals": [_group_row(q, g) for g in totals],
    }


def csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    """'' for null; objects (a request's tags) as JSON, never a Python repr."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


def csv_columns(doc: dict[str, Any]) -> list[str]:
    return [*doc["group_by"], *STAT_FIELDS]


class StatsRow(TokenSums):
    """One group (or the totals): the group_by values by name (`model`, `tag:project`, `day`…)
    followed by these figures."""

    model_config = ConfigDict(extra="allow")
    requests: int
    errors: int = Field(description="every request whose status is not success")
    cancelled: int
    estimated: int
    success_rate: float | None = Field(description="(requests - errors) / requests")
    cost_usd: str = Field(description="exact decimal USD", pattern=r"^-?\d+\.\d+$")
    avg_duration_ms: float | None = Field(description="over the reports that carried one")
    p50_duration_ms: float | None
    p95_duration_ms: float | None
    avg_ttft_ms: float | None
    p50_ttft_ms: float | None
    p95_ttft_ms: float | None
    avg_input_tokens: float | None
    avg_output_tokens: float | None
    avg_total_tokens: float | None


class StatsResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    from_: str = Field(alias="from")
    to: str
    tz: str
    group_by: list[str]
    filters: dict[str, list[str]]
    top: int | None
    rollups: list[str] = Field(description="which rollup granularities answered")
    percentiles: bool = Field(description="whether p50/p95 were computed from the audit rows")
    percentiles_note: str | None = Field(
        description="why not: past the audit retention, not asked, or too slow"
    )
    groups: list[StatsRow]
    totals: list[StatsRow] = Field(description="one per period (one without a period)")


class StatsHandler:
    """GET /v1/stats."""

    def __init__(
        self,
        engine: Any,
        *,
        max_range_days: int,
        retention_days: int,
        promoted_tags: Sequence[str],
        time_limit: float,
    ) -> None:
        self._engine = engine
        self._max_range = max_range_days
        self._retention = retention_days
        self._promoted = tuple(promoted_tags)
        self._time_limit = time_limit

    def parse(self, query: Any, now: datetime | None = None) -> StatsQuery:
        return parse_stats(
            query,
            now=now or datetime.now(UTC),
            max_range_days=self._max_range,
            retention_days=self._retention,
            promoted_tags=self._promoted,
        )

    async def document(self, q: StatsQuery) -> dict[str, Any]:
        return stats_document(q, await _run(self._engine, q, self._time_limit))

    async def get(self, request: web.Request) -> web.Response:
        try:
            csv_wanted = wants_csv(request.query, request.headers.get("Accept", ""))
            q = self.parse(request.query)
        except ParamError as exc:
            return error_response(400, str(exc))
        try:
            doc = await self.document(q)
        except ReadError as exc:
            return error_response(
                503, f"{exc}; retry, or narrow the range or grouping", headers={"Retry-After": "1"}
            )
        if csv_wanted:
            return web.Response(
                text=csv_text(csv_columns(doc), doc["groups"]), content_type="text/csv"
            )
        return json_response(doc)

    def routes(self) -> list[Route]:
        return [Route("GET", "/v1/stats", self.get, "read")]
