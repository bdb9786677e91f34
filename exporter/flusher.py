"""Moves accepted reports from the WAL into the database, exactly once, whatever happens.

Every `flush_interval` (or sooner when `nudge()` sees a large backlog) the flusher seals the
active WAL segment and writes the sealed segments, oldest first, in transactions of about
`flush_max_reports` reports. A segment is dropped only after the transaction holding its
reports has committed; if the process dies in between, the replay is de-duplicated by the
database (details are unique by request_id and rollups only add what was really inserted).

A failing flush keeps everything in the WAL: the flusher retries with exponential backoff
(capped at `flush_max_backoff`), counts each failure (`llm_usage_flush_failures_total`), logs
the outage once and its end once, and reads segments from disk per attempt, so memory stays
flat however long the outage lasts. Ingest pushes back with 503 when the WAL reaches its size
cap. A database that hangs instead of failing is abandoned after `write_timeout`.

Which failures are whose fault is `store.errors.classify`: only a batch the database refuses
for its *data* goes to `store.quarantine` (bisected, the rest committed); a bug in our write
path is a flush failure like an outage, never a reason to set reports aside. Retention runs
as its own task (`store.retention_schedule`), never inside the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from exporter.backoff import backoff_delay
from exporter.config import Settings
from exporter.selfmetrics import SelfMetrics
from exporter.store.errors import ErrorKind, classify, describe_error, is_schema_missing
from exporter.store.quarantine import Quarantine
from exporter.store.retention_schedule import RetentionSchedule
from exporter.store.writer import WriteResult
from exporter.wal import Segment, WriteAheadLog

__all__ = ["BatchWriter", "Flusher"]

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
#: A flush transaction of flush_max_reports takes seconds; past this the database is hung
#: (not down: that fails fast) and the attempt is abandoned, rolled back and retried.
WRITE_TIMEOUT_S = 120.0


class BatchWriter(Protocol):
    """What the flusher needs from the store (StoreWriter): one exactly-once transaction."""

    async def write_payloads(self, payloads: Sequence[bytes]) -> WriteResult: ...

    async def probe(self) -> None:
        """Raise what a write would raise now, writing nothing."""


@dataclass(frozen=True, slots=True)
class _Failure:
    kind: ErrorKind
    schema_missing: bool
    description: str


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
        store_writer: BatchWriter,
        self_metrics: SelfMetrics,
        settings: Settings,
        *,
        on_committed: Callable[[int], None] | None = None,
        before_drop: Callable[[], Awaitable[None]] | None = None,
        commit_lock: asyncio.Lock | None = None,
        retention: RetentionSchedule | None = None,
        write_timeout: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.wal = wal
        self.writer = store_writer
        self.metrics = self_metrics
        self.interval = settings.flush_interval
        self.max_reports = settings.flush_max_reports
        self.max_backoff = settings.flush_max_backoff
        self.write_timeout = write_timeout
        self.unready_after_failures = settings.flush_unready_after_failures
        #: each committed segment is told to `on_committed`, then `before_drop` is awaited,
        #: then the segments leave the WAL (budgets: their spend is in the state file first)
        self.on_committed = on_committed
        self.before_drop = before_drop
        #: held from each write until its segments are dropped (budgets: no spend query sees
        #: a commit that on_committed has not reported yet)
        self.commit_lock = commit_lock or asyncio.Lock()
        self.retention = retention
        self.quarantine = Quarantine(wal.directory.parent / "quarantine")
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._run_task: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._failures = 0  # consecutive
        #: run()'s first probe (for SQLite in a child process: the child's start) is under way
        self._starting = False
        self._failing_since: float | None = None
        # What the last failure was, never the exception itself: its traceback would keep the
        # failed batch's payloads alive for as long as the outage lasts.
        self._last_error: _Failure | None = None
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

    def readiness_problems(self) -> list[str]:
        """Why this replica should not get traffic, from the flush's point of view (/readyz):
        the first probe of `run()` is under way, the schema is missing, or
        `flush_unready_after_failures` flushes in a row failed."""
        last = self._last_error
        if self._starting:
            return ["flusher starting: its first probe of the database has not ended yet"]
        if last is None or not self._failures:
            return []
        if last.schema_missing:
            return [
                "database schema missing or behind: run `llm-usage-exporter db upgrade` "
                f"({last.description})"
            ]
        if self._failures < self.unready_after_failures:
            return []
        return [
            f"flush failing: {self._failures} consecutive failure(s), last "
            f"{last.kind.value}: {last.description}"
        ]

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

    async def _committed(self, group: Sequence[Segment]) -> None:
        """Tell the hooks; a failing hook is logged, never keeps committed segments."""
        if self.on_committed is not None:
            for seg in group:
                try:
                    self.on_committed(seg.seq)
                except Exception:
                    log.exception("flush: on_committed hook failed for segment %d", seg.seq)
        if self.before_drop is not None:
            try:
                await self.before_drop()
            except Exception:
                log.exception("flush: before_drop hook failed")

    async def _inserted(self, payloads: Sequence[bytes]) -> int:
        return (await self.writer.write_payloads(payloads)).inserted

    async def _flush_locked(self) -> int:
        await self.wal.seal()
        loop = asyncio.get_running_loop()
        flushed = 0
        groups = self._groups(self.wal.sealed_segments())
        if not groups:  # idle: still find out whether a flush would work (for /readyz)
            async with asyncio.timeout(self.write_timeout):
                await self.writer.probe()
        for group in groups:
            # Disk reads off the event loop; only this group's records are in memory.
            payloads = await loop.run_in_executor(None, _read_payloads, self.wal, group)
            async with self.commit_lock:
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(self.write_timeout):
                        inserted = await self._inserted(payloads)
                except Exception as exc:
                    if classify(exc) is not ErrorKind.REFUSED:
                        raise
                    name = f"{group[0].seq:016d}-{group[-1].seq:016d}"
                    isolated = await self.quarantine.isolate(self._inserted, payloads, exc, name)
                    self.metrics.quarantined.inc(isolated.refused)
                    inserted = isolated.inserted
                else:
                    self.metrics.flush_duration.observe(time.perf_counter() - started)
                self.metrics.flushed.inc(inserted)
                await self._committed(group)
                for seg in group:  # committed and recorded: now, and only now, they may go
                    self.wal.drop(seg)
                    flushed += seg.reports
            log.debug(
                "flush: committed %d segment(s), %d report(s), %d new",
                len(group),
                sum(s.reports for s in group),
                inserted,
            )
        self.metrics.last_flush_success.set(time.time())
        return flushed

    def _on_failure(self, exc: BaseException) -> None:
        self.metrics.flush_failures.inc()
        self._failures += 1
        self._last_error = _Failure(classify(exc), is_schema_missing(exc), describe_error(exc, 200))
        if self._failing_since is not None:
            log.debug("flush failed again (%d in a row): %s", self._failures, describe_error(exc))
            return
        self._failing_since = time.monotonic()
        kind, schema_missing = self._last_error.kind, self._last_error.schema_missing
        why = {
            ErrorKind.UNAVAILABLE: "database unavailable",
            ErrorKind.REFUSED: "database refused the data while isolating it",
            ErrorKind.BUG: "schema missing" if schema_missing else "unexpected error",
        }[kind]
        log.error(
            "flush failed (%s), keeping %d report(s) in the WAL (%d bytes) and retrying with "
            "backoff up to %gs: %s",
            why,
            self.wal.pending_reports,
            self.wal.total_bytes,
            self.max_backoff,
            describe_error(exc),
            exc_info=kind is ErrorKind.BUG and not schema_missing,
        )

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
        self._last_error = None

    def backoff_delay(self) -> float:
        """Next retry delay: doubling from min(1 s, interval), capped, with ±20% jitter."""
        return backoff_delay(self._failures, base=min(1.0, self.interval), cap=self.max_backoff)

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """The loop: flush now (startup replay), then every interval or when nudged.

        Retention, if configured, runs beside it as its own task, paused while flushes fail.
        """
        self._run_task = asyncio.current_task()
        await self._first_probe()
        if self.retention is not None and self._retention_task is None:
            self._retention_task = asyncio.get_running_loop().create_task(
                self.retention.run(
                    paused=lambda: self.failing,
                    on_deleted=self.metrics.retention_deleted.inc,
                    on_failure=lambda _exc: self.metrics.retention_failures.inc(),
                ),
                name="retention",
            )
        first = True
        while not self._stopping:
            if not first:
                if self.failing:
                    await self._sleep(self.backoff_delay())
                else:
                    await self._sleep(self.interval, wake_on_nudge=True)
                if self._stopping:
                    break
            # An idle flusher probes at start and while failing, so /readyz and the failure
            # count see a broken database (say, never migrated) before any report arrives.
            probe = first or self.failing
            first = False
            self._wake.clear()
            if self.wal.pending_reports or probe:
                try:
                    await self.flush_once()
                except Exception as exc:  # counted and logged once by flush_once
                    log.debug("flush: will retry after backoff (%s)", type(exc).__name__)

    async def _first_probe(self) -> None:
        """Probe once before the first pass (a SQLite flush process starts here) and stay
        unready meanwhile; a failure is counted by the first pass, which probes or writes."""
        self._starting = True
        try:
            async with asyncio.timeout(self.write_timeout):
                await self.writer.probe()
        except Exception as exc:
            log.debug("flush: first probe failed (%s)", type(exc).__name__)
        finally:
            self._starting = False

    async def _sleep(self, seconds: float, *, wake_on_nudge: bool = False) -> None:
        if not wake_on_nudge:
            self._wake.clear()  # during backoff only stop() may cut the sleep short
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _stop_retention(self) -> None:
        task, self._retention_task = self._retention_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:  # noqa: ASYNC109
        """Final flush (SIGTERM), bounded by `timeout`; what misses it is replayed at start."""
        self._stopping = True
        self._wake.set()
        await self._stop_retention()
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
