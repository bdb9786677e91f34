"""POST /v1/traces: OTLP/HTTP trace export (protobuf or JSON) → usage reports.

Spans carrying GenAI usage (any spelling `exporter.ingest.adapters.otel` knows) become
reports; failed model calls (status ERROR, no usage) become error reports; other spans are
ignored. The batch goes through the same `Ingestor.ingest` as POST /v1/usage. The request id
is `gen_ai.response.id`, else `<trace id>-<span id>`, else (a span without ids) a hash of the
span's content, stable across re-exports: a retried export is counted once, and id-less spans
are never merged into each other.

The user is the span's (first of the configured attribute names), else its nearest parent's
in the same export, else the resource's. Answers follow the OTLP/HTTP spec: 200 with an
`ExportTraceServiceResponse` in the request's encoding (`partial_success` naming the spans we
could not use), 400/413/415 with a `google.rpc.Status`, 503 + Retry-After on backpressure.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from exporter.httputil import Route
from exporter.ingest.adapters.otel import (
    DEFAULT_USER_ATTRIBUTES,
    from_otel_attributes,
    is_genai,
    is_usage,
)
from exporter.ingest.body import BodyError
from exporter.ingest.handlers import IngestEndpoint
from exporter.ingest.otlp_decode import (
    OtlpError,
    ResourceView,
    SpanView,
    parse_json,
    parse_protobuf,
)
from exporter.ingest.pipeline import Backpressure

__all__ = ["OtlpHandler", "rpc_status", "usage_items"]

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: google.rpc.Code values used in error bodies
_RPC_CODE = {400: 3, 404: 12, 413: 8, 415: 3, 503: 14}
_MAX_NAMED = 5  # spans named in a partial_success message
_MAX_PARENT_HOPS = 64
#: bodies above this decode off the event loop (bench/otlp_json.py measures both)
_INLINE_DECODE_BYTES = 256 * 1024


def _time(nanos: int) -> datetime:
    return _EPOCH + timedelta(microseconds=nanos // 1000)


def _content_id(span: SpanView, resource: Mapping[str, Any]) -> str:
    """An id from what the span says, for exporters that send none: the same span re-exported
    gets the same id; two different calls differ in timestamps or attributes."""
    doc = [span.name, span.start, span.end, sorted(span.attrs.items()), sorted(resource.items())]
    digest = hashlib.blake2b(orjson.dumps(doc, default=str), digest_size=16).hexdigest()
    return f"otlp-{digest}"


def _user_of(attrs: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value is not None and value != "":
            return value
    return None


def span_item(
    span: SpanView,
    resource: Mapping[str, Any],
    user_keys: Sequence[str],
    parents: Mapping[str, tuple[str, Any]],
) -> dict[str, Any] | None:
    """The canonical mapping for one span, or None when it is not a model call.

    Raises OtlpError when the span cannot be used (named in partial_success)."""
    if span.error:
        raise OtlpError(span.error)
    attrs = span.attrs
    usage = is_usage(attrs)
    failed = span.is_error and not usage and is_genai(attrs)
    if not usage and not failed:
        return None
    item = from_otel_attributes(attrs, user_keys, envelope=False)
    if "user" not in item:
        user = _inherited_user(span, parents)
        if user is None:
            user = _user_of(resource, user_keys)
        if user is not None:
            item["user"] = str(user) if type(user) is int else user
    if "request_id" not in item:
        if span.trace_id and span.span_id:
            item["request_id"] = f"{span.trace_id}-{span.span_id}"
        else:
            item["request_id"] = _content_id(span, resource)
    if span.trace_id:
        item["trace_id"] = span.trace_id  # after gen_ai.conversation.id: the trace id wins
    if span.parent_id:
        item["parent_id"] = span.parent_id
    service = resource.get("service.name")
    if "node" not in item and isinstance(service, str) and service:
        item["node"] = service
    try:
        if span.start:
            item["started_at"] = _time(span.start)
        if span.end:
            item["completed_at"] = _time(span.end)
    except OverflowError:
        raise OtlpError("span start or end time is out of range") from None
    if span.start and span.end and span.end >= span.start:
        item["duration_ms"] = (span.end - span.start) / 1e6
    if span.is_error:
        item["status"] = "error"
        if not item.get("error_type"):
            item["error_type"] = "error"
    return item


def _inherited_user(span: SpanView, parents: Mapping[str, tuple[str, Any]]) -> Any:
    parent = span.parent_id
    for _ in range(_MAX_PARENT_HOPS):
        if not parent or parent not in parents:
            return None
        parent, user = parents[parent]
        if user is not None:
            return user
    return None


def usage_items(
    resources: list[ResourceView], user_keys: Sequence[str] = DEFAULT_USER_ATTRIBUTES
) -> tuple[list[Any], dict[int, str], list[str]]:
    """Items for `Ingestor.ingest` (spans that are not model calls left out), per-index errors,
    and a short name per item for messages."""
    parents: dict[str, tuple[str, Any]] = {}
    for resource in resources:
        for span in resource.spans:
            if span.span_id:
                parents[span.span_id] = (span.parent_id, _user_of(span.attrs, user_keys))
    items: list[Any] = []
    errors: dict[int, str] = {}
    names: list[str] = []
    for resource in resources:
        for span in resource.spans:
            try:
                item = span_item(span, resource.attrs, user_keys, parents)
            except OtlpError as exc:
                errors[len(items)] = str(exc)
                item = {}
            if item is not None:
                items.append(item if item else None)
                names.append(f"{span.name[:64]!r} (span {span.span_id or '-'})")
    return items, errors, names


# -- answers ----------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def rpc_status(code: int, message: str) -> bytes:
    """A protobuf `google.rpc.Status` (code = 1, message = 2) without its generated module."""
    return b"\x08" + _varint(code) + _field(2, message.encode())


def _export_response(media: str, rejected: int, message: str) -> bytes:
    """`Export{Trace,Metrics}ServiceResponse`: partial_success = 1 {rejected = 1, message = 2}."""
    if media == JSON:
        if not rejected and not message:
            return b"{}"
        return orjson.dumps(
            {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}}
        )
    if not rejected and not message:
        return b""
    inner = (b"\x08" + _varint(rejected) if rejected else b"") + _field(2, message.encode())
    return _field(1, inner)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class OtlpHandler(IngestEndpoint):
    """POST /v1/traces (and POST /v1/metrics, answered with what to send instead)."""

    def __init__(self, *args: Any, user_attributes: Sequence[str] = DEFAULT_USER_ATTRIBUTES,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self._user_keys = tuple(user_attributes)
        self._extra_keys = frozenset(self._user_keys)

    def _error(
        self,
        request: web.Request,
        media: str,
        status: int,
        reason: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        if status != 503:  # backpressure is counted by the ingestor and logged by _accept
            self._m.rejected.labels(reason).inc()
            self._log_once_a_minute(reason, "otlp: %d (%s) for %s from %s: %s", status, reason,
                                    request.path, request.remote, message[:200])  # fmt: skip
        code = _RPC_CODE.get(status, 3)
        if media == PROTOBUF:
            body, ctype = rpc_status(code, message), PROTOBUF
        else:
            body, ctype = orjson.dumps({"code": code, "message": message}), JSON
        return web.Response(status=status, body=body, content_type=ctype, headers=headers)

    def _decode(self, media: str, body: bytes) -> tuple[list[Any], dict[int, str], list[str]]:
        parse = parse_json if media == JSON else parse_protobuf
        return usage_items(parse(body, self._extra_keys), self._user_keys)

    async def metrics(self, request: web.Request) -> web.Response:
        """OTLP metrics carry no request ids, so they cannot be counted exactly once."""
        media = _media_type(request.headers.get("Content-Type", ""))
        return self._error(
            request,
            media if media in (PROTOBUF, JSON) else JSON,
            404,
            "otlp_metrics",
            "this exporter does not accept OTLP metrics (gen_ai.client.token.usage has no "
            "request id and cannot be counted exactly once): export traces to /v1/traces",
        )

    async def traces(self, request: web.Request) -> web.Response:
        media = _media_type(request.headers.get("Content-Type", ""))
        if media not in (PROTOBUF, JSON):
            return self._error(
                request,
                JSON,
                415,
                "unsupported_media_type",
                f"Content-Type {media!r} is not supported; use {PROTOBUF} or {JSON}",
            )
        try:
            body = await self._read(request)
        except BodyError as exc:
            headers = {"Connection": "close"} if exc.close else None
            return self._error(request, media, exc.status, exc.reason, str(exc), headers)
        try:
            if len(body) > _INLINE_DECODE_BYTES:
                # a large export decodes in a worker thread: it still holds the GIL, but the
                # loop gets it back every switch interval (5 ms) instead of after the whole body
                items, pre_errors, names = await asyncio.to_thread(self._decode, media, body)
            else:
                items, pre_errors, names = self._decode(media, body)
        except OtlpError as exc:
            return self._error(request, media, 400, "bad_body", str(exc))
        if len(items) > self._max_items:
            return self._error(
                request,
                media,
                413,
                "batch_too_large",
                f"{len(items)} usage spans in one export exceed {self._max_items}",
            )
        if not items:
            return web.Response(status=200, body=_export_response(media, 0, ""),
                                content_type=media)  # fmt: skip
        try:
            result = await self._accept(request, items, pre_errors)
        except Backpressure as exc:
            return self._error(request, media, 503, "backpressure",
                               "write-ahead log is full or closing; retry later",
                               {"Retry-After": str(exc.retry_after)})  # fmt: skip
        message = ""
        if result.errors:
            named = [f"{names[int(e['index'])]}: {e['error']}" for e in result.errors[:_MAX_NAMED]]
            more = len(result.errors) - len(named)
            message = (
                f"{len(result.errors)} usage span(s) rejected: " + "; ".join(named)
                + (f" (+{more} more)" if more > 0 else "")
            )[:2000]  # fmt: skip
        body_out = _export_response(media, len(result.errors), message)
        return web.Response(status=200, body=body_out, content_type=media)

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/traces", self.traces, "ingest"),
            Route("POST", "/v1/metrics", self.metrics, "ingest"),
        ]
