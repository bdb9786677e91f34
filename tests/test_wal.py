"""The write-ahead log on real files: reopen, torn tails, crc and resync, the size cap,
seal/drop, rotation, group commit, a real ENOSPC mid-write (tmpfs), and the HTTP path (202
only once the report is on disk)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from faultkit import Tmpfs, mount_tmpfs
from helpers import make_settings, report

from exporter.app import create_app
from exporter.ingest.dedupe import RecentIds
from exporter.wal import WalBroken, WalClosed, WalFull, WriteAheadLog, encode_record, read_records

HEADER = 12  # u32 length, u32 crc, u32 report count


def wal_at(directory: Path, **kw: Any) -> WriteAheadLog:
    kw.setdefault("segment_bytes", 1024 * 1024)
    kw.setdefault("max_bytes", 64 * 1024 * 1024)
    return WriteAheadLog(directory, **kw)


async def started(directory: Path, **kw: Any) -> WriteAheadLog:
    wal = wal_at(directory, **kw)
    wal.open()
    wal.start()
    return wal


def payloads(n: int, size: int = 40) -> list[bytes]:
    return [f"record-{i:05d}-".encode().ljust(size, b"x") for i in range(n)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def all_records(wal: WriteAheadLog) -> list[tuple[int, bytes]]:
    return [(r.reports, r.payload) for s in wal.sealed_segments() for r in wal.read(s)]


async def write_and_close(directory: Path, items: list[bytes], **kw: Any) -> None:
    wal = await started(directory, **kw)
    for i, p in enumerate(items):
        await wal.append(p, i + 1)
    await wal.close()


async def test_records_survive_reopen(tmp_path: Path) -> None:
    items = payloads(5)
    await write_and_close(tmp_path, items)

    wal = await started(tmp_path)
    assert all_records(wal) == [(i + 1, p) for i, p in enumerate(items)]
    assert wal.pending_reports == sum(range(1, 6))
    # new appends go to a fresh segment; everything is there after another reopen
    await wal.append(b"later", 7)
    await wal.close()
    wal = await started(tmp_path)
    assert [p for _, p in all_records(wal)] == [*items, b"later"]
    assert wal.pending_reports == 15 + 7
    await wal.close()


@pytest.mark.parametrize(
    "cut", [5, 12 + 40 - 1, 40 + 3], ids=["in-payload", "after-header", "in-header"]
)
async def test_torn_tail_is_truncated_and_earlier_records_survive(tmp_path: Path, cut: int) -> None:
    items = payloads(4)
    await write_and_close(tmp_path, items)
    (seg,) = segment_files(tmp_path)
    full = seg.stat().st_size
    assert full == 4 * (HEADER + 40)
    with seg.open("r+b") as f:  # the last record was being written when we crashed
        f.truncate(full - cut)

    wal = await started(tmp_path)
    assert [p for _, p in all_records(wal)] == items[:3]
    assert seg.stat().st_size == 3 * (HEADER + 40)  # cut back to the last intact record
    await wal.append(b"after-crash", 1)
    await wal.close()
    wal = await started(tmp_path)
    assert [p for _, p in all_records(wal)] == [*items[:3], b"after-crash"]
    await wal.close()


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 7, b"garbage that is not a record at all", os.urandom(4096), b"\xff" * 12],
    ids=["zeros", "text", "random", "huge-length"],
)
async def test_garbage_after_the_last_record_is_truncated(tmp_path: Path, garbage: bytes) -> None:
    items = payloads(3)
    await write_and_close(tmp_path, items)
    (seg,) = segment_files(tmp_path)
    good = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(garbage)
    wal = await started(tmp_path)
    assert [p for _, p in all_records(wal)] == items
    assert seg.stat().st_size == good
    await wal.close()


async def test_crc_mismatch_skips_only_the_bad_record(tmp_path: Path) -> None:
    items = payloads(3)
    await write_and_close(tmp_path, items)
    (seg,) = segment_files(tmp_path)
    data = bytearray(seg.read_bytes())
    record = HEADER + 40

    flipped_payload = bytearray(data)
    flipped_payload[record + HEADER + 5] ^= 0x01  # one bit in the second record's payload
    seg.write_bytes(bytes(flipped_payload))
    records, good = read_records(seg)
    assert [r.payload for r in records] == [items[0], items[2]]  # resynchronised past it
    assert good == len(data)

    flipped_count = bytearray(data)
    flipped_count[record + 8] ^= 0x01  # the report count is covered by the crc too
    seg.write_bytes(bytes(flipped_count))
    records, good = read_records(seg)
    assert [r.payload for r in records] == [items[0], items[2]]

    flipped_last = bytearray(data)
    flipped_last[-3] ^= 0x01  # nothing intact after it: a torn tail
    seg.write_bytes(bytes(flipped_last))
    records, good = read_records(seg)
    assert [r.payload for r in records] == items[:2] and good == 2 * record

    seg.write_bytes(bytes(data))
    records, good = read_records(seg)
    assert [r.payload for r in records] == items and good == len(data)


async def test_corrupt_record_mid_segment_never_hides_later_records_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = payloads(6)
    await write_and_close(tmp_path, items)
    (seg,) = segment_files(tmp_path)
    data = bytearray(seg.read_bytes())
    record = HEADER + 40
    data[2 * record : 3 * record] = os.urandom(record)  # the third record is garbage
    seg.write_bytes(bytes(data))
    wal = await started(tmp_path)
    assert [p for _, p in all_records(wal)] == items[:2] + items[3:]
    assert wal.pending_reports == sum(i + 1 for i in range(6) if i != 2)
    assert "corrupt byte(s) before intact records" in caplog.text
    await wal.close()


async def test_segment_with_nothing_intact_is_removed(tmp_path: Path) -> None:
    await write_and_close(tmp_path, payloads(2))
    (seg,) = segment_files(tmp_path)
    seg.write_bytes(b"\x01\x02\x03" * 100)
    wal = await started(tmp_path)
    assert wal.sealed_segments() == []
    assert wal.pending_reports == 0
    assert not seg.exists()
    await wal.close()


def test_encode_record_layout() -> None:
    rec = encode_record(b"hello", 3)
    assert len(rec) == HEADER + 5
    assert int.from_bytes(rec[:4], "little") == 5
    assert int.from_bytes(rec[8:12], "little") == 3
    assert rec[HEADER:] == b"hello"


async def test_wal_full_at_the_cap(tmp_path: Path) -> None:
    size = 1000
    wal = await started(tmp_path, max_bytes=4096)
    accepted = 0
    with pytest.raises(WalFull):
        for p in payloads(10, size):
            await wal.append(p, 1)
            accepted += 1
    assert accepted == 4096 // (HEADER + size)
    assert wal.total_bytes <= 4096
    # full stays full (never a silent drop), until the flusher drops a sealed segment
    with pytest.raises(WalFull):
        await wal.append(b"y" * size, 1)
    await wal.seal()
    (sealed,) = wal.sealed_segments()
    assert len(wal.read(sealed)) == accepted
    wal.drop(sealed)
    assert wal.total_bytes == 0
    await wal.append(b"z" * size, 1)
    await wal.close()


async def test_seal_and_drop(tmp_path: Path) -> None:
    wal = await started(tmp_path)
    await wal.seal()  # an empty active segment is not sealed
    assert wal.sealed_segments() == []
    first = payloads(3)
    for p in first:
        await wal.append(p, 2)
    await wal.seal()
    (seg1,) = wal.sealed_segments()
    assert [r.payload for r in wal.read(seg1)] == first
    assert wal.pending_reports == 6
    await wal.append(b"second-segment", 1)
    await wal.seal()
    seg1_again, seg2 = wal.sealed_segments()
    assert seg1_again is seg1 and seg2.seq > seg1.seq
    wal.drop(seg1)
    assert not seg1.path.exists()
    assert wal.pending_reports == 1
    await wal.close()
    wal = await started(tmp_path)  # the dropped segment is not replayed
    assert all_records(wal) == [(1, b"second-segment")]
    await wal.close()


async def test_rotation_by_size_keeps_order(tmp_path: Path) -> None:
    items = payloads(20, 300)
    wal = await started(tmp_path, segment_bytes=1024)
    for p in items:
        await wal.append(p, 1)
    assert len(wal.sealed_segments()) >= 4  # the 5th rotates just after its last append
    assert all(s.size >= 1024 for s in wal.sealed_segments())
    await wal.close()
    wal = await started(tmp_path, segment_bytes=1024)
    assert [p for _, p in all_records(wal)] == items
    await wal.close()


async def test_group_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = 0
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:  # a spy: the real sync still happens
        nonlocal syncs
        syncs += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    wal = await started(tmp_path, durability="fsync")
    items = payloads(500)
    seqs = await asyncio.gather(*(wal.append(p, 1) for p in items))
    assert len(seqs) == 500 and all(isinstance(s, int) for s in seqs)
    assert 1 <= syncs < 500 // 2, f"{syncs} fsyncs for 500 concurrent appends"
    await wal.close()
    wal = await started(tmp_path)
    got = [p for _, p in all_records(wal)]
    assert sorted(got) == sorted(items) and len(got) == 500
    await wal.close()


async def test_os_durability_skips_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = 0
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    await write_and_close(tmp_path, payloads(5), durability="os")
    assert syncs == 0
    wal = await started(tmp_path)
    assert len(all_records(wal)) == 5
    await wal.close()


async def test_close_writes_what_is_queued_and_refuses_more(tmp_path: Path) -> None:
    wal = await started(tmp_path)
    items = payloads(50)
    pending = [asyncio.ensure_future(wal.append(p, 1)) for p in items]
    await asyncio.sleep(0)  # queued, maybe not yet written
    await wal.close()
    assert all(isinstance(seq, int) for seq in await asyncio.gather(*pending))
    with pytest.raises(WalClosed):
        await wal.append(b"too late", 1)
    wal = await started(tmp_path)
    assert sorted(p for _, p in all_records(wal)) == sorted(items)
    await wal.close()


async def test_accepted_reports_are_in_the_wal_before_202(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, flush_interval=3600)
    client = await aiohttp_client(create_app(settings))
    batch = [report(request_id=f"wal-{i}", input_tokens=i) for i in range(5)]
    resp = await client.post("/v1/usage", json=[*batch, report(request_id="bad", input_tokens=-1)])
    assert resp.status == 202
    resp = await client.post("/v1/usage", json=batch[0])  # duplicate: not written again
    assert (await resp.json())["duplicates"] == 1

    found: list[dict[str, Any]] = []
    for path in sorted(settings.wal_dir.iterdir()):
        records, _ = read_records(path)
        for r in records:
            reports = orjson.loads(r.payload)
            assert len(reports) == r.reports
            found.extend(reports)
    assert sorted(r["request_id"] for r in found) == [f"wal-{i}" for i in range(5)]
    assert {r["request_id"]: r["input_tokens"] for r in found} == {f"wal-{i}": i for i in range(5)}


def test_recent_ids_discard_never_evicts_a_re_added_id_early() -> None:
    recent = RecentIds(3)
    recent.add("a")
    recent.discard("a")  # its write failed
    for rid in ("b", "c", "a"):  # the retry of "a" is accepted later
        recent.add(rid)
    recent.add("d")  # one over capacity: the oldest live id ("b") goes, not the re-added "a"
    assert [rid in recent for rid in "abcd"] == [True, False, True, True]
    assert len(recent) == 3


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "disk", "size=1m")


async def test_failed_write_leaves_no_torn_record_before_acknowledged_ones(
    small_disk: Tmpfs,
) -> None:
    directory = small_disk.path / "wal"
    wal = await started(directory, probe_interval=0.05)
    acked = payloads(3, 1000)
    for p in acked:
        await wal.append(p, 1)
    filler = small_disk.fill(leave=20_000)
    big = b"x" * 200_000  # cannot fit: ENOSPC part-way, a torn record on disk
    with pytest.raises(WalBroken):
        await wal.append(big, 1)
    assert wal.failures >= 1 and wal.broken_reason is not None
    assert "ENOSPC" in wal.broken_reason
    with pytest.raises(WalBroken):  # batches fail at once while broken
        await wal.append(b"while-broken", 1)
    filler.unlink()
    deadline = asyncio.get_running_loop().time() + 5
    while wal.broken_reason is not None:  # the probe notices the space by itself
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    later = payloads(3, 500)
    for p in later:
        await wal.append(p, 1)
    # the failed segment was cut back to its last good record: nothing torn sits anywhere
    for seg in wal.sealed_segments():
        assert seg.path.stat().st_size == seg.size
    await wal.close()
    wal = await started(directory)
    assert [p for _, p in all_records(wal)] == acked + later
    await wal.close()
