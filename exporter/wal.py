"""Append-only on-disk log of accepted reports: durability before we answer 202.

Records (exporter/walformat.py) are `[u32 length][u32 crc32][u32 report count][payload]`.
Appends from concurrent requests are grouped into one write + fsync (group commit).
Segments rotate by size or when the flusher seals the active one; a segment is deleted only
after the database has committed its reports, so a crash at any point replays at most what
the database then de-duplicates by request_id.

Failure rules (a 202 must never sit behind a torn record):
- a failed write or fsync fails the appends of that batch (the caller answers 503), the fd is
  never written again: it is truncated back to the last good offset (best effort), closed,
  and the next batch goes to a fresh segment; so torn bytes can only be a segment's tail;
- rotation opens the new segment before it closes the old one: if it cannot, the old one
  stays active and keeps what it has;
- while the log cannot write, `broken_reason` says why (for /readyz and logs), batches fail
  at once, and the writer probes the disk every `probe_interval` until it can write again;
- the reader still resynchronises past a corrupt record in the middle (bit rot), so one bad
  record never hides later intact ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from exporter.walformat import Record, encode_record, read_records, scan_records
from exporter.walsync import FileThread

__all__ = [
    "Record",
    "Segment",
    "WalBroken",
    "WalClosed",
    "WalFull",
    "WriteAheadLog",
    "encode_record",
    "read_records",
]

log = logging.getLogger(__name__)

_PREFIX = "wal-"
_SUFFIX = ".log"
PROBE_BYTES = 64 * 1024
_T = TypeVar("_T")


class WalFull(Exception):
    """The WAL is at its size cap: the caller must push back (503), never drop."""


class WalClosed(Exception):
    """The WAL is shutting down."""


class WalBroken(Exception):
    """The WAL cannot write right now (disk full, I/O error, no segment): push back (503)."""


@dataclass
class Segment:
    seq: int
    path: Path
    size: int = 0
    reports: int = 0
    sealed: bool = False
    _fd: int | None = field(default=None, repr=False)


@dataclass
class _Pending:
    data: bytes
    reports: int
    future: asyncio.Future[int]


def _segment_name(seq: int) -> str:
    return f"{_PREFIX}{seq:016d}{_SUFFIX}"


class WriteAheadLog:
    """Single-writer log owned by one event loop."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int,
        max_bytes: int,
        durability: Literal["fsync", "os"] = "fsync",
        probe_interval: float = 1.0,
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = durability == "fsync"
        self.probe_interval = probe_interval
        self._segments: list[Segment] = []  # sealed ones, then the active one (if any)
        self._next_seq = 1
        self._queue: list[_Pending] = []
        self._queued_bytes = 0
        self._bytes = 0  # sum of segment sizes
        self._reports = 0  # sum of segment report counts
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = asyncio.Lock()
        self._broken: str | None = None
        self._broken_since = 0.0
        self._last_attempt = 0.0
        #: write/fsync/open failures so far (the self-metric reads it)
        self.failures = 0
        #: called with a short kind ("write", "rotate", ...) on every failure
        self.on_failure: list[Callable[[str], None]] = []
        #: the thread that runs the blocking file calls when they fsync (exporter.walsync)
        self.files = FileThread()

    # -- state -------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self._bytes + self._queued_bytes

    @property
    def pending_reports(self) -> int:
        """Reports written and not yet dropped (kept as running totals: read on every append)."""
        return self._reports

    @property
    def active(self) -> Segment | None:
        if self._segments and not self._segments[-1].sealed:
            return self._segments[-1]
        return None

    @property
    def broken_reason(self) -> str | None:
        """Why the log cannot write right now, or None when it can (for /readyz)."""
        if self._writer is not None and self._writer.done() and not self._closed:
            return "the WAL writer task stopped"
        return self._broken

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self, on_record: Callable[[Record], None] | None = None) -> None:
        """Scan existing segments (truncating a torn tail) and start a fresh active segment.
        Blocking: the service calls `open_async`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        seqs = sorted(
            int(p.name[len(_PREFIX) : -len(_SUFFIX)])
            for p in self.directory.glob(f"{_PREFIX}*{_SUFFIX}")
        )
        for seq in seqs:
            self._load_segment(self.directory / _segment_name(seq), seq, on_record)
        self._next_seq = (seqs[-1] + 1) if seqs else 1
        try:
            self._segments.append(self._new_segment_sync())
        except OSError as exc:  # start anyway: replay what we have, answer 503, probe
            self._failed("open", f"cannot create a WAL segment: {_describe(exc)}")
        if len(self._segments) > 1:
            log.info("wal: %d segment(s) with %d report(s) to replay",
                     len(self._segments) - 1, self.pending_reports)  # fmt: skip

    async def open_async(self, on_record: Callable[[Record], None] | None = None) -> None:
        """`open` in a worker thread: reading up to `wal_max_bytes` must not stall the loop.
        `on_record` runs in that thread, before the service takes any request."""
        await asyncio.to_thread(self.open, on_record)

    def _load_segment(
        self, path: Path, seq: int, on_record: Callable[[Record], None] | None
    ) -> None:
        scan = scan_records(path.read_bytes())
        size = path.stat().st_size
        if scan.skipped:
            log.error("wal: %s has %d corrupt byte(s) before intact records; skipped them, "
                      "kept %d record(s)", path.name, scan.skipped, len(scan.records))  # fmt: skip
        if scan.good < size:
            log.warning("wal: truncating torn tail of %s at byte %d of %d (unacknowledged "
                        "write)", path.name, scan.good, size)  # fmt: skip
            with path.open("r+b") as f:
                f.truncate(scan.good)
                os.fsync(f.fileno())
        if not scan.records:
            path.unlink()
            return
        if on_record is not None:
            for record in scan.records:
                on_record(record)
        reports = sum(r.reports for r in scan.records)
        self._segments.append(Segment(seq, path, scan.good, reports, sealed=True))
        self._bytes += scan.good
        self._reports += reports

    def _new_segment_sync(self) -> Segment:
        """Create the next segment file (and make its name durable). Blocking."""
        seq = self._next_seq
        path = self.directory / _segment_name(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if self.fsync:
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._next_seq = seq + 1
        return Segment(seq, path, 0, 0, sealed=False, _fd=fd)

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="wal")
        self._writer.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("wal: writer task died: %r; failing queued appends", exc)
        self._fail_queue(WalBroken("the WAL writer task stopped"))

    async def close(self) -> None:
        """Write what is queued, then stop. Segments stay on disk for the next start."""
        self._closed = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        self.files.stop()
        for seg in self._segments:
            if seg._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(seg._fd)
                seg._fd = None
            if seg.size == 0 and seg.path.exists():
                seg.path.unlink()

    # -- append (ingest side) ----------------------------------------------------------------
    def reserve_check(self, nbytes: int) -> None:
        if self.total_bytes + nbytes > self.max_bytes:
            raise WalFull(f"WAL at {self.total_bytes} of {self.max_bytes} bytes")

    async def append(self, payload: bytes, reports: int) -> int:
        """Durably append one record; returns the sequence number of its segment."""
        return await self.submit(payload, reports)

    def submit(self, payload: bytes, reports: int) -> asyncio.Future[int]:
        """`append` without its coroutine (the ingest path awaits the future itself): queues
        the record for the next group commit, or raises WalClosed / WalBroken / WalFull."""
        if self._closed:
            raise WalClosed("WAL is closed")
        if self._writer is not None and self._writer.done():
            raise WalBroken("the WAL writer task stopped")
        record = encode_record(payload, reports)
        self.reserve_check(len(record))
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(record, reports, fut))
        self._queued_bytes += len(record)
        self._wakeup.set()
        return fut

    def _fail_queue(self, exc: BaseException) -> None:
        batch, self._queue = self._queue, []
        for p in batch:
            self._queued_bytes -= len(p.data)
            if not p.future.done():
                p.future.set_exception(exc)

    async def _io(self, fn: Callable[..., _T], *args: object) -> _T:
        """File work: in the WAL's file thread when it fsyncs (one hop per group commit); a
        page-cache write is not worth the hop."""
        if self.fsync:
            return await self.files.run(fn, *args)
        return fn(*args)

    async def _write_loop(self) -> None:
        while True:
            if self._broken is not None and not self._queue and not self._closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.probe_interval)
                if not self._queue and not self._closed:
                    async with self._lock:
                        await self._probe()
                    continue
            else:
                await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                if self._closed:
                    return
                continue
            batch, self._queue = self._queue, []
            data = b"".join(p.data for p in batch)
            async with self._lock:
                try:
                    seg = await self._write_batch(data)
                except OSError as exc:
                    self._queued_bytes -= len(data)
                    failure = WalBroken(self._broken or _describe(exc))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(failure)
                    continue
                self._queued_bytes -= len(data)
                written = sum(p.reports for p in batch)
                seg.size += len(data)
                seg.reports += written
                self._bytes += len(data)
                self._reports += written
                self._recovered()
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(seg.seq)
                if seg.size >= self.segment_bytes:
                    await self._rotate()
            if self._closed and not self._queue:
                return

    async def _ensure_active(self) -> Segment:
        seg = self.active
        if seg is not None and seg._fd is not None:
            return seg
        now = time.monotonic()
        if self._broken is not None and now - self._last_attempt < self.probe_interval:
            raise OSError(errno.EIO, f"not retried yet: {self._broken}")
        self._last_attempt = now
        try:
            seg = await self._io(self._new_segment_sync)
        except OSError as exc:
            self._failed("open", f"cannot create a WAL segment: {_describe(exc)}")
            raise
        self._segments.append(seg)
        return seg

    async def _write_batch(self, data: bytes) -> Segment:
        seg = await self._ensure_active()
        fd = seg._fd
        assert fd is not None
        try:
            await self._io(self._write_sync, fd, data)
        except OSError as exc:
            self._failed("write", f"write to {seg.path.name} failed: {_describe(exc)}")
            seg._fd = None  # never reused: a later record must not follow torn bytes
            await self._io(self._abandon_sync, fd, seg.path, seg.size)
            self._retire(seg)
            raise
        return seg

    def _write_sync(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if self.fsync:
            os.fdatasync(fd)

    @staticmethod
    def _abandon_sync(fd: int, path: Path, good: int) -> None:
        """Cut the torn bytes off (best effort: if that fails too, they are a segment tail,
        which the reader ignores and the next start truncates) and close the fd."""
        try:
            os.ftruncate(fd, good)
            if good == 0:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("wal: could not truncate %s back to %d bytes (%s); the torn tail is "
                        "cut at the next start", path.name, good, _describe(exc))  # fmt: skip
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _retire(self, seg: Segment) -> None:
        """The segment takes no more writes: sealed if it holds data, else forgotten."""
        if seg.size == 0:
            self._segments.remove(seg)
        else:
            seg.sealed = True

    async def _probe(self) -> None:
        """While broken and idle: can we create a segment and reserve space again?"""
        try:
            seg = await self._ensure_active()
            fd = seg._fd
            assert fd is not None
            await self._io(_probe_space, fd, seg.size)
        except OSError:
            seg_now = self.active
            if seg_now is not None and seg_now._fd is not None and self._broken is not None:
                fd, seg_now._fd = seg_now._fd, None
                await self._io(self._abandon_sync, fd, seg_now.path, seg_now.size)
                self._retire(seg_now)
            return
        self._recovered()

    async def _rotate(self) -> None:
        """Open the next segment, then seal the active one; if the open fails, keep it."""
        old = self.active
        if old is None or old.size == 0 or old._fd is None:
            return
        try:
            new = await self._io(self._new_segment_sync)
        except OSError as exc:
            self._failed("rotate", f"cannot rotate past {old.path.name}: {_describe(exc)}",
                         broken=False)  # fmt: skip
            return
        old_fd, old._fd = old._fd, None
        old.sealed = True
        self._segments.append(new)
        try:
            await self._io(os.close, old_fd)
        except OSError as exc:  # data was fsynced already; nothing to retry
            log.warning("wal: closing %s: %s", old.path.name, _describe(exc))

    # -- failure bookkeeping -----------------------------------------------------------------
    def _failed(self, kind: str, reason: str, *, broken: bool = True) -> None:
        self.failures += 1
        if broken:
            if self._broken is None:
                self._broken_since = time.monotonic()
            self._broken = reason
            self._last_attempt = time.monotonic()  # the next try waits for probe_interval
        for hook in self.on_failure:
            hook(kind)
        outcome = "the affected appends are answered 503" if broken else (
            "the active segment keeps taking writes; rotation is retried")  # fmt: skip
        log.error("wal: %s; %s", reason, outcome,  # once a minute per kind (logevents)
                  extra={"event": "wal_failure", "event_key": ("wal", kind)})  # fmt: skip

    def _recovered(self) -> None:
        if self._broken is None:
            return
        log.warning("wal: writing again after %.1fs (%d failure(s) so far): was %s",
                    time.monotonic() - self._broken_since, self.failures,
                    self._broken)  # fmt: skip
        self._broken = None

    # -- flush side --------------------------------------------------------------------------
    async def seal(self) -> None:
        """Close the active segment (if it holds data) so the flusher can take it."""
        async with self._lock:
            await self._rotate()

    def sealed_segments(self) -> list[Segment]:
        return [s for s in self._segments if s.sealed]

    @staticmethod
    def read(segment: Segment) -> list[Record]:
        records, _ = read_records(segment.path, segment.size)
        return records

    def drop(self, segment: Segment) -> None:
        """Forget a segment whose reports are committed."""
        assert segment.sealed
        segment.path.unlink(missing_ok=True)
        self._segments.remove(segment)
        self._bytes -= segment.size
        self._reports -= segment.reports


def _probe_space(fd: int, size: int) -> None:
    """Reserve PROBE_BYTES past the end, then give them back (a real ENOSPC check)."""
    try:
        os.posix_fallocate(fd, size, PROBE_BYTES)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    os.ftruncate(fd, size)


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror or exc}" if name else str(exc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
