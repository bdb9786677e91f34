"""`<data_dir>/budgets.json`: what a restart with the database down needs to read spend as
before — each budget's last stored spend (with the window it covers) and the spend of segments
already dropped from the WAL that no landed query has seen yet. WAL segments themselves are read
back from the WAL. Replaced atomically (temp file + rename) after every refresh and every drop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from exporter.budgets.ledger import Ledger
from exporter.budgets.model import Budget

__all__ = ["load", "save"]

VERSION = 1


def _identity(b: Budget) -> str:
    """What the stored numbers depend on; a changed match or window invalidates them."""
    s = b.spec
    return "|".join(str(x) for x in (*b.fixed, s.per, s.window, s.timezone))


def save(path: Path, budgets: Sequence[Budget], ledger: Ledger) -> None:
    specs: dict[str, Any] = {}
    for b in budgets:
        if b.covered is None:
            continue
        specs[b.name] = {
            "identity": _identity(b),
            "covered": [b.covered[0].isoformat(), b.covered[1].isoformat()],
            "stored": {k: str(v) for k, v in b.stored.items()},
            "head": {k: str(v) for k, v in b.head.items()},
            "refreshed_at": b.refreshed_at.isoformat() if b.refreshed_at else None,
        }
    unseen: list[list[str]] = []
    for seg in ledger.dropped():  # those still in the WAL are read back from there
        assert seg.dropped is not None
        for (i, value), by_key in seg.entries.items():
            b = budgets[i]
            if b.epoch > seg.dropped and b.covered is not None:
                keys = {k: v for k, v in by_key.items() if not b.covered[0] <= k < b.covered[1]}
            else:
                keys = by_key
            unseen.extend([b.name, value, k.isoformat(), str(v)] for k, v in keys.items())
    data = orjson.dumps({"version": VERSION, "budgets": specs, "dropped": unseen})
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)  # no fsync: this runs on the loop; a torn file is ignored at load
    os.replace(tmp, path)


def load(path: Path, by_name: Mapping[str, Budget], ledger: Ledger) -> int:
    """Restore into the budgets (epoch 0) and one ledger segment that every later landed
    query has seen (dropped at epoch 0); returns how many budgets were restored."""
    if not path.exists():
        return 0
    data = orjson.loads(path.read_bytes())
    if data.get("version") != VERSION:
        return 0
    restored = 0
    for name, s in data["budgets"].items():
        b = by_name.get(name)
        if b is None or s["identity"] != _identity(b):
            continue
        start, end = s["covered"]
        b.covered = (datetime.fromisoformat(start), datetime.fromisoformat(end))
        b.stored = {k: Decimal(v) for k, v in s["stored"].items()}
        b.head = {k: Decimal(v) for k, v in s["head"].items()}
        b.refreshed_at = datetime.fromisoformat(s["refreshed_at"]) if s["refreshed_at"] else None
        b.refreshed_json = s["refreshed_at"]
        b.epoch = 0
        restored += 1
    seg = ledger.segment(-1)  # below every WAL sequence number
    for name, value, at, amount in data["dropped"]:
        b = by_name.get(name)
        if b is not None:
            ledger.add(seg, (b.index, value), datetime.fromisoformat(at), Decimal(amount))
    ledger.mark_dropped(-1, 0)  # seen by every query that lands from now on
    return restored
