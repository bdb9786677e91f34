"""SyncUsageClient: the UsageClient for threaded or plain synchronous code.

The sender runs in a daemon thread with its own event loop; `report()` is the same
lock-and-append as the async client (thread-safe), and wakes the sender only when a full
batch is waiting. `close()` (or leaving the `with` block, or interpreter exit) delivers what
is queued within `close_timeout`.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from exporter.client.client import ClientStats, UsageClient

__all__ = ["SyncUsageClient"]


class SyncUsageClient:
    def __init__(
        self, url: str = "http://127.0.0.1:9470", token: str | None = None, **options: Any
    ):
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="usage-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        self._client: UsageClient = self._call(self._make(url, token, options), timeout=30)
        self._closed = False
        atexit.register(self.close)

    async def _make(self, url: str, token: str | None, options: dict[str, Any]) -> UsageClient:
        client = UsageClient(url, token, **options)
        await client.start()
        return client

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    def build(self, model: str | None = None, **fields: Any) -> dict[str, Any]:
        return self._client.build(model, **fields)

    def report(self, model: str | None = None, **fields: Any) -> str:
        """Queue one report; with `overflow="block"` a full queue makes this thread wait."""
        return self.submit(self._client.build(model, **fields))

    def submit(self, report: dict[str, Any]) -> str:
        return self._client.submit(report, wait=True)

    def flush(self, timeout: float | None = None) -> None:
        self._call(self._client.flush(), timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._call(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> SyncUsageClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
