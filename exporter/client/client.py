"""UsageClient: queue usage reports on the caller's path, deliver them in background batches.

`report()` builds one canonical report (request id, event time and the open pipeline node
filled in) and puts it in a bounded in-memory queue: no I/O, no await. A sender task takes
batches (size or time trigger), gzips them and POSTs them to `/v1/usage`, retrying with
jittered exponential backoff on connection errors, timeouts, 429 and 5xx (honouring
`Retry-After`). Every report keeps its `request_id` across retries, so a retry after a lost
answer is counted once by the service. Reports the service refuses for their content (422)
are counted and logged, not retried; a 413 splits the batch.

What can still be lost, and how it is counted: reports pushed out of a full queue
(`stats.dropped`, policy `drop_oldest`), and at `close()` reports the service never took
within `close_timeout` (`stats.undelivered`) — unless `spool_dir` is set, in which case they
stay on disk and the next client started on that directory sends them first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from exporter.client.context import trace_fields
from exporter.client.queue import Overflow, ReportQueue
from exporter.client.spool import Spool
from exporter.client.wire import QuietLog, encode_batch, new_request_id, retry_after

__all__ = ["ClientStats", "UsageClient"]

log = logging.getLogger("exporter.client")

_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: misconfiguration the operator can fix while we keep the reports and retry
_WAIT_STATUSES = frozenset({401, 403, 404})


@dataclass(slots=True)
class ClientStats:
    """What happened to the reports handed to this client (all monotonic counts)."""

    reported: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    dropped: int = 0
    undelivered: int = 0
    retries: int = 0
    batches: int = 0
    respooled: int = 0


class UsageClient:
    """Async client; create and use it inside the event loop that runs the sender."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:9470",
        token: str | None = None,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_queue: int = 100_000,
        overflow: Overflow = "drop_oldest",
        spool_dir: str | Path | None = None,
        timeout: float = 10.0,
        max_backoff: float = 30.0,
        close_timeout: float = 10.0,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._queue = ReportQueue(max_queue, batch_size, overflow)
        self._flush_interval = flush_interval
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._close_timeout = close_timeout
        self._defaults = dict(defaults or {})
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        self.stats = ClientStats()
        self._log = QuietLog(log)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._in_flight = 0
        self._force = False
        self._closing = False
        self._deadline = float("inf")
        self._closed = False

    # --- the caller's path -------------------------------------------------------------

    def build(self, model: str | None = None, **fields: Any) -> dict[str, Any]:
        """One canonical report: defaults, then the fields given, then what is missing
        (request id, completion time, the open node's trace ids)."""
        report = {**self._defaults, **fields} if self._defaults else fields
        if model is not None:
            report["model"] = model
        if "request_id" not in report:
            report["request_id"] = new_request_id()
        if "completed_at" not in report:
            report["completed_at"] = time.time()
        if "trace_id" not in report:
            for key, value in trace_fields().items():
                report.setdefault(key, value)
        return report

    def report(self, model: str | None = None, **fields: Any) -> str:
        """Queue one report (canonical fields, see the README) and return its request_id.
        Never blocks and never raises for the network; a full queue drops its oldest."""
        return self.submit(self.build(model, **fields))

    def submit(self, report: dict[str, Any], *, wait: bool = False) -> str:
        """Queue a report built elsewhere (canonical shape)."""
        if self._closed:
            raise RuntimeError("UsageClient is closed")
        self.stats.reported += 1
        if not self._queue.put(report, wait=wait):
            self.stats.dropped += 1
            self._log(logging.WARNING, "drop", "usage client queue full: dropped oldest report")
        if self._task is None:
            self._start()
        return str(report["request_id"])

    async def areport(self, model: str | None = None, **fields: Any) -> str:
        """Like `report`, but with `overflow="block"` waits (asynchronously) for room."""
        while self._queue.overflow == "block" and not self._queue.has_room():
            self._wake.set()
            await asyncio.sleep(0.01)
        return self.report(model, **fields)

    # --- life cycle ----------------------------------------------------------------------

    def _start(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet (sync code): started by the next report, flush() or start()
        self._queue.set_waker(self._make_waker(self._loop))
        self._task = self._loop.create_task(self._run(), name="usage-client-sender")

    def _make_waker(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Wake the sender from any thread (SyncUsageClient puts from the caller's threads)."""
        owner = threading.get_ident()
        wake = self._wake

        def waker() -> None:
            if threading.get_ident() == owner:
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)

        return waker

    async def start(self) -> None:
        if self._task is None:
            self._start()

    async def flush(self) -> None:
        """Deliver everything queued so far (waits through retries)."""
        await self.start()
        self._force = True
        self._wake.set()
        while len(self._queue) or self._in_flight:
            self._idle.clear()
            self._wake.set()
            await self._idle.wait()
            if self._task is not None and self._task.done():
                break

    async def close(self) -> None:
        """Deliver what is queued within `close_timeout`, then stop. Undelivered reports stay
        in the spool when there is one; otherwise they are counted in `stats.undelivered`."""
        if self._closed:
            return
        await self.start()
        self._closing = True
        self._deadline = time.monotonic() + self._close_timeout
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._closed = True
        left = self._queue.take_all()
        if left and self._spool is not None:
            await asyncio.to_thread(self._spool.write, left)
        elif left:
            self.stats.undelivered += len(left)
        if self.stats.undelivered:
            log.error("usage client closed with %d undelivered reports", self.stats.undelivered)
        if self._spool is not None:
            self._spool.close()

    async def __aenter__(self) -> UsageClient:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the sender -------------------------------------------------------------------

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers) as session:
            if self._spool is not None:
                for path, batch in await asyncio.to_thread(self._spool.pending):
                    self.stats.respooled += len(batch)
                    if not await self._deliver(session, batch):
                        return  # closing with the service unreachable: the file stays
                    self._spool.remove(path)
            await self._loop_batches(session)

    async def _loop_batches(self, session: aiohttp.ClientSession) -> None:
        last_send = time.monotonic()
        while True:
            due = last_send + self._flush_interval
            if len(self._queue) < self._queue.batch_size and not (self._force or self._closing):
                if not len(self._queue):
                    self._idle.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, due - time.monotonic())):
                        await self._wake.wait()
                self._wake.clear()
            if not len(self._queue):
                self._force = False
                self._idle.set()
                if self._closing:
                    return
                last_send = time.monotonic()
                continue
            batch = self._queue.take(self._queue.batch_size)
            self._in_flight = len(batch)
            try:
                path = await asyncio.to_thread(self._spool.write, batch) if self._spool else None
                if await self._deliver(session, batch):
                    if path is not None:
                        Spool.remove(path)
                elif path is None:
                    self._queue.put_front(batch)  # closing: close() counts what is left
                # else: closing ran out of time; the batch stays on disk for the next client
                if self._closing and time.monotonic() >= self._deadline:
                    return
            finally:
                self._in_flight = 0
            last_send = time.monotonic()

    async def _deliver(self, session: aiohttp.ClientSession, batch: list[dict[str, Any]]) -> bool:
        """Send one batch until the service has answered for every report in it. False only
        when closing ran out of time first."""
        body, headers, bad = await asyncio.to_thread(encode_batch, batch)
        if bad:
            self.stats.rejected += bad
            self._log(logging.ERROR, "encode", "usage client: %d reports not JSON; dropped", bad)
        attempt = 0
        while True:
            delay = 0.0
            try:
                async with session.post(f"{self.url}/v1/usage", data=body, headers=headers) as r:
                    status = r.status
                    if status in (200, 202, 422, 400):
                        self._count(batch, status, await r.read())
                        self.stats.batches += 1
                        return True
                    if status == 413 and len(batch) > 1:
                        half = len(batch) // 2
                        return await self._deliver(session, batch[:half]) and await self._deliver(
                            session, batch[half:]
                        )
                    delay = retry_after(r.headers)
                    event = "auth" if status in _WAIT_STATUSES else "http"
                    self._log(
                        logging.ERROR if event == "auth" else logging.WARNING,
                        event,
                        "usage client: %s answered %d; keeping %d reports and retrying",
                        self.url,
                        status,
                        len(batch),
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self._log(
                    logging.WARNING,
                    "connect",
                    "usage client: cannot reach %s (%s); keeping %d reports and retrying",
                    self.url,
                    type(exc).__name__,
                    len(batch),
                )
            attempt += 1
            self.stats.retries += 1
            cap = min(self._max_backoff, 0.1 * 2 ** min(attempt, 20))
            delay = max(delay, random.uniform(cap / 2, cap))
            if self._closing and time.monotonic() + delay > self._deadline:
                return False
            await asyncio.sleep(delay)

    def _count(self, batch: list[dict[str, Any]], status: int, raw: bytes) -> None:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {}
        if status == 400 or not isinstance(answer, dict):
            answer = {"accepted": 0, "duplicates": 0, "rejected": len(batch), "errors": []}
        self.stats.accepted += int(answer.get("accepted", 0))
        self.stats.duplicates += int(answer.get("duplicates", 0))
        rejected = int(answer.get("rejected", 0))
        if rejected:
            self.stats.rejected += rejected
            errors = answer.get("errors") or [{"reason": answer.get("error", "refused")}]
            self._log(
                logging.ERROR,
                "rejected",
                "usage client: service refused %d of %d reports; first: %s",
                rejected,
                len(batch),
                str(errors[0])[:300],
            )
