"""Append-only on-disk log of accepted reports: durability before we answer 202.

Records are `[u32 length][u32 crc32][u32 report count][payload]`; the crc covers count and
payload. Appends from concurrent requests are grouped
into one write + fsync (group commit). Segments rotate by size or when the flusher seals the
active one; a segment is deleted only after the database has committed its reports, so a
crash at any point replays at most what the database then de-duplicates by request_id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<III")
_PREFIX = "wal-"
_SUFFIX = ".log"
MAX_RECORD = 64 * 1024 * 1024


class WalFull(Exception):
    """The WAL is at its size cap: the caller must push back (503), never drop."""


class WalClosed(Exception):
    """The WAL is shutting down."""


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


def _crc(reports: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(reports.to_bytes(4, "little")))


def encode_record(payload: bytes, reports: int) -> bytes:
    return _HEADER.pack(len(payload), _crc(reports, payload), reports) + payload


@dataclass(frozen=True)
class Record:
    reports: int
    payload: bytes


def read_records(path: Path) -> tuple[list[Record], int]:
    """All intact records of a segment, and the byte offset where intact data ends."""
    data = path.read_bytes()
    records: list[Record] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc, reports = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        if length > MAX_RECORD or end > len(data):
            break
        payload = data[start:end]
        if _crc(reports, payload) != crc:
            break
        records.append(Record(reports, payload))
        offset = end
    return records, offset


class WriteAheadLog:
    """Single-writer log owned by one event loop."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int,
        max_bytes: int,
        durability: Literal["fsync", "os"] = "fsync",
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = durability == "fsync"
        self._segments: list[Segment] = []
        self._queue: list[_Pending] = []
        self._queued_bytes = 0
        self._bytes = 0  # sum of segment sizes
        self._reports = 0  # sum of segment report counts
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = asyncio.Lock()

    # -- state -------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self._bytes + self._queued_bytes

    @property
    def pending_reports(self) -> int:
        """Reports written and not yet dropped (kept as running totals: read on every append)."""
        return self._reports

    @property
    def active(self) -> Segment:
        return self._segments[-1]

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Scan existing segments (truncating a torn tail) and start a fresh active segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        seqs = sorted(
            int(p.name[len(_PREFIX) : -len(_SUFFIX)])
            for p in self.directory.glob(f"{_PREFIX}*{_SUFFIX}")
        )
        for seq in seqs:
            path = self.directory / _segment_name(seq)
            records, good = read_records(path)
            size = path.stat().st_size
            if good < size:
                log.warning(
                    "wal: truncating torn tail of %s at byte %d of %d (unacknowledged write)",
                    path.name,
                    good,
                    size,
                )
                with path.open("r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            if not records:
                path.unlink()
                continue
            reports = sum(r.reports for r in records)
            self._segments.append(Segment(seq, path, good, reports, sealed=True))
            self._bytes += good
            self._reports += reports
        next_seq = (seqs[-1] + 1) if seqs else 1
        self._new_active(next_seq)
        if len(self._segments) > 1:
            log.info(
                "wal: %d segment(s) with %d report(s) to replay",
                len(self._segments) - 1,
                self.pending_reports,
            )

    def _new_active(self, seq: int) -> None:
        path = self.directory / _segment_name(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append(Segment(seq, path, 0, 0, sealed=False, _fd=fd))
        if self.fsync:
            _fsync_dir(self.directory)

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="wal")

    async def close(self) -> None:
        """Write what is queued, then stop. Segments stay on disk for the next start."""
        self._closed = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        for seg in self._segments:
            if seg._fd is not None:
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
        if self._closed:
            raise WalClosed("WAL is closed")
        record = encode_record(payload, reports)
        self.reserve_check(len(record))
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(record, reports, fut))
        self._queued_bytes += len(record)
        self._wakeup.set()
        return await fut

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                if self._closed:
                    return
                continue
            batch, self._queue = self._queue, []
            data = b"".join(p.data for p in batch)
            async with self._lock:
                seg = self.active
                try:
                    if self.fsync:
                        await loop.run_in_executor(None, self._write, seg, data)
                    else:  # a page-cache write is microseconds: not worth a thread hop
                        self._write(seg, data)
                except OSError as exc:
                    self._queued_bytes -= len(data)
                    log.error("wal: write to %s failed: %s", seg.path.name, exc)
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                self._queued_bytes -= len(data)
                written = sum(p.reports for p in batch)
                seg.size += len(data)
                seg.reports += written
                self._bytes += len(data)
                self._reports += written
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(seg.seq)
                if seg.size >= self.segment_bytes:
                    self._seal_active()
            if self._closed and not self._queue:
                return

    def _write(self, seg: Segment, data: bytes) -> None:
        assert seg._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(seg._fd, view)
            view = view[written:]
        if self.fsync:
            os.fdatasync(seg._fd)

    # -- flush side --------------------------------------------------------------------------
    def _seal_active(self) -> None:
        seg = self.active
        if seg.size == 0:
            return
        assert seg._fd is not None
        os.close(seg._fd)
        seg._fd = None
        seg.sealed = True
        self._new_active(seg.seq + 1)

    async def seal(self) -> None:
        """Close the active segment (if it holds data) so the flusher can take it."""
        async with self._lock:
            self._seal_active()

    def sealed_segments(self) -> list[Segment]:
        return [s for s in self._segments if s.sealed]

    @staticmethod
    def read(segment: Segment) -> list[Record]:
        records, _ = read_records(segment.path)
        return records

    def drop(self, segment: Segment) -> None:
        """Forget a segment whose reports are committed."""
        assert segment.sealed
        segment.path.unlink(missing_ok=True)
        self._segments.remove(segment)
        self._bytes -= segment.size
        self._reports -= segment.reports


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
