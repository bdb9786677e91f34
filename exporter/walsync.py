"""The WAL's own file thread: one long-lived thread for its blocking calls (write + fdatasync,
segment create/close), instead of a `run_in_executor` hop per group commit.

Under `wrk -c32` single reports, py-spy --gil on the server put `ThreadPoolExecutor.submit` at
~10 % of the event loop's GIL-held samples, for one call per ~15 requests: not the executor's
bookkeeping but the wake-up (the woken worker preempted the loop thread, which still held the
GIL the worker then waited for). Here a call is a `deque.append` + `Condition.notify` and one
`call_soon_threadsafe` back, and the thread runs as SCHED_BATCH (`sched.no_wakeup_preemption`), so
waking it no longer descheduled the loop (`notify` 2 % of those samples).

Calls run one at a time, in submission order (the WAL's writer awaits each one); a call whose
awaiting coroutine was cancelled still runs to the end, as with an executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from exporter.sched import no_wakeup_preemption

__all__ = ["FileThread"]

_T = TypeVar("_T")
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class FileThread:
    """A daemon thread started on first use and stopped by `stop()` (after its queue)."""

    def __init__(self, name: str = "wal-io") -> None:
        self._name = name
        self._cv = threading.Condition(threading.Lock())
        self._jobs: deque[_Job | None] = deque()
        self._thread: threading.Thread | None = None
        #: calls handed to the thread so far (the per-request work guard test reads it)
        self.calls = 0

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._jobs.append((loop, fut, fn, args))
            self.calls += 1
            self._cv.notify()
        return await fut

    def stop(self) -> None:
        """Let the thread finish what is queued, then end (it is not joined: a hung disk
        must not hang shutdown; the thread is a daemon)."""
        with self._cv:
            if self._thread is None:
                return
            self._jobs.append(None)
            self._cv.notify()
            self._thread = None

    def _main(self) -> None:
        no_wakeup_preemption()
        jobs, cv = self._jobs, self._cv
        while True:
            with cv:
                while not jobs:
                    cv.wait()
                job = jobs.popleft()
            if job is None:
                return
            loop, fut, fn, args = job
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # handed to the awaiting coroutine
                result, exc = None, e
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, fut, result, exc)
            del job, fut, result, exc
