"""Budget spend read back from the WAL's sealed segments at start-up (the unflushed ledger is
rebuilt from them, so a restart with the database down reads spend as before). Budgets may
not import the WAL: its read side is the protocol below."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import orjson

from exporter.budgets.model import cost_decimal

__all__ = ["WalReader", "read_segments"]


class _Record(Protocol):
    @property
    def payload(self) -> bytes: ...


class WalReader(Protocol):
    """The WAL's public read side (`exporter.wal.WriteAheadLog`): budgets may not import it."""

    def sealed_segments(self) -> Sequence[Any]: ...

    def read(self, segment: Any) -> Sequence[_Record]: ...


_Row = tuple[str, str, str, str, datetime, Decimal]


def read_segments(wal: WalReader, segments: Sequence[Any]) -> list[tuple[int, list[_Row]]]:
    out: list[tuple[int, list[_Row]]] = []
    for seg in segments:
        rows: list[_Row] = []
        for record in wal.read(seg):
            for d in orjson.loads(record.payload):
                at = d.get("completed_at")
                if at is None:
                    continue
                rows.append((d.get("user", ""), d.get("team", ""), d.get("api_key_id", ""),
                             d.get("model", ""), _parse_time(at),
                             cost_decimal(d.get("cost_usd"))))  # fmt: skip
        out.append((seg.seq, rows))
    return out


def _parse_time(value: Any) -> datetime:
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(dt, datetime)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt
