"""The exactly-once batch write: details de-duplicate, rollups add only what was new.

One transaction per batch, on either backend (`write_postgres`, `write_sqlite`):

1. insert the details in request_id order (every replica takes unique-index locks in the same
   order, so they never deadlock) with `ON CONFLICT (request_id) DO NOTHING RETURNING`; a
   duplicate inside the batch loses to its first occurrence, as a later retry would;
2. aggregate only the rows really inserted into hour and day deltas (UTC buckets of
   completed_at);
3. upsert the deltas additively in sorted key order;
4. commit. A crash or failure before the commit leaves nothing behind; a replay after the
   commit inserts no detail, hence adds nothing to the rollups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.money import json_default
from exporter.store.db import backend_name
from exporter.store.dims import dims_keys
from exporter.store.flush_process import FlushProcess
from exporter.store.write_postgres import probe_postgres, write_postgres
from exporter.store.write_sqlite import probe_sqlite, write_sqlite

__all__ = ["StoreWriter", "WriteResult"]


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch did: `inserted` reports were new, the rest were already stored."""

    received: int
    inserted: int
    rollup_rows: int

    @property
    def duplicates(self) -> int:
        return self.received - self.inserted


class StoreWriter:
    """Writes batches of reports exactly once; safe to run in several replicas at once.

    `fault` is a test hook (never set by the service): called with each batch inside the
    write path, it lets a test raise the kind of error a bug in this code would.

    `flush_process` (SQLite only): write in a child process (`store.flush_process`), so the
    flush's CPU does not hold this process's GIL; `close()` stops it. `probe` checks the
    schema here, then sends the child an empty write (starting it if need be).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        promoted_tags: Iterable[str] = (),
        fault: Callable[[Sequence[bytes]], None] | None = None,
        flush_process: bool = False,
    ) -> None:
        self._engine = engine
        #: the rollup key's `dims` holds these tags (exporter.store.dims)
        self.dims_keys = dims_keys(promoted_tags)
        self.backend = backend_name(engine.url)
        self.fault = fault
        self.process: FlushProcess | None = None
        if flush_process and self.backend == "sqlite":
            path = str(Path(make_url(engine.url).database or "").expanduser())
            self.process = FlushProcess(path, self.dims_keys)

    async def write(self, reports: Iterable[Mapping[str, Any]]) -> WriteResult:
        """Store report dicts (UsageReport fields, JSON-ready or Python values) at once."""
        payload = orjson.dumps(list(reports), default=json_default)
        return await self.write_payloads([payload])

    async def write_payloads(self, payloads: Sequence[bytes]) -> WriteResult:
        """Store WAL record payloads (orjson arrays of report dicts) in one transaction."""
        if self.fault is not None:
            self.fault(payloads)
        if self.backend == "postgresql":
            received, inserted, rollups = await write_postgres(
                self._engine, payloads, self.dims_keys
            )
        elif self.process is not None:
            received, inserted, rollups = await self.process.write(payloads)
        else:
            received, inserted, rollups = await write_sqlite(self._engine, payloads, self.dims_keys)
        return WriteResult(received, inserted, rollups)

    async def probe(self) -> None:
        """Raise what a flush would raise now, writing nothing (an idle health check)."""
        if self.fault is not None:
            self.fault([])
        if self.backend == "postgresql":
            await probe_postgres(self._engine, self.dims_keys)
        else:
            await probe_sqlite(self._engine)
            if self.process is not None:  # started at the flusher's first pass, up and able
                await self.process.write([])  # to open the file: an empty write commits nothing

    async def close(self) -> None:
        """Stop the flush process, if any (after the write in progress)."""
        if self.process is not None:
            await self.process.close()
