"""The bounded in-memory queue between the caller and the sender: cheap to put into, thread-safe.

Putting a report is a lock, a deque append and a length check (about a microsecond), so the
caller's path never waits on the network. When the queue is full the policy decides:
`drop_oldest` (the default: the newest usage is the most useful) counts and drops, `block`
makes a synchronous caller wait for room (async callers use `UsageClient.areport`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["Overflow", "ReportQueue"]

Overflow = Literal["drop_oldest", "block"]


class ReportQueue:
    __slots__ = ("_cond", "_items", "_max", "_on_ready", "batch_size", "dropped", "overflow")

    def __init__(self, max_items: int, batch_size: int, overflow: Overflow) -> None:
        if max_items < batch_size or batch_size < 1:
            raise ValueError("need 1 <= batch_size <= max_queue")
        self._items: deque[dict[str, Any]] = deque()
        self._max = max_items
        self._cond = threading.Condition(threading.Lock())
        self.batch_size = batch_size
        self.overflow: Overflow = overflow
        self.dropped = 0
        #: called (from the putting thread) when a full batch is waiting; wakes the sender
        self._on_ready: Callable[[], None] | None = None

    def set_waker(self, on_ready: Callable[[], None] | None) -> None:
        self._on_ready = on_ready

    def __len__(self) -> int:
        return len(self._items)

    def has_room(self) -> bool:
        return len(self._items) < self._max

    def put(self, report: dict[str, Any], *, wait: bool = False) -> bool:
        """Queue one report; False when it pushed the oldest one out (counted in `dropped`)."""
        kept = True
        with self._cond:
            if len(self._items) >= self._max:
                if wait and self.overflow == "block":
                    while len(self._items) >= self._max:
                        self._cond.wait()
                else:
                    self._items.popleft()
                    self.dropped += 1
                    kept = False
            self._items.append(report)
            ready = len(self._items) == self.batch_size
        if ready and self._on_ready is not None:
            self._on_ready()
        return kept

    def put_front(self, reports: list[dict[str, Any]]) -> None:
        """Give back a batch the sender could not deliver, ahead of newer reports (never drops:
        the room was theirs a moment ago)."""
        with self._cond:
            self._items.extendleft(reversed(reports))

    def take(self, n: int) -> list[dict[str, Any]]:
        with self._cond:
            count = min(n, len(self._items))
            batch = [self._items.popleft() for _ in range(count)]
            if count:
                self._cond.notify_all()
        return batch

    def take_all(self) -> list[dict[str, Any]]:
        return self.take(len(self._items))
