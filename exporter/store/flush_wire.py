"""What crosses the socket between the serving process and the SQLite flush process.

A request is one message: the WAL record payloads, length-prefixed (`pack_request`; no
pickling, one `join` in the parent). A reply is JSON; a flush error in it is carried intact:

`store.errors.classify` decides quarantine vs retry from an error's class, its SQLite error
name (`sqlite_errorname`), an SQLSTATE, `RowRefused`, or an OSError; pickling a sqlite3 error
loses `sqlite_errorcode`/`sqlite_errorname`, so the error is sent as plain JSON instead (class,
args, those attributes, and the same for what it wraps: `.orig` and `__cause__`) and rebuilt
in the parent as the same class with the same attributes. So a full disk, a locked database, a
refused row and a bug are classified, described and logged exactly as in process.

A class that cannot be rebuilt faithfully (neither sqlite3's, builtins', nor RowRefused) comes
back as `FlushProcessError` (a bug: never quarantined), its text naming the original class.
"""

from __future__ import annotations

import builtins
import contextlib
import sqlite3
import struct
from collections.abc import Sequence
from typing import Any

from exporter.store.errors import RowRefused

__all__ = [
    "FlushProcessDied",
    "FlushProcessError",
    "error_from_json",
    "error_to_json",
    "pack_request",
    "unpack_request",
]

_ATTRS = ("sqlite_errorcode", "sqlite_errorname", "sqlstate")
_MAX_DEPTH = 8
_COUNT = struct.Struct("<Q")


def pack_request(payloads: Sequence[bytes]) -> bytes:
    """One message: the count, each payload's length, then the payloads (no pickling)."""
    lengths = struct.pack(f"<{len(payloads)}Q", *map(len, payloads))
    return b"".join((_COUNT.pack(len(payloads)), lengths, *payloads))


def unpack_request(message: bytes) -> list[bytes]:
    (n,) = _COUNT.unpack_from(message)
    lengths = struct.unpack_from(f"<{n}Q", message, _COUNT.size)
    at = _COUNT.size + 8 * n
    out: list[bytes] = []
    for size in lengths:
        out.append(message[at : at + size])
        at += size
    if at != len(message):
        raise ValueError(f"flush request of {len(message)} bytes, {at} described")
    return out


class FlushProcessError(RuntimeError):
    """An error of the flush process whose class is not rebuilt here (classified a bug)."""


class FlushProcessDied(ConnectionError):
    """The flush process exited mid-write (killed, out of memory): unavailable, retried. Its
    transaction either committed (the replay is de-duplicated) or was rolled back by SQLite."""


def _arg(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def error_to_json(exc: BaseException, depth: int = 0) -> dict[str, Any] | None:
    """The error and what it wraps, as JSON-ready data (no SQL text, no parameters)."""
    if depth > _MAX_DEPTH:
        return None
    cls = type(exc)
    node: dict[str, Any] = {
        "module": cls.__module__,
        "name": cls.__qualname__,
        "args": [_arg(a) for a in exc.args],
        "text": str(exc),
        "attrs": {a: v for a in _ATTRS if isinstance(v := getattr(exc, a, None), str | int)},
    }
    if isinstance(exc, RowRefused):
        node["refused"] = [exc.field, exc.reason]
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException) and orig is not exc:
        node["orig"] = error_to_json(orig, depth + 1)
    if exc.__cause__ is not None and exc.__cause__ is not exc:
        node["cause"] = error_to_json(exc.__cause__, depth + 1)
    return node


def _rebuild(node: dict[str, Any]) -> BaseException:
    module, name, args = node["module"], node["name"], node["args"]
    if "refused" in node:
        field, reason = node["refused"]
        return RowRefused(field, reason)
    holder = {"sqlite3": sqlite3, "builtins": builtins}.get(module)
    cls = getattr(holder, name, None) if holder is not None else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            err: BaseException = cls(*args)
        except Exception:  # a builtin with another signature: keep the text
            err = FlushProcessError(f"{module}.{name}: {node['text']}")
    else:
        err = FlushProcessError(f"{module}.{name}: {node['text']}")
    for attr, value in node["attrs"].items():
        with contextlib.suppress(AttributeError):  # every class rebuilt here takes them
            setattr(err, attr, value)
    return err


def error_from_json(node: dict[str, Any]) -> BaseException:
    """The error `error_to_json` described, with its causes (the innermost rebuilt first)."""
    err = _rebuild(node)
    for key in ("orig", "cause"):
        inner = node.get(key)
        if inner is not None:
            rebuilt = error_from_json(inner)
            if key == "orig":
                err.orig = rebuilt  # type: ignore[attr-defined]
            else:
                err.__cause__ = rebuilt
    return err
