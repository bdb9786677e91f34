"""POST /v1/usage and POST /v2/usage/gateway-metrics."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web

from exporter.httputil import Route, error_response, json_response
from exporter.ingest.body import BodyError, ClientGone, json_text, parse_items, read_body
from exporter.ingest.pipeline import Backpressure, Ingestor, IngestResult, Prepared
from exporter.logevents import RateLimitedLog
from exporter.selfmetrics import SelfMetrics


class IngestEndpoint:
    """What every ingest endpoint shares: the pipeline, limits, body reading, quiet logs."""

    def __init__(
        self, ingestor: Ingestor, self_metrics: SelfMetrics, max_body_bytes: int, max_items: int
    ) -> None:
        self._ingestor = ingestor
        self._m = self_metrics
        self._max_body = max_body_bytes
        self._max_items = max_items
        self._log_once_a_minute = RateLimitedLog(logging.getLogger(type(self).__module__))

    async def _read(self, request: web.Request) -> bytes:
        return await read_body(request, self._max_body)

    async def _accept(
        self, request: web.Request, items: list[Any], pre_errors: dict[int, str] | None
    ) -> IngestResult:
        """Items decoded from a body → the pipeline (see `_accept_prepared`)."""
        return await self._accept_prepared(request, self._ingestor.prepare(items, pre_errors))

    async def _accept_prepared(self, request: web.Request, prepared: Prepared) -> IngestResult:
        """The pipeline plus the logging every endpoint does the same way: one line a minute
        for backpressure (re-raised for the endpoint's own 503 body) and for invalid items."""
        try:
            result = await self._ingestor.accept(*prepared)
        except Backpressure as exc:
            self._log_once_a_minute("backpressure", "%s: answering 503 (backpressure): %s",
                                    request.path, exc)  # fmt: skip
            raise
        if result.errors:
            first = result.errors[0]
            self._log_once_a_minute.request(
                "invalid",
                request,
                f"{len(result.errors)} invalid item(s); first (index {first['index']}): "
                f"{str(first['error'])[:300]}",
            )
        return result


class IngestHandlers(IngestEndpoint):
    """POST /v1/usage and POST /v2/usage/gateway-metrics."""

    def _reject(self, request: web.Request, exc: BodyError) -> web.Response:
        if isinstance(exc, ClientGone):  # nobody to answer, nothing to log
            self._m.client_disconnects.inc()
            return error_response(exc.status, str(exc), headers={"Connection": "close"})
        self._m.rejected.labels(exc.reason).inc()
        self._log_once_a_minute.request(exc.reason, request, f"{exc.status}: {str(exc)[:200]}")
        return error_response(
            exc.status, str(exc), headers={"Connection": "close"} if exc.close else None
        )

    async def _ingest(self, request: web.Request, prepared: Prepared) -> web.Response:
        try:
            result = await self._accept_prepared(request, prepared)
        except Backpressure as exc:
            return error_response(
                503,
                "write-ahead log is full, closing or cannot write; retry later",
                headers={"Retry-After": str(exc.retry_after)},
            )
        if not result.errors:  # the common answer: a prebuilt body
            return web.Response(
                body=_clean_body(result.accepted, result.duplicates),
                status=202,
                content_type="application/json",
            )
        return json_response(result.as_json(), status=_status(result))

    async def usage(self, request: web.Request) -> web.Response:
        """A JSON body of canonical reports is validated from its bytes in one call
        (exporter.ingest.canonical); any other body, or one it refuses, is parsed and
        validated by the general path, which gives every error answer."""
        try:
            body = await read_body(request, self._max_body)
            content_type = request.headers.get("Content-Type", "")
            text = json_text(body, content_type)
            prepared = None
            if text is not None:
                prepared = self._ingestor.prepare_canonical(text, self._max_items)
            if prepared is None:
                parsed = parse_items(body, content_type, self._max_items)
                prepared = self._ingestor.prepare(parsed.items, parsed.line_errors)
        except BodyError as exc:
            return self._reject(request, exc)
        return await self._ingest(request, prepared)

    async def gateway_metrics(self, request: web.Request) -> web.Response:
        """GPUStack's gateway sends exactly one JSON object per call."""
        try:
            body = await self._read(request)
            parsed = parse_items(body, request.headers.get("Content-Type", ""), 1)
        except BodyError as exc:
            return self._reject(request, exc)
        if parsed.line_errors or not isinstance(parsed.items[0], dict):
            return self._reject(request, BodyError(400, "bad_body", "body must be one JSON object"))
        if not any(k in parsed.items[0] for k in ("input_token", "output_token", "access_key")):
            parsed.items[0].setdefault("request_count", 1)  # route to the GPUStack adapter
        return await self._ingest(request, self._ingestor.prepare(parsed.items))

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/usage", self.usage, "ingest"),
            Route("POST", "/v2/usage/gateway-metrics", self.gateway_metrics, "ingest"),
        ]


@lru_cache(maxsize=1024)
def _clean_body(accepted: int, duplicates: int) -> bytes:
    """The 202 body of a request without invalid items (the same JSON as `as_json`)."""
    return orjson.dumps(IngestResult(accepted, duplicates).as_json())


def _status(result: IngestResult) -> int:
    if result.accepted or result.duplicates or not result.errors:
        return 202
    return 422
