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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

__all__ = ["EntryKey", "Ledger", "Segment"]

_ZERO = Decimal("0E-10")  # the store's cost quantum, so sums print with ten decimals

#: (spec index, template value or '') → ledger key (window start, or hour for rolling)
EntryKey = tuple[int, str]


class _Landed(Protocol):
    """What `collect_seen` reads of a budget: its window and its last landed query."""

    start: datetime
    epoch: int
    covered: tuple[datetime, datetime] | None


@dataclass(slots=True)
class Segment:
    seq: int
    entries: dict[EntryKey, dict[datetime, Decimal]] = field(default_factory=dict)
    #: epoch of the last spend query started before the segment was dropped; None = in WAL
    dropped: int | None = None


def _add(into: dict[EntryKey, dict[datetime, Decimal]], key: EntryKey, at: datetime,
         amount: Decimal) -> None:  # fmt: skip
    by_key = into.get(key)
    if by_key is None:
        into[key] = {at: amount}
    else:
        by_key[at] = by_key.get(at, Decimal(0)) + amount


class Ledger:
    """Segments by WAL sequence number. Spend of segments still in the WAL is also summed
    across segments (`_live`), so a read costs one lookup however long the WAL backlog is
    (a database outage), plus the few dropped segments waiting for a refresh."""

    def __init__(self) -> None:
        self._segments: dict[int, Segment] = {}
        self._live: dict[EntryKey, dict[datetime, Decimal]] = {}
        self._dropped: dict[int, Segment] = {}

    def segment(self, seq: int) -> Segment:
        seg = self._segments.get(seq)
        if seg is None:
            seg = self._segments[seq] = Segment(seq)
        return seg

    def add(self, seg: Segment, key: EntryKey, at: datetime, amount: Decimal) -> None:
        assert seg.dropped is None
        _add(seg.entries, key, at, amount)
        _add(self._live, key, at, amount)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self._segments.values())

    def __len__(self) -> int:
        return len(self._segments)

    def dropped(self) -> list[Segment]:
        return list(self._dropped.values())

    def live_keys(self) -> Iterable[EntryKey]:
        return self._live.keys()

    def mark_dropped(self, seq: int, epoch: int) -> bool:
        seg = self._segments.get(seq)
        if seg is None or seg.dropped is not None:
            return False
        for key, by_key in seg.entries.items():
            live = self._live[key]
            for at, amount in by_key.items():
                left = live[at] - amount
                if left:
                    live[at] = left
                else:
                    del live[at]
            if not live:
                del self._live[key]
        if not seg.entries:  # nothing to keep around
            del self._segments[seq]
        else:
            seg.dropped = epoch
            self._dropped[seq] = seg
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
        total = _ZERO
        live = self._live.get(key)
        if live:
            for at, amount in live.items():
                if start <= at < end:
                    total += amount
        for seg in self._dropped.values():
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
        """Forget dropped segments (every budget's stored spend holds them)."""
        for seq in list(forgettable):
            seg = self._dropped.pop(seq, None)
            if seg is not None:
                del self._segments[seq]

    def collect_seen(self, budgets: Sequence[_Landed]) -> None:
        """Forget the dropped segments every budget's stored spend now holds (`budgets` by
        spec index): seen by its last landed query, or outside its current window."""
        done = []
        for seg in self.dropped():
            assert seg.dropped is not None
            for (i, _value), by_key in seg.entries.items():
                b = budgets[i]
                if b.epoch <= seg.dropped or b.covered is None:
                    if any(k >= b.start for k in by_key):
                        break
                elif any(k >= b.start and not b.covered[0] <= k < b.covered[1] for k in by_key):
                    break
            else:
                done.append(seg.seq)
        self.collect(done)
