"""Recently seen request_ids, so a client retry is not counted twice in the live counters.

The database's unique key is the real dedupe; this only keeps /metrics honest for retries that
land on the same replica within the last `capacity` reports.
"""

from __future__ import annotations

from collections import deque


class RecentIds:
    __slots__ = ("_capacity", "_order", "_seen")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._seen: set[str] = set()
        self._order: deque[str] = deque()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seen

    def add(self, request_id: str) -> None:
        if self._capacity == 0 or request_id in self._seen:
            return
        self._seen.add(request_id)
        self._order.append(request_id)
        if len(self._order) > self._capacity:
            self._seen.discard(self._order.popleft())

    def discard(self, request_id: str) -> None:
        """Forget an id whose report was not made durable (so a retry is not a duplicate)."""
        self._seen.discard(request_id)  # its deque entry expires harmlessly
