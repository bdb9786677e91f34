"""GET /v1/traces/{trace_id}/usage: which node of a pipeline burned what.

Each stored request of the trace is a tree node; its parent is the request whose request_id
(or, for OTLP spans stored as `<trace_id>-<span_id>`, whose span id) equals its parent_id.
Requests whose parent is not stored are roots. Each node carries its own figures and the
cumulative ones of its subtree; `span_ms` is the subtree's wall time (first start to last
end), which for concurrent branches is less than the summed durations.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from exporter.api.figures import TokenSums
from exporter.api.requests import json_row
from exporter.httputil import Route, error_response, json_response
from exporter.store.details import trace_rows
from exporter.store.readsql import ReadError
from exporter.store.rows import clean_text
from exporter.store.tables import COST_QUANTUM
from exporter.usage import MAX_ID

__all__ = ["TraceHandler", "TraceUsage", "build_tree"]

TOKENS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_creation_input_tokens",
          "reasoning_tokens", "total_tokens")  # fmt: skip
_ZERO = Decimal(0).quantize(COST_QUANTUM)


def _own(row: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {k: row[k] for k in TOKENS}
    figures["cost_usd"] = row["cost_usd"] if row["cost_usd"] is not None else _ZERO
    figures["duration_ms"] = row["duration_ms"] or 0.0
    figures["requests"] = 1
    return figures


def _add(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k, v in other.items():
        into[k] += v


def _window(row: dict[str, Any]) -> tuple[datetime, datetime]:
    end: datetime = row["completed_at"]
    start: datetime | None = row["started_at"]
    if start is None:
        start = end - timedelta(milliseconds=row["duration_ms"] or 0.0)
    return start, end


def build_tree(rows: Sequence[dict[str, Any]], trace_id: str) -> list[dict[str, Any]]:
    """The forest of a trace's rows (roots in start order), each node with `own`,
    `cumulative`, `span_ms` and `children`. Cycles (hostile parent_ids) are cut."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_id[row["request_id"]] = row
        prefix = f"{trace_id}-"
        if trace_id and row["request_id"].startswith(prefix):
            by_id.setdefault(row["request_id"][len(prefix) :], row)
    order = {r["request_id"]: i for i, r in enumerate(rows)}
    children: dict[str, list[str]] = {r["request_id"]: [] for r in rows}
    roots: list[str] = []
    for row in rows:
        parent = by_id.get(row["parent_id"]) if row["parent_id"] else None
        if parent is None or parent["request_id"] == row["request_id"]:
            roots.append(row["request_id"])
        else:
            children[parent["request_id"]].append(row["request_id"])
    nodes: dict[str, dict[str, Any]] = {}
    visited: set[str] = set()

    def build(root: str) -> None:
        stack = [(root, False)]
        while stack:
            rid, done = stack.pop()
            if not done:
                if rid in visited:
                    continue
                visited.add(rid)
                stack.append((rid, True))
                stack.extend((c, False) for c in reversed(children[rid]) if c not in visited)
                continue
            row = by_id[rid]
            own = _own(row)
            cumulative = dict(own)
            start, end = _window(row)
            kids = [nodes[c] for c in children[rid] if c in nodes and nodes[c]["_parent"] is None]
            for kid in kids:
                kid["_parent"] = rid
                _add(cumulative, kid["_cum"])
                start, end = min(start, kid["_start"]), max(end, kid["_end"])
            nodes[rid] = {
                "_parent": None, "_cum": cumulative, "_start": start, "_end": end,
                "request_id": rid, "parent_id": row["parent_id"], "node": row["node"],
                "model": row["model"], "status": row["status"],
                "started_at": row["started_at"],
                "completed_at": row["completed_at"],
                "own": own, "cumulative": cumulative,
                "span_ms": (end - start).total_seconds() * 1000,
                "children": kids,
            }  # fmt: skip

    for rid in roots:
        build(rid)
    # whatever is left sits on a parent cycle: cut it at its earliest request
    for row in rows:
        if row["request_id"] not in visited:
            roots.append(row["request_id"])
            build(row["request_id"])
    forest = [nodes[r] for r in sorted(roots, key=lambda r: (nodes[r]["_start"], order[r]))]
    return [_clean(n) for n in forest]


def _clean(node: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready copy without the bookkeeping keys (iterative: trees can be deep)."""
    out = {k: v for k, v in node.items() if not k.startswith("_")}
    stack = [out]
    while stack:
        n = stack.pop()
        n["own"], n["cumulative"] = json_row(n["own"]), json_row(n["cumulative"])
        n["started_at"] = n["started_at"].isoformat() if n["started_at"] else None
        n["completed_at"] = n["completed_at"].isoformat()
        n["children"] = [
            {k: v for k, v in c.items() if not k.startswith("_")} for c in n["children"]
        ]
        stack.extend(n["children"])
    return out


def by_node(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Own figures summed per node, most expensive first, each with `cumulative` figures of the
    node and every node nested under it. The SDK names nested nodes as paths (`agent/tools`),
    so a path's ancestors are listed too, even when they made no call of their own."""
    sums: dict[str, dict[str, Any]] = {}
    for row in rows:
        own = _own(row)
        if row["node"] in sums:
            _add(sums[row["node"]], own)
        else:
            sums[row["node"]] = own
    zero: dict[str, Any] = {k: 0 for k in TOKENS} | {
        "requests": 0,
        "cost_usd": _ZERO,
        "duration_ms": 0.0,
    }
    for name in list(sums):
        parts = name.split("/")
        for i in range(1, len(parts)):
            sums.setdefault("/".join(parts[:i]), dict(zero))
    cumulative = {name: dict(own) for name, own in sums.items()}
    for name, own in sums.items():
        parts = name.split("/")
        for i in range(1, len(parts)):
            _add(cumulative["/".join(parts[:i])], own)
    ranked = sorted(
        sums.items(), key=lambda kv: (-kv[1]["cost_usd"], -kv[1]["total_tokens"], kv[0])
    )
    return [{"node": k, **json_row(v), "cumulative": json_row(cumulative[k])} for k, v in ranked]


class Figures(TokenSums):
    model_config = ConfigDict(extra="forbid")
    requests: int
    cost_usd: str = Field(description="exact decimal USD")
    duration_ms: float = Field(description="summed durations (compute time)")


class TraceNode(BaseModel):
    request_id: str
    parent_id: str
    node: str
    model: str
    status: str
    started_at: str | None
    completed_at: str
    own: Figures
    cumulative: Figures = Field(description="this request and every descendant")
    span_ms: float = Field(description="wall time of the subtree, first start to last end")
    children: list[TraceNode]


class NodeFigures(Figures):
    node: str
    cumulative: Figures = Field(
        description="this node and the nodes nested under it (SDK node paths: `agent/tools`)"
    )


class TraceUsage(BaseModel):
    trace_id: str
    requests: int
    totals: Figures
    by_node: list[NodeFigures]
    tree: list[TraceNode]


class TraceHandler:
    def __init__(self, engine: Any, max_rows: int, time_limit: float) -> None:
        self._engine = engine
        self._max_rows = max_rows
        self._time_limit = time_limit

    async def usage(self, request: web.Request) -> web.Response:
        trace_id = clean_text(request.match_info["trace_id"])  # stored ids never hold NUL
        if len(trace_id) > MAX_ID:
            return error_response(400, f"trace_id is at most {MAX_ID} characters")
        try:
            rows = await trace_rows(self._engine, trace_id, self._max_rows, self._time_limit)
        except ReadError as exc:
            return error_response(503, str(exc), headers={"Retry-After": "1"})
        if not rows:
            return error_response(404, "no stored request carries this trace_id")
        if len(rows) > self._max_rows:
            return error_response(
                422, f"the trace has more than {self._max_rows} requests; use /v1/requests"
            )
        totals = _own(rows[0])
        for row in rows[1:]:
            _add(totals, _own(row))
        return json_response(
            {
                "trace_id": trace_id,
                "requests": len(rows),
                "totals": json_row(totals),
                "by_node": by_node(rows),
                "tree": build_tree(rows, trace_id),
            }
        )

    def routes(self) -> list[Route]:
        return [Route("GET", "/v1/traces/{trace_id}/usage", self.usage, "read")]
