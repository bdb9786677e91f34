"""GET /v1/requests (keyset pages of audit rows) and GET /v1/requests/{request_id}."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from exporter.api.figures import TokenSums
from exporter.api.params import ParamError, encode_cursor, parse_requests, wants_csv
from exporter.api.stats import csv_text
from exporter.httputil import Route, error_response, json_response
from exporter.store.details import DETAIL_FIELDS, request_by_id, request_page
from exporter.store.readsql import ReadError
from exporter.store.rows import clean_text
from exporter.store.tables import decimal_text
from exporter.usage import MAX_ID

__all__ = ["RequestRow", "RequestsHandler", "RequestsPage", "json_row"]


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """An audit row as JSON: exact cost as a string, times in RFC 3339."""
    out = {}
    for k, v in row.items():
        if isinstance(v, Decimal):
            v = decimal_text(v)
        elif isinstance(v, datetime):
            v = v.isoformat()
        out[k] = v
    return out


class RequestRow(TokenSums):
    """One stored request (the audit row)."""

    model_config = ConfigDict(extra="allow")
    request_id: str
    model: str
    provider: str
    operation: str
    user: str
    team: str
    api_key_id: str
    trace_id: str
    parent_id: str
    node: str
    cost_usd: str | None = Field(description="exact decimal USD; null when unpriced")
    status: str
    error_type: str
    stream: bool
    completed: bool
    estimated: bool
    output_chunk_count: int | None
    request_content_bytes: int | None
    started_at: str | None
    completed_at: str
    duration_ms: float | None
    ttft_ms: float | None
    source: str


class RequestsPage(BaseModel):
    requests: list[RequestRow]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class RequestsHandler:
    def __init__(self, engine: Any, time_limit: float) -> None:
        self._engine = engine
        self._time_limit = time_limit

    async def list_requests(self, request: web.Request) -> web.Response:
        try:
            csv_wanted = wants_csv(request.query, request.headers.get("Accept", ""))
            q = parse_requests(request.query)
        except ParamError as exc:
            return error_response(400, str(exc))
        try:
            page = await request_page(
                self._engine,
                since=q.since,
                until=q.until,
                filters=q.filters,
                after=q.after,
                limit=q.limit,
                time_limit=self._time_limit,
            )
        except ReadError as exc:
            return error_response(
                503,
                f"{exc}; retry, or narrow the range or add filters",
                headers={"Retry-After": "1"},
            )
        rows = [json_row(r) for r in page.rows]
        cursor = encode_cursor(page.next_key) if page.next_key else None
        if csv_wanted:
            headers = {"X-Next-Cursor": cursor} if cursor else None
            return web.Response(
                text=csv_text(DETAIL_FIELDS, rows), content_type="text/csv", headers=headers
            )
        return json_response({"requests": rows, "next_cursor": cursor})

    async def get(self, request: web.Request) -> web.Response:
        request_id = clean_text(request.match_info["request_id"])  # stored ids never hold NUL
        if len(request_id) > MAX_ID:
            return error_response(400, f"request_id is at most {MAX_ID} characters")
        try:
            row = await request_by_id(self._engine, request_id, self._time_limit)
        except ReadError as exc:
            return error_response(503, str(exc), headers={"Retry-After": "1"})
        if row is None:
            return error_response(404, "no stored request with this request_id")
        return json_response(json_row(row))

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/v1/requests", self.list_requests, "read"),
            Route("GET", "/v1/requests/{request_id}", self.get, "read"),
        ]
