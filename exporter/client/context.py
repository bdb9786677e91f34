"""Where a report belongs in an agent pipeline: trace, parent and node, carried by contextvars.

`with node("retriever"):`, `async with node("retriever"):` or `@node("retriever")` opens a
node of the pipeline graph. Every report made inside it (directly, in nested nodes' parents,
or in `asyncio` tasks created inside it, which copy the context) carries the node's
`trace_id`, its name as `node` and its span id as `parent_id`, so the read API can rebuild the
tree. Node names nest as paths: `node("retriever")` inside `node("planner")` is
`planner/retriever`, so the tree survives even though nodes themselves are not reports.

When an OpenTelemetry span is active and no node is open, its trace and span ids are used,
so reports line up with the application's own traces.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

__all__ = ["Frame", "current_frame", "node", "trace_fields"]

P = ParamSpec("P")
R = TypeVar("R")

#: the server keeps at most this many characters of a node name (usage.MAX_STRING)
MAX_NODE = 256


@dataclass(frozen=True, slots=True)
class Frame:
    """One open node: the ids a report made inside it carries."""

    trace_id: str
    span_id: str
    parent_span_id: str
    node: str


_current: contextvars.ContextVar[Frame | None] = contextvars.ContextVar(
    "llm_usage_frame", default=None
)


def _otel_ids() -> tuple[str, str] | None:
    """The active OpenTelemetry span's (trace id, span id) in W3C hex, if any. An application
    that never imported opentelemetry has no active span: that case costs a dict lookup."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def current_frame() -> Frame | None:
    """The innermost open node in this context, or None."""
    return _current.get()


def trace_fields() -> dict[str, str]:
    """The trace_id / parent_id / node a report made here should carry (empty outside nodes,
    or the OpenTelemetry span's ids when one is active)."""
    frame = _current.get()
    if frame is not None:
        return {"trace_id": frame.trace_id, "parent_id": frame.span_id, "node": frame.node}
    otel = _otel_ids()
    if otel is not None:
        return {"trace_id": otel[0], "parent_id": otel[1]}
    return {}


class node:
    """Open a pipeline node for the duration of a block, an `async with`, or a decorated call.

    A decorated function opens a fresh node per call, so concurrent calls never share one.
    """

    __slots__ = ("_name", "_tokens", "_trace_id")

    def __init__(self, name: str, *, trace_id: str | None = None) -> None:
        if not name or "/" in name:
            raise ValueError("node name must be non-empty and must not contain '/'")
        self._name = name
        self._trace_id = trace_id
        self._tokens: list[contextvars.Token[Frame | None]] = []

    def _open(self) -> Frame:
        parent = _current.get()
        if parent is not None:
            trace_id, parent_span, path = parent.trace_id, parent.span_id, parent.node
            path = f"{path}/{self._name}"
        else:
            otel = _otel_ids()
            trace_id = self._trace_id or (otel[0] if otel else os.urandom(16).hex())
            parent_span = otel[1] if otel and not self._trace_id else ""
            path = self._name
        frame = Frame(trace_id, os.urandom(8).hex(), parent_span, path[:MAX_NODE])
        self._tokens.append(_current.set(frame))
        return frame

    def _close(self) -> None:
        _current.reset(self._tokens.pop())

    def __enter__(self) -> Frame:
        return self._open()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    async def __aenter__(self) -> Frame:
        return self._open()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        name, trace_id = self._name, self._trace_id
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                async with node(name, trace_id=trace_id):
                    return await func(*args, **kwargs)

            return cast(Callable[P, R], run_async)

        @functools.wraps(func)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with node(name, trace_id=trace_id):
                return func(*args, **kwargs)

        return run
