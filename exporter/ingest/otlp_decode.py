"""OTLP/HTTP trace bodies (protobuf or JSON) → plain span views, nothing else.

JSON is walked from orjson's dicts directly: protobuf's pure-Python `json_format.ParseDict`
took 1.6 s of event loop for 10k spans (bench/otlp_json.py measures both). Only attributes
that can matter for usage are converted (`KEPT_PREFIXES` and the configured user keys).
A malformed span becomes a `SpanView` with `error` set, so it is refused by name in
`partial_success` rather than failing the whole export.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

# protobuf ships no type information (types-protobuf is not a dependency)
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = ["KEPT_PREFIXES", "OtlpError", "ResourceView", "SpanView", "parse_json",
           "parse_protobuf"]  # fmt: skip

KEPT_PREFIXES = ("gen_ai.", "ai.", "llm.", "traceloop.", "error.", "user.", "enduser.",
                 "session.", "langfuse.", "llm_usage.", "service.name")  # fmt: skip
_STATUS_ERROR = 2


class OtlpError(ValueError):
    """The request as a whole (or one span, when raised while reading it) is unusable."""


@dataclass(slots=True)
class SpanView:
    name: str = ""
    trace_id: str = ""  # lower-case hex; "" when absent or all zeros
    span_id: str = ""
    parent_id: str = ""
    start: int = 0  # unix nanoseconds; 0 when absent
    end: int = 0
    is_error: bool = False
    status_message: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why this span could not be read


@dataclass(slots=True)
class ResourceView:
    attrs: dict[str, Any]
    spans: list[SpanView]


def _kept(key: str, extra: frozenset[str]) -> bool:
    return key.startswith(KEPT_PREFIXES) or key in extra


# -- protobuf ---------------------------------------------------------------------------------


def _pb_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "array_value":
        return [_pb_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return None


def _pb_attrs(kvs: Iterable[KeyValue], extra: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        if _kept(kv.key, extra):
            value = _pb_value(kv.value)
            if value is not None:
                out[kv.key] = value
    return out


def _hex_id(raw: bytes) -> str:
    return raw.hex() if raw.strip(b"\x00") else ""


def parse_protobuf(body: bytes, extra: frozenset[str] = frozenset()) -> list[ResourceView]:
    message = ExportTraceServiceRequest()
    try:
        message.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise OtlpError(f"body is not a protobuf ExportTraceServiceRequest: {exc}") from None
    out: list[ResourceView] = []
    for rs in message.resource_spans:
        spans = [
            SpanView(
                name=span.name,
                trace_id=_hex_id(span.trace_id),
                span_id=_hex_id(span.span_id),
                parent_id=_hex_id(span.parent_span_id),
                start=span.start_time_unix_nano,
                end=span.end_time_unix_nano,
                is_error=span.status.code == _STATUS_ERROR,
                status_message=span.status.message,
                attrs=_pb_attrs(span.attributes, extra),
            )
            for ss in rs.scope_spans
            for span in ss.spans
        ]
        out.append(ResourceView(_pb_attrs(rs.resource.attributes, extra), spans))
    return out


# -- JSON -------------------------------------------------------------------------------------


def _get(obj: dict[str, Any], camel: str, snake: str) -> Any:
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        for v in value:
            if isinstance(v, dict):
                yield v


def _json_value(v: Any) -> Any:
    if not isinstance(v, dict):
        return None
    for key, value in v.items():
        if key in ("stringValue", "string_value"):
            return value if isinstance(value, str) else None
        if key in ("intValue", "int_value"):
            if type(value) is int:
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    raise OtlpError(f"intValue is not an integer: {value[:64]!r}") from None
            return None
        if key in ("doubleValue", "double_value"):
            return float(value) if type(value) in (int, float) else None
        if key in ("boolValue", "bool_value"):
            return value if type(value) is bool else None
        if key in ("arrayValue", "array_value") and isinstance(value, dict):
            return [_json_value(x) for x in value.get("values") or []]
        if key in ("kvlistValue", "kvlist_value") and isinstance(value, dict):
            return {
                kv.get("key"): _json_value(kv.get("value")) for kv in _dicts(value.get("values"))
            }
        if key in ("bytesValue", "bytes_value") and isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True).hex()
            except (binascii.Error, ValueError):
                raise OtlpError("bytesValue is not base64") from None
    return None


def _json_attrs(kvs: Any, extra: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in _dicts(kvs):
        key = kv.get("key")
        if isinstance(key, str) and _kept(key, extra):
            value = _json_value(kv.get("value"))
            if value is not None:
                out[key] = value
    return out


def _json_id(value: Any, name: str) -> str:
    """OTLP JSON carries ids as hex (not protobuf JSON's base64)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > 64:
        raise OtlpError(f"{name} is not a hex id")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise OtlpError(f"{name} is not hex: {value[:64]!r}") from None
    return _hex_id(raw)


def _json_nanos(value: Any, name: str) -> int:
    if value is None:
        return 0
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise OtlpError(f"{name} is not a non-negative integer")


def _json_span(span: dict[str, Any], extra: frozenset[str]) -> SpanView:
    name = span.get("name")
    view = SpanView(name=name if isinstance(name, str) else "")
    try:
        view.trace_id = _json_id(_get(span, "traceId", "trace_id"), "traceId")
        view.span_id = _json_id(_get(span, "spanId", "span_id"), "spanId")
        view.parent_id = _json_id(_get(span, "parentSpanId", "parent_span_id"), "parentSpanId")
        view.start = _json_nanos(_get(span, "startTimeUnixNano", "start_time_unix_nano"),
                                 "startTimeUnixNano")  # fmt: skip
        view.end = _json_nanos(_get(span, "endTimeUnixNano", "end_time_unix_nano"),
                               "endTimeUnixNano")  # fmt: skip
        status = span.get("status")
        if isinstance(status, dict):
            code = status.get("code")
            view.is_error = code in (_STATUS_ERROR, "STATUS_CODE_ERROR")
            message = status.get("message")
            view.status_message = message if isinstance(message, str) else ""
        view.attrs = _json_attrs(span.get("attributes"), extra)
    except OtlpError as exc:
        view.error = str(exc)
    return view


def parse_json(body: bytes, extra: frozenset[str] = frozenset()) -> list[ResourceView]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OtlpError("body must be a JSON object (ExportTraceServiceRequest)")
    resource_spans = _get(doc, "resourceSpans", "resource_spans")
    if resource_spans is not None and not isinstance(resource_spans, list):
        raise OtlpError("resourceSpans must be an array")
    out: list[ResourceView] = []
    for rs in _dicts(resource_spans):
        resource = rs.get("resource")
        try:
            attrs = (
                _json_attrs(resource.get("attributes"), extra) if isinstance(resource, dict) else {}
            )
        except OtlpError as exc:
            raise OtlpError(f"resource attributes: {exc}") from None
        spans = [
            _json_span(span, extra)
            for ss in _dicts(_get(rs, "scopeSpans", "scope_spans"))
            for span in _dicts(ss.get("spans"))
        ]
        out.append(ResourceView(attrs, spans))
    return out
