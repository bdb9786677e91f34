"""Request body → list of items: one JSON object, a JSON array, or NDJSON; gzip optional."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


class BodyError(ValueError):
    """The body as a whole is unusable (HTTP 400, 413 or 415)."""

    def __init__(self, status: int, reason: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        #: the connection is unusable (the body was not fully read): tell the client
        self.close = close


class ClientGone(BodyError):
    """The client hung up (or was cut off by the body timeout) before its body arrived:
    counted, never logged as an error; the answer goes nowhere."""

    def __init__(self) -> None:
        super().__init__(400, "client_disconnect", "client disconnected before the body was read",
                         close=True)  # fmt: skip


@dataclass
class ParsedBody:
    items: list[Any]
    #: index → why an NDJSON line could not be parsed; the other lines still count
    line_errors: dict[int, str] = field(default_factory=dict)


#: curl -d sends form-urlencoded by default; people mean JSON.
_JSON_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")
_NDJSON_TYPES = (
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
)


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Inflate gzip/deflate without ever holding more than `limit` bytes (zip bombs)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        if data[:2] != b"\x1f\x8b":
            return data
        encoding = "gzip"  # clients that forget the header
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise BodyError(415, "unsupported_media_type", f"unsupported Content-Encoding {encoding!r}")
    # The app turns aiohttp's own decompression off, so every encoding (and every error)
    # goes through this bounded path. HTTP "deflate" is zlib-wrapped; some clients send raw.
    if encoding == "deflate":
        wbits = zlib.MAX_WBITS if _is_zlib(data) else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise BodyError(400, "bad_body", f"body is not valid {encoding}: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyError(413, "too_large", f"decompressed body exceeds {limit} bytes")
    if not inflater.eof:
        raise BodyError(400, "bad_body", f"{encoding} body is truncated")
    return out


def _is_zlib(data: bytes) -> bool:
    """RFC 1950 header: method 8 and a header checksum (JSON text never starts like that)."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _json_error(exc: orjson.JSONDecodeError) -> str:
    return f"body is not valid JSON: {exc}"


def json_text(data: bytes, content_type: str) -> bytes | None:
    """The stripped body when it is sent as one JSON document (not NDJSON) and is not empty:
    what the canonical fast path may try (exporter.ingest.canonical); else None."""
    if content_type.split(";", 1)[0].strip().lower() not in _JSON_TYPES:
        return None
    return data.strip() or None


def parse_items(data: bytes, content_type: str, max_items: int) -> ParsedBody:
    content_type = content_type.split(";", 1)[0].strip().lower()
    if content_type not in _JSON_TYPES and content_type not in _NDJSON_TYPES:
        raise BodyError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type!r} is not JSON; use application/json "
            "or application/x-ndjson",
        )
    stripped = data.strip()
    if not stripped:
        raise BodyError(400, "bad_body", "body is empty")
    if content_type in _NDJSON_TYPES:
        return _parse_ndjson(stripped, max_items)
    try:
        doc = orjson.loads(stripped)
    except orjson.JSONDecodeError as exc:
        if stripped[:1] == b"{" and b"\n" in stripped:
            return _parse_ndjson(stripped, max_items)  # NDJSON sent as application/json
        raise BodyError(400, "bad_body", _json_error(exc)) from None
    if isinstance(doc, list):
        if len(doc) > max_items:
            raise BodyError(
                413, "batch_too_large", f"batch of {len(doc)} items exceeds {max_items}"
            )
        if not doc:
            raise BodyError(400, "bad_body", "empty batch")
        return ParsedBody(doc)
    if isinstance(doc, dict):
        return ParsedBody([doc])
    raise BodyError(400, "bad_body", "body must be a JSON object, an array of objects, or NDJSON")


def _parse_ndjson(data: bytes, max_items: int) -> ParsedBody:
    lines = [line for line in data.split(b"\n") if line.strip()]
    if len(lines) > max_items:
        raise BodyError(413, "batch_too_large", f"batch of {len(lines)} lines exceeds {max_items}")
    parsed = ParsedBody([])
    for i, line in enumerate(lines):
        try:
            parsed.items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            parsed.items.append(None)
            parsed.line_errors[i] = f"line {i + 1} is not valid JSON: {exc}"
    return parsed


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, inflated by our bounded decompressor (aiohttp's is turned off)."""
    encoding = request.headers.get("Content-Encoding", "")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, "too_large", f"body exceeds {limit} bytes") from None
    except web.RequestPayloadError:  # a client that breaks chunked framing
        if request.transport is None or request.transport.is_closing():
            raise ClientGone from None
        raise BodyError(400, "bad_body", "body could not be read", close=True) from None
    except ConnectionError:  # hung up mid-body, or cut off by the server's body timeout
        raise ClientGone from None
    return decompress(raw, encoding, limit)
