"""The WAL's record format and its reader.

A record is `[u32 length][u32 crc32][u32 report count][payload]`; the crc covers the count and
the payload. The reader keeps every intact record: past a corrupt one it resynchronises at the
next offset holding an intact record, so one bad record never hides later ones; what follows
the last intact record is a torn tail.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_RECORD", "Record", "Scan", "encode_record", "read_records", "scan_records"]

HEADER = struct.Struct("<III")
MAX_RECORD = 64 * 1024 * 1024


@dataclass(frozen=True)
class Record:
    reports: int
    payload: bytes


@dataclass
class Scan:
    records: list[Record]
    #: byte offset where the last intact record ends (what follows is a torn tail)
    good: int
    #: corrupt bytes skipped *before* later intact records (never expected; bit rot)
    skipped: int = 0


def _crc(reports: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(reports.to_bytes(4, "little")))


def encode_record(payload: bytes, reports: int) -> bytes:
    return HEADER.pack(len(payload), _crc(reports, payload), reports) + payload


def _record_at(data: bytes, offset: int) -> Record | None:
    if offset + HEADER.size > len(data):
        return None
    length, crc, reports = HEADER.unpack_from(data, offset)
    start = offset + HEADER.size
    end = start + length
    if length > MAX_RECORD or end > len(data):
        return None
    payload = data[start:end]
    if _crc(reports, payload) != crc:
        return None
    return Record(reports, payload)


def scan_records(data: bytes) -> Scan:
    """Every intact record; past a bad one, resynchronise at the next offset that holds an
    intact record (a crc match by chance is a 1-in-4-billion event)."""
    scan = Scan([], 0)
    offset = 0
    while offset + HEADER.size <= len(data):
        record = _record_at(data, offset)
        if record is not None:
            scan.records.append(record)
            offset += HEADER.size + len(record.payload)
            scan.good = offset
            continue
        nxt = offset + 1
        while nxt + HEADER.size <= len(data) and _record_at(data, nxt) is None:
            nxt += 1
        if nxt + HEADER.size > len(data):
            break  # nothing intact follows: a torn tail
        scan.skipped += nxt - offset
        offset = nxt
    return scan


def read_records(path: Path, limit: int | None = None) -> tuple[list[Record], int]:
    """All intact records of a segment (its first `limit` bytes), and where intact data ends."""
    with path.open("rb") as f:
        data = f.read() if limit is None else f.read(limit)
    scan = scan_records(data)
    return scan.records, scan.good
