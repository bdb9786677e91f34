"""Reports the database refuses for their data, found by bisection and set aside on disk.

A batch refused for its *data* (store.errors: SQLSTATE 22/23 or RowRefused; say a hostile cost
that overflows a rollup's NUMERIC(20,10)) would fail on every retry and jam everything behind
it until the WAL fills. `isolate` bisects it down to the reports the database refuses,
commits the rest, and appends the refused ones with the error to
`<data_dir>/quarantine/refused-<first seq>-<last seq>.ndjson`, fsynced before the caller drops
the WAL segments. Any other error propagates: the whole group stays in the WAL and is retried
(what was already committed is de-duplicated then).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from exporter.store.errors import ErrorKind, classify, describe_error

__all__ = ["Isolated", "Quarantine"]

log = logging.getLogger(__name__)

Refusal = tuple[dict[str, object], str]
WritePayloads = Callable[[Sequence[bytes]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Isolated:
    """What `isolate` did: `inserted` reports were new, `refused` went to `path`."""

    inserted: int
    refused: int
    path: Path | None


class Quarantine:
    """The quarantine directory and the bisection that fills it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def isolate(
        self, write: WritePayloads, payloads: Sequence[bytes], first: BaseException, name: str
    ) -> Isolated:
        """Store what the database accepts of `payloads` (WAL record payloads) through
        `write` (returns reports inserted); quarantine the rest under `name`."""
        log.warning("flush: batch refused for its data (%s); isolating the reports it refuses",
                    describe_error(first))  # fmt: skip
        refused: list[Refusal] = []

        async def store(part: Sequence[bytes], whole_records: bool) -> int:
            """Bisect: halves that the database accepts are committed as they are."""
            try:
                return await write(part)
            except Exception as exc:
                if classify(exc) is not ErrorKind.REFUSED:
                    raise
                if len(part) > 1:
                    mid = len(part) // 2
                    return await store(part[:mid], whole_records) + await store(
                        part[mid:], whole_records
                    )
                try:
                    reports = orjson.loads(part[0])
                except orjson.JSONDecodeError:
                    reports = None
                if not isinstance(reports, list):
                    refused.append(({"raw": part[0].decode(errors="replace")}, describe_error(exc)))
                    return 0
                if whole_records and len(reports) > 1:  # one record: now its reports
                    return await store([orjson.dumps([r]) for r in reports], False)
                refused.extend(
                    (r if isinstance(r, dict) else {"raw": r}, describe_error(exc)) for r in reports
                )
                return 0

        inserted = await store(payloads, True)
        if not refused:
            return Isolated(inserted, 0, None)
        path = await asyncio.to_thread(self.save, name, refused)
        log.error(
            "flush: the database refused %d report(s); they are kept in %s (not counted in the "
            "rollups), first error: %s",
            len(refused),
            path,
            refused[0][1],
        )
        return Isolated(inserted, len(refused), path)

    def save(self, name: str, refused: Sequence[Refusal]) -> Path:
        """Append the refused reports (and why) to an NDJSON file, durably."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"refused-{name}.ndjson"
        new = not path.exists()
        with path.open("ab") as f:
            for report, error in refused:
                f.write(orjson.dumps({"error": error, "report": report}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if new:  # the file's directory entry must survive a power loss too
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return path
