"""Moves accepted reports from the WAL into the database, exactly once, whatever happens.

Every `flush_interval` (or sooner when `nudge()` sees a large backlog) the flusher seals the
active WAL segment and writes the sealed segments, oldest first, in transactions of about
`flush_max_reports` reports. A segment is dropped only after the transaction holding its
reports has committed; if the process dies in between, the replay is de-duplicated by the
database (details are unique by request_id and rollups only add what was really inserted).

A failing database keeps everything in the WAL: the flusher retries with exponential backoff
(capped at `flush_max_backoff`), counts each failure, logs the outage once and its end once,
and reads segments from disk per attempt, so memory stays flat however long the outage lasts.
Ingest pushes back with 503 when the WAL reaches its size cap. A database that hangs instead
of failing is abandoned after `write_timeout`.

Reports the database refuses for their *data* (SQLSTATE 22/23: say a hostile cost that
overflows a rollup's NUMERIC(20,10)) would otherwise be retried forever and jam everything
behind them: the flusher bisects the batch, commits what is accepted, and appends the refused
reports with the error to `<data_dir>/quarantine/*.ndjson` (fsynced before the WAL segment
goes), logged as an error and counted as a flush failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

from exporter.backoff import backoff_delay
from exporter.config import Settings
from exporter.selfmetrics import SelfMetrics
from exporter.store.errors import ErrorKind, classify, describe_error
from exporter.store.retention import purge_details, retention_cutoff
from exporter.store.writer import StoreWriter
from exporter.wal import Segment, WriteAheadLog

log = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0
RETENTION_MAX_BATCHES = 200  # per run: a huge first purge never starves the flush for long
STOP_TIMEOUT_S = 30.0
#: A flush transaction of flush_max_reports takes seconds; past this the database is hung
#: (not down: that fails fast) and the attempt is abandoned, rolled back and retried.
WRITE_TIMEOUT_S = 120.0


def is_data_error(exc: BaseException) -> bool:
    """True when the database refuses the data itself (store.errors.classify)."""
    return classify(exc) is ErrorKind.REFUSED


def _read_payloads(wal: WriteAheadLog, segments: Sequence[Segment]) -> list[bytes]:
    return [record.payload for seg in segments for record in wal.read(seg)]


class Flusher:
    """The periodic WAL → database flush; one per process, owned by the app's cleanup_ctx.

    Wiring: `run()` as a task after the WAL is open; `nudge()` after each WAL append;
    `await stop()` on shutdown *before* `wal.close()` (stop seals and flushes the WAL).
    """

    def __init__(
        self,
        wal: WriteAheadLog,
        store_writer: StoreWriter,
        self_metrics: SelfMetrics,
        settings: Settings,
        *,
        on_dropped: Callable[[int], None] | None = None,
        retention_interval: float = RETENTION_INTERVAL_S,
        write_timeout: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.wal = wal
        self.writer = store_writer
        self.metrics = self_metrics
        self.interval = settings.flush_interval
        self.max_reports = settings.flush_max_reports
        self.max_backoff = settings.flush_max_backoff
        self.retention_days = settings.retention_days
        self.retention_interval = retention_interval
        self.write_timeout = write_timeout
        self.on_dropped = on_dropped
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._run_task: asyncio.Task[None] | None = None
        self._failures = 0  # consecutive
        self._failing_since: float | None = None
        self._next_retention = time.monotonic()
        self.quarantine_dir = wal.directory.parent / "quarantine"
        self.metrics.wal_max_bytes.set(wal.max_bytes)

    # -- ingest side -------------------------------------------------------------------------
    def nudge(self) -> None:
        """Called on every durable append, so only a comparison: wake the loop early when the
        backlog is large (the gauges are refreshed at each scrape and flush)."""
        if self.wal.pending_reports >= self.max_reports and self._failing_since is None:
            self._wake.set()

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    # -- flushing ----------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        self.metrics.pending.set(self.wal.pending_reports)
        self.metrics.wal_bytes.set(self.wal.total_bytes)

    def _groups(self, segments: Sequence[Segment]) -> list[list[Segment]]:
        """Consecutive segments, ~max_reports per transaction (a big segment goes alone)."""
        groups: list[list[Segment]] = []
        current: list[Segment] = []
        count = 0
        for seg in segments:
            if current and count + seg.reports > self.max_reports:
                groups.append(current)
                current, count = [], 0
            current.append(seg)
            count += seg.reports
        if current:
            groups.append(current)
        return groups

    async def flush_once(self) -> int:
        """Flush what the WAL holds now; returns the reports taken out of the WAL.

        Raises on failure (after counting and logging it); what was not committed stays in
        the WAL for the next attempt.
        """
        async with self._lock:
            try:
                flushed = await self._flush_locked()
            except Exception as exc:
                self._on_failure(exc)
                raise
            finally:
                self._update_gauges()
            self._on_success(flushed)
            return flushed

    async def _flush_locked(self) -> int:
        await self.wal.seal()
        loop = asyncio.get_running_loop()
        flushed = 0
        for group in self._groups(self.wal.sealed_segments()):
            # Disk reads off the event loop; only this group's records are in memory.
            payloads = await loop.run_in_executor(None, _read_payloads, self.wal, group)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.write_timeout):
                    result = await self.writer.write_payloads(payloads)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                inserted = await self._isolate(group, payloads, exc)
            else:
                self.metrics.flush_duration.observe(time.perf_counter() - started)
                inserted = result.inserted
            self.metrics.flushed.inc(inserted)
            for seg in group:  # committed: now, and only now, the segments may go
                self.wal.drop(seg)
                flushed += seg.reports
                if self.on_dropped is not None:
                    try:
                        self.on_dropped(seg.seq)
                    except Exception:
                        log.exception("flush: on_dropped hook failed for segment %d", seg.seq)
            log.debug(
                "flush: committed %d segment(s), %d report(s), %d new",
                len(group),
                sum(s.reports for s in group),
                inserted,
            )
        self.metrics.last_flush_success.set(time.time())
        return flushed

    # -- poison reports ----------------------------------------------------------------------
    async def _isolate(
        self, group: Sequence[Segment], payloads: Sequence[bytes], first: BaseException
    ) -> int:
        """The database refuses the batch for its data, not its health (e.g. a rollup cost
        past NUMERIC(20,10)): retrying would fail forever and the WAL would fill up. Bisect
        down to the reports it refuses, commit the rest, and set those few aside on disk;
        return how many reports were new. A connection error in here propagates: the group
        is retried later, and what was already stored is de-duplicated then.
        """
        log.warning("flush: batch refused for its data (%s); isolating the reports it refuses",
                    describe_error(first))  # fmt: skip
        refused: list[tuple[dict[str, object], str]] = []

        async def store(payloads: Sequence[bytes], whole_records: bool) -> int:
            """Bisect: halves that the database accepts are committed as they are."""
            try:
                return (await self.writer.write_payloads(payloads)).inserted
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                if len(payloads) > 1:
                    mid = len(payloads) // 2
                    return await store(payloads[:mid], whole_records) + await store(
                        payloads[mid:], whole_records
                    )
                try:
                    reports = orjson.loads(payloads[0])
                except ValueError:
                    refused.append(({"raw": payloads[0].decode(errors="replace")}, "bad JSON"))
                    return 0
                if whole_records and len(reports) > 1:  # one record: now its reports
                    return await store([orjson.dumps([r]) for r in reports], False)
                refused.extend((r, describe_error(exc)) for r in reports)
                return 0

        inserted = await store(payloads, True)
        if refused:
            path = await asyncio.to_thread(self._quarantine, group, refused)
            self.metrics.quarantined.inc(len(refused))
            log.error(
                "flush: the database refused %d report(s); they are kept in %s (not counted "
                "in the rollups), first error: %s",
                len(refused),
                path,
                refused[0][1],
            )
        return inserted

    def _quarantine(
        self, group: Sequence[Segment], refused: Sequence[tuple[dict[str, object], str]]
    ) -> Path:
        """Append the refused reports (and why) to an NDJSON file, durably, before the WAL
        segments holding them are dropped."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        path = self.quarantine_dir / f"refused-{group[0].seq:016d}-{group[-1].seq:016d}.ndjson"
        with path.open("ab") as f:
            for report, error in refused:
                f.write(orjson.dumps({"error": error, "report": report}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return path

    def _on_failure(self, exc: BaseException) -> None:
        self.metrics.flush_failures.inc()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "flush failed, keeping %d report(s) in the WAL (%d bytes) and retrying with "
                "backoff up to %gs: %s",
                self.wal.pending_reports,
                self.wal.total_bytes,
                self.max_backoff,
                describe_error(exc),
            )
        else:
            log.debug("flush failed again (%d in a row): %s", self._failures, describe_error(exc))

    def _on_success(self, flushed: int) -> None:
        if self._failing_since is not None:
            log.warning(
                "flush recovered after %d failed attempt(s) over %.1fs; %d report(s) flushed",
                self._failures,
                time.monotonic() - self._failing_since,
                flushed,
            )
        self._failing_since = None
        self._failures = 0

    def backoff_delay(self) -> float:
        """Next retry delay: doubling from min(1 s, interval), capped, with ±20% jitter."""
        return backoff_delay(self._failures, base=min(1.0, self.interval), cap=self.max_backoff)

    # -- retention ---------------------------------------------------------------------------
    async def run_retention(self) -> int:
        """Delete details past retention (bounded work per call); rollups are kept."""
        return await purge_details(
            self.writer.engine,
            retention_cutoff(self.retention_days),
            max_batches=RETENTION_MAX_BATCHES,
        )

    async def _maybe_retention(self) -> None:
        if self.failing or time.monotonic() < self._next_retention:
            return
        self._next_retention = time.monotonic() + self.retention_interval
        try:
            await self.run_retention()
        except Exception as exc:
            log.warning("retention failed (will retry in %.0fs): %s",
                        self.retention_interval, describe_error(exc))  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """The loop: flush now (startup replay), then every interval or when nudged."""
        self._run_task = asyncio.current_task()
        first = True
        while not self._stopping:
            if not first:
                if self.failing:
                    await self._sleep(self.backoff_delay())
                else:
                    await self._sleep(self.interval, wake_on_nudge=True)
                if self._stopping:
                    break
            first = False
            self._wake.clear()
            if self.wal.pending_reports:
                try:
                    await self.flush_once()
                except Exception as exc:  # counted and logged once by flush_once
                    log.debug("flush: will retry after backoff (%s)", type(exc).__name__)
                    continue
            await self._maybe_retention()

    async def _sleep(self, seconds: float, *, wake_on_nudge: bool = False) -> None:
        if not wake_on_nudge:
            self._wake.clear()  # during backoff only stop() may cut the sleep short
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:  # noqa: ASYNC109
        """Final flush (SIGTERM), bounded by `timeout`; what misses it is replayed at start."""
        self._stopping = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                task = self._run_task
                if task is not None and task is not asyncio.current_task() and not task.done():
                    await task
                if self.wal.pending_reports:
                    await self.flush_once()
        except TimeoutError:
            log.warning(
                "final flush did not finish within %.0fs; %d report(s) stay in the WAL and "
                "are flushed at the next start",
                timeout,
                self.wal.pending_reports,
            )
        except Exception:
            log.warning(
                "final flush failed; %d report(s) stay in the WAL and are flushed at the next "
                "start",
                self.wal.pending_reports,
            )
