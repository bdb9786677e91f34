"""POST /v1/traces: OTLP/HTTP trace export (protobuf or JSON) → usage reports.

Only spans carrying GenAI usage (`gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens`)
become reports; the others are accepted and ignored. Each usage span is flattened into the
attribute dict that `exporter.ingest.adapters.from_otel_attributes` already understands, and
the batch goes through the same `Ingestor.ingest` as POST /v1/usage (WAL, dedupe, pricing,
counters). The request id is `gen_ai.response.id`, else `<trace id>-<span id>`, so a retried
export is counted once.

Answers follow the OTLP/HTTP spec: 200 with an `ExportTraceServiceResponse` in the request's
encoding (with `partial_success` when usage spans were invalid), 400/413/415 with a
`google.rpc.Status`, 503 + Retry-After on backpressure.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

# protobuf ships no type information (types-protobuf is not a dependency)
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from exporter.httputil import Route
from exporter.ingest.body import BodyError
from exporter.ingest.handlers import IngestEndpoint
from exporter.ingest.pipeline import Backpressure

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_USAGE_KEYS = ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens")
#: span/resource attributes handed to the adapter besides every `gen_ai.*` one
_PASSED = frozenset({"error.type", "user.id", "enduser.id"})
_USER_KEYS = ("user.id", "enduser.id")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: google.rpc.Code values used in error bodies
_RPC_CODE = {400: 3, 413: 8, 415: 3, 503: 14}


class OtlpError(ValueError):
    """The request as a whole is unusable."""


def _any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return None


def _attributes(kvs: Iterable[KeyValue], wanted: frozenset[str] = _PASSED) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        if kv.key.startswith("gen_ai.") or kv.key in wanted:
            value = _any_value(kv.value)
            if value is None:
                continue
            if (
                kv.key.startswith("gen_ai.usage.")
                and isinstance(value, float)
                and value.is_integer()
            ):
                value = int(value)  # some SDKs send every number as a double
            out[kv.key] = value
    return out


def _time(nanos: int) -> datetime:
    return _EPOCH + timedelta(microseconds=nanos // 1000)


def span_item(
    span: Span, resource: Mapping[str, Any], service_name: str | None
) -> dict[str, Any] | None:
    """The flat attribute dict for one span, or None when it carries no usage.

    Raises OtlpError when the span's timestamps cannot be represented."""
    attrs = _attributes(span.attributes)
    if not any(k in attrs for k in _USAGE_KEYS):
        return None
    trace_id = span.trace_id.hex()
    span_id = span.span_id.hex()
    for key in _USER_KEYS:
        if key in resource and not any(k in attrs for k in _USER_KEYS):
            attrs[key] = resource[key]
    item: dict[str, Any] = dict(attrs)
    if "gen_ai.response.id" not in attrs:
        item["request_id"] = f"{trace_id}-{span_id}"
    if trace_id:
        item["trace_id"] = trace_id  # after gen_ai.conversation.id: the trace id wins
    if span.parent_span_id:
        item["parent_id"] = span.parent_span_id.hex()
    if "gen_ai.agent.name" not in attrs and service_name:
        item["node"] = service_name
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    try:
        if start:
            item["started_at"] = _time(start)
        if end:
            item["completed_at"] = _time(end)
    except OverflowError:
        raise OtlpError("span start or end time is out of range") from None
    if start and end and end >= start:
        item["duration_ms"] = (end - start) / 1e6
    if span.status.code == Status.STATUS_CODE_ERROR:
        item["status"] = "error"
        if not attrs.get("error.type"):
            item["error_type"] = "error"
    return item


def usage_items(request: ExportTraceServiceRequest) -> tuple[list[Any], dict[int, str]]:
    """Items for `Ingestor.ingest` (spans without usage left out) and per-index errors."""
    items: list[Any] = []
    errors: dict[int, str] = {}
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes, _PASSED | {"service.name"})
        service = resource.get("service.name")
        service_name = service if isinstance(service, str) else None
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    item = span_item(span, resource, service_name)
                except OtlpError as exc:
                    errors[len(items)] = str(exc)
                    items.append(None)
                    continue
                if item is not None:
                    items.append(item)
    return items, errors


# -- decoding ---------------------------------------------------------------------------------

_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_to_base64(obj: dict[str, Any]) -> None:
    """OTLP JSON carries ids as hex; protobuf's JSON mapping wants base64 for bytes fields."""
    for key in _ID_FIELDS:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise OtlpError(f"{key} is not hex: {value[:64]!r}") from None
            obj[key] = base64.b64encode(raw).decode("ascii")


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OtlpError("body must be a JSON object (ExportTraceServiceRequest)")
    for rs in _dicts(doc.get("resourceSpans", doc.get("resource_spans"))):
        for ss in _dicts(rs.get("scopeSpans", rs.get("scope_spans"))):
            for span in _dicts(ss.get("spans")):
                _hex_to_base64(span)
                for link in _dicts(span.get("links")):
                    _hex_to_base64(link)
    message = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise OtlpError(f"body is not an OTLP JSON ExportTraceServiceRequest: {exc}") from None
    return message


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    try:
        message.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise OtlpError(f"body is not a protobuf ExportTraceServiceRequest: {exc}") from None
    return message


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# -- encoding ---------------------------------------------------------------------------------


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


def rpc_status(code: int, message: str) -> bytes:
    """A protobuf `google.rpc.Status` (code = 1, message = 2) without its generated module."""
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _encode(message: ExportTraceServiceResponse, media: str) -> bytes:
    if media == JSON:
        return orjson.dumps(json_format.MessageToDict(message))
    data: bytes = message.SerializeToString()
    return data


class OtlpHandler(IngestEndpoint):
    """POST /v1/traces."""

    def _error(
        self,
        request: web.Request,
        media: str,
        status: int,
        reason: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        if status != 503:
            self._m.rejected.labels(reason).inc()  # backpressure is counted by the ingestor
        self._log_once_a_minute(reason, "otlp: %d (%s) for %s from %s: %s", status, reason,
                                request.path, request.remote, message[:200])  # fmt: skip
        code = _RPC_CODE.get(status, 3)
        if media == PROTOBUF:
            body, ctype = rpc_status(code, message), PROTOBUF
        else:
            body, ctype = orjson.dumps({"code": code, "message": message}), JSON
        return web.Response(status=status, body=body, content_type=ctype, headers=headers)

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
            message = parse_json(body) if media == JSON else parse_protobuf(body)
            items, pre_errors = usage_items(message)
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
        response = ExportTraceServiceResponse()
        if items:
            try:
                result = await self._ingestor.ingest(items, pre_errors)
            except Backpressure as exc:
                return self._error(
                    request,
                    media,
                    503,
                    "backpressure",
                    "write-ahead log is full or closing; retry later",
                    {"Retry-After": str(exc.retry_after)},
                )
            if result.errors:
                first = result.errors[0]
                self._log_once_a_minute(
                    "invalid",
                    "otlp: rejected %d invalid usage span(s) from %s; first: %s",
                    len(result.errors),
                    request.remote,
                    str(first["error"])[:300],
                )
                response.partial_success.rejected_spans = len(result.errors)
                response.partial_success.error_message = (
                    f"{len(result.errors)} usage span(s) rejected; first: {first['error']}"
                )[:1000]
        return web.Response(status=200, body=_encode(response, media), content_type=media)

    def routes(self) -> list[Route]:
        return [Route("POST", "/v1/traces", self.traces, "ingest")]
