"""Unflushed spend per WAL segment, kept until a refresh that can see it has landed.

A segment's spend is added when its reports are durable, and marked (not removed) when the
flusher drops the segment after its commit: it is marked with the epoch of the last spend query
*started* so far. A query with a higher epoch started after the commit and sees those rows, so a
budget whose stored spend comes from such a query stops counting the segment; one whose stored
spend is older still counts it. Flush commits and spend queries never overlap (the tracker's
`db_lock`), so "started after the drop" means "sees the commit". Nothing is ever missing between
the two, and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

__all__ = ["EntryKey", "Ledger", "Segment"]

#: (spec index, template value or '') → ledger key (window start, or hour for rolling)
EntryKey = tuple[int, str]


@dataclass(slots=True)
class Segment:
    seq: int
    entries: dict[EntryKey, dict[datetime, Decimal]] = field(default_factory=dict)
    #: epoch of the last spend query started before the segment was dropped; None = in WAL
    dropped: int | None = None

    def add(self, key: EntryKey, at: datetime, amount: Decimal) -> None:
        by_key = self.entries.get(key)
        if by_key is None:
            self.entries[key] = {at: amount}
        else:
            by_key[at] = by_key.get(at, Decimal(0)) + amount


class Ledger:
    """Segments by WAL sequence number; a handful at any time (the WAL's sealed backlog)."""

    def __init__(self) -> None:
        self._segments: dict[int, Segment] = {}

    def segment(self, seq: int) -> Segment:
        seg = self._segments.get(seq)
        if seg is None:
            seg = self._segments[seq] = Segment(seq)
        return seg

    def __iter__(self) -> Iterator[Segment]:
        return iter(self._segments.values())

    def __len__(self) -> int:
        return len(self._segments)

    def mark_dropped(self, seq: int, epoch: int) -> bool:
        seg = self._segments.get(seq)
        if seg is None:
            return False
        if not seg.entries:  # nothing to keep around
            del self._segments[seq]
        else:
            seg.dropped = epoch
        return True

    def pending(
        self,
        key: EntryKey,
        start: datetime,
        end: datetime,
        epoch: int,
        covered: tuple[datetime, datetime] | None,
    ) -> Decimal:
        """Unflushed spend of `key` in [start, end) that the stored spend (queried at `epoch`
        over `covered`, None if nothing landed for this window) does not already hold."""
        total = Decimal(0)
        for seg in self._segments.values():
            by_key = seg.entries.get(key)
            if not by_key:
                continue
            seen = seg.dropped is not None and seg.dropped < epoch
            for at, amount in by_key.items():
                if start <= at < end and not (
                    seen and covered is not None and covered[0] <= at < covered[1]
                ):
                    total += amount
        return total

    def collect(self, forgettable: Iterable[int]) -> None:
        for seq in list(forgettable):
            self._segments.pop(seq, None)
