"""`<data_dir>/budgets.json`: what a restart with the database down needs to read spend as
before — each budget's last stored spend (with the window it covers) and the spend of segments
already dropped from the WAL that no landed query has seen yet. WAL segments themselves are read
back from the WAL.

The event loop only `capture`s references (the stored maps and dropped segments are never
changed in place, only replaced); `Encoder.encode` turns a capture into JSON on the state
file's thread (`statefile.StateWriter`), reusing each budget's JSON while its stored spend is
the same object (a refresh keeps the old map when the database said the same), so an unchanged
state costs a few lookups and is not rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from exporter.budgets.ledger import Ledger, Segment
from exporter.budgets.model import Budget

__all__ = ["Encoder", "State", "capture", "load"]

VERSION = 2  # 1: refreshed_at inside each budget (still read)

#: per budget: (budget — only its config is read —, covered, epoch, stored, head, refreshed_at)
_Spend = dict[str, Decimal]
_Row = tuple[Budget, tuple[datetime, datetime] | None, int, _Spend, _Spend, str | None]


@dataclass(frozen=True, slots=True)
class State:
    rows: tuple[_Row, ...]
    dropped: tuple[Segment, ...]  # dropped segments never change


def capture(budgets: Sequence[Budget], ledger: Ledger) -> State:
    """What the file will hold, as references: O(budgets) tuple building, no formatting."""
    rows = tuple((b, b.covered, b.epoch, b.stored, b.head, b.refreshed_json) for b in budgets)
    return State(rows, tuple(ledger.dropped()))


def _identity(b: Budget) -> str:
    """What the stored numbers depend on; a changed match or window invalidates them."""
    s = b.spec
    return "|".join(str(x) for x in (*b.fixed, s.per, s.window, s.timezone))


class Encoder:
    """`encode` → (content, whole file): `content` is everything but the refresh times (equal
    content = nothing to write between refreshes that found the same spend). One thread at a
    time (the writer's)."""

    def __init__(self) -> None:
        #: name → (stored, head, covered, its JSON); the maps are kept alive so `is` holds
        self._cache: dict[str, tuple[Any, Any, Any, orjson.Fragment]] = {}

    def _budget(self, b: Budget, covered: tuple[datetime, datetime], stored: dict[str, Decimal],
                head: dict[str, Decimal]) -> orjson.Fragment:  # fmt: skip
        hit = self._cache.get(b.name)
        if hit is not None and hit[0] is stored and hit[1] is head and hit[2] == covered:
            return hit[3]
        frag = orjson.Fragment(orjson.dumps({
            "identity": _identity(b),
            "covered": [covered[0].isoformat(), covered[1].isoformat()],
            "stored": {k: str(v) for k, v in stored.items()},
            "head": {k: str(v) for k, v in head.items()},
        }))  # fmt: skip
        self._cache[b.name] = (stored, head, covered, frag)
        return frag

    def encode(self, state: State) -> tuple[bytes, bytes]:
        specs: dict[str, orjson.Fragment] = {}
        refreshed: dict[str, str | None] = {}
        for b, covered, _epoch, stored, head, refreshed_at in state.rows:
            if covered is not None:
                specs[b.name] = self._budget(b, covered, stored, head)
                refreshed[b.name] = refreshed_at
        unseen: list[list[str]] = []
        for seg in state.dropped:  # those still in the WAL are read back from there
            assert seg.dropped is not None
            for (i, value), by_key in seg.entries.items():
                b, covered, epoch = state.rows[i][:3]
                if epoch > seg.dropped and covered is not None:
                    keys = {k: v for k, v in by_key.items() if not covered[0] <= k < covered[1]}
                else:
                    keys = by_key
                unseen.extend([b.name, value, k.isoformat(), str(v)] for k, v in keys.items())
        #: WAL segments whose spend `dropped` holds: a restart skips them if the WAL still has
        #: them (killed after this write, before their unlink) instead of counting them twice
        segments = sorted(seg.seq for seg in state.dropped if seg.seq >= 0)
        content = orjson.dumps({"budgets": specs, "dropped": unseen, "segments": segments})
        whole = orjson.dumps({"version": VERSION, "budgets": specs, "dropped": unseen,
                              "segments": segments, "refreshed_at": refreshed})  # fmt: skip
        return content, whole


def write(path: Path, data: bytes) -> None:
    """Replace the file atomically (temp file + rename; no fsync: a torn file is ignored at
    load, and the WAL and the database hold the truth)."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    tmp.replace(path)


def load(path: Path, by_name: Mapping[str, Budget], ledger: Ledger) -> tuple[int, set[int]]:
    """Restore into the budgets (epoch 0) and one ledger segment that every later landed
    query has seen (dropped at epoch 0); returns how many budgets were restored and the WAL
    segments whose spend that holds."""
    if not path.exists():
        return 0, set()
    data = orjson.loads(path.read_bytes())
    if data.get("version") not in (1, VERSION):
        return 0, set()
    refreshed = data.get("refreshed_at", {})
    restored = 0
    for name, s in data["budgets"].items():
        b = by_name.get(name)
        if b is None or s["identity"] != _identity(b):
            continue
        start, end = s["covered"]
        at = s["refreshed_at"] if data["version"] == 1 else refreshed.get(name)
        b.covered = (datetime.fromisoformat(start), datetime.fromisoformat(end))
        b.stored = {k: Decimal(v) for k, v in s["stored"].items()}
        b.head = {k: Decimal(v) for k, v in s["head"].items()}
        b.refreshed_at = datetime.fromisoformat(at) if at else None
        b.refreshed_json = at
        b.epoch = 0
        restored += 1
    seg = ledger.segment(-1)  # below every WAL sequence number
    for name, value, at, amount in data["dropped"]:
        b = by_name.get(name)
        if b is not None:
            ledger.add(seg, (b.index, value), datetime.fromisoformat(at), Decimal(amount))
    ledger.mark_dropped(-1, 0)  # seen by every query that lands from now on
    return restored, {int(seq) for seq in data.get("segments", ())}
