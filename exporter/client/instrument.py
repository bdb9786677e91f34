"""Meter an `openai` or `anthropic` client in place, streaming included, without touching calls.

    usage = UsageClient(url, token)
    client = instrument(openai.AsyncOpenAI(), usage, user="alice")

Patches `create` on the client's chat.completions, completions, responses, embeddings and
messages resources (whichever exist), on that client instance only. A call reports its tokens
when it returns; a stream reports when it ends, is closed, or fails (time to first token
included), and OpenAI chat streams are asked for their usage chunk
(`stream_options.include_usage`) unless the caller said otherwise. A call that raises is
reported as an error with the exception's class as `error_type`, then re-raised.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

from exporter.client.client import UsageClient
from exporter.client.context import trace_fields
from exporter.client.extract import StreamUsage, usage_from_response
from exporter.client.sync import SyncUsageClient

__all__ = ["instrument"]

T = TypeVar("T")

_TARGETS = (
    (("chat", "completions"), "chat"),
    (("completions",), "completion"),
    (("responses",), "responses"),
    (("embeddings",), "embedding"),
    (("messages",), "chat"),
)
_MARK = "__llm_usage_wrapped__"


class _Call:
    """One metered call: what to report, and reporting it exactly once."""

    __slots__ = ("done", "fields", "stream", "t0", "ttft_ms", "usage")

    def __init__(self, usage: UsageClient | SyncUsageClient, fields: dict[str, Any]) -> None:
        self.usage = usage
        self.fields = fields
        self.t0 = time.perf_counter()
        self.stream = StreamUsage()
        self.ttft_ms: float | None = None
        self.done = False

    def chunk(self, event: Any) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.t0) * 1000
        self.stream.observe(event)

    def finish(
        self,
        found: dict[str, Any] | None = None,
        error: BaseException | None = None,
        cancelled: bool = False,
    ) -> None:
        if self.done:
            return
        self.done = True
        fields = dict(self.fields)
        fields.update(found if found is not None else self.stream.fields)
        fields["duration_ms"] = round((time.perf_counter() - self.t0) * 1000, 3)
        if self.ttft_ms is not None:
            fields["ttft_ms"] = round(self.ttft_ms, 3)
            fields["stream"] = True
        if error is not None:
            fields["status"] = "error"
            fields["error_type"] = type(error).__name__
        elif cancelled:
            fields["status"] = "cancelled"
        self.usage.submit(self.usage.build(**fields))


class _SyncStream:
    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner = inner
        self._it = iter(inner)
        self._call = call

    def __iter__(self) -> _SyncStream:
        return self

    def __next__(self) -> Any:
        try:
            event = next(self._it)
        except StopIteration:
            self._call.finish()
            raise
        except Exception as exc:
            self._call.finish(error=exc)
            raise
        self._call.chunk(event)
        return event

    def close(self) -> None:
        self._call.finish(cancelled=True)  # no-op when the stream already ended
        close = getattr(self._inner, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __del__(self) -> None:
        if not self._call.done:
            self._call.finish(cancelled=True)


class _AsyncStream:
    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner = inner
        self._it = inner.__aiter__()
        self._call = call

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> Any:
        try:
            event = await self._it.__anext__()
        except StopAsyncIteration:
            self._call.finish()
            raise
        except Exception as exc:
            self._call.finish(error=exc)
            raise
        self._call.chunk(event)
        return event

    async def close(self) -> None:
        self._call.finish(cancelled=True)  # no-op when the stream already ended
        close = getattr(self._inner, "close", None)
        if callable(close):
            result = close()
            if inspect.isawaitable(result):
                await result

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __del__(self) -> None:
        if not self._call.done:
            self._call.finish(cancelled=True)


def _prepare(
    usage: UsageClient | SyncUsageClient,
    provider: str,
    operation: str,
    defaults: dict[str, Any],
    kwargs: dict[str, Any],
) -> _Call:
    fields: dict[str, Any] = {"provider": provider, "operation": operation, **defaults}
    if isinstance(kwargs.get("model"), str):
        fields["model"] = kwargs["model"]
    fields.setdefault("model", "unknown")
    for key, value in trace_fields().items():
        fields.setdefault(key, value)
    if kwargs.get("stream") and provider == "openai" and operation in ("chat", "completion"):
        kwargs.setdefault("stream_options", {"include_usage": True})
    return _Call(usage, fields)


def _is_result(value: Any) -> bool:
    return hasattr(value, "model_dump") or isinstance(value, dict)


def _wrap(
    method: Callable[..., Any],
    usage: UsageClient | SyncUsageClient,
    provider: str,
    operation: str,
    defaults: dict[str, Any],
) -> Callable[..., Any]:
    """One wrapper for sync and async SDKs: the async SDKs' `create` is not always a coroutine
    function (decorators), so the result decides."""

    def settle(call: _Call, result: Any) -> Any:
        if not _is_result(result):
            if hasattr(result, "__aiter__"):
                return _AsyncStream(result, call)
            if hasattr(result, "__next__"):
                return _SyncStream(result, call)
        call.finish(usage_from_response(result))
        return result

    async def finish_async(call: _Call, pending: Any) -> Any:
        try:
            result = await pending
        except BaseException as exc:
            call.finish(error=exc) if isinstance(exc, Exception) else call.finish(cancelled=True)
            raise
        return settle(call, result)

    @functools.wraps(method)
    def metered(*args: Any, **kwargs: Any) -> Any:
        call = _prepare(usage, provider, operation, defaults, kwargs)
        try:
            result = method(*args, **kwargs)
        except Exception as exc:
            call.finish(error=exc)
            raise
        if inspect.isawaitable(result):
            return finish_async(call, result)
        return settle(call, result)

    setattr(metered, _MARK, True)
    return metered


def instrument(llm_client: T, usage: UsageClient | SyncUsageClient, **defaults: Any) -> T:
    """Meter `llm_client` (openai.OpenAI/AsyncOpenAI, anthropic.Anthropic/AsyncAnthropic) in
    place and return it. `defaults` (user, team, tags…) go on every report. Idempotent."""
    provider = "anthropic" if type(llm_client).__module__.startswith("anthropic") else "openai"
    for path, operation in _TARGETS:
        resource: Any = llm_client
        try:
            for name in path:
                resource = getattr(resource, name)
            method = resource.create
        except AttributeError:
            continue
        if getattr(method, _MARK, False):
            continue
        resource.create = _wrap(method, usage, provider, operation, dict(defaults))
    return llm_client
