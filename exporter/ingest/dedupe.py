"""Recently seen request_ids, so a client retry is not counted twice in the live counters.

The database's unique key is the real dedupe; this only keeps /metrics honest for retries that
land on the same replica within the last `capacity` reports (the ids still in the WAL are put
back at start-up, so a retry after a restart is not counted again either).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["RecentIds"]


class RecentIds:
    """A bounded insertion-ordered set: the oldest id goes first when it is full. `discard`
    removes an id completely, so it can never evict a later re-add of the same id early."""

    __slots__ = ("_capacity", "_seen")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, request_id: str) -> None:
        if self._capacity == 0 or request_id in self._seen:
            return
        self._seen[request_id] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def add_all(self, request_ids: list[str]) -> None:
        """`add` for ids not yet here (a batch's fresh ones), in one loop: the same set, the
        same order, the same evictions as one `add` each."""
        if self._capacity == 0:
            return
        seen = self._seen
        for request_id in request_ids:
            seen[request_id] = None  # an id already here keeps its place, as with `add`
        while len(seen) > self._capacity:
            seen.popitem(last=False)

    def discard(self, request_id: str) -> None:
        """Forget an id whose report was not made durable (so a retry is not a duplicate)."""
        self._seen.pop(request_id, None)
