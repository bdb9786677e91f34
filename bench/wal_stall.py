"""Event-loop stalls caused by WAL file work: before (on the loop) vs after (in a thread).

A 1 ms ticker task records the longest gap between its ticks (the loop stall) while:

- **start-up scan**: the WAL holds `--mb` MiB of segments (records as ingest writes them);
  `WriteAheadLog.open()` called on the loop (what start-up did) vs `await open_async()`;
- **rotations**: `--rotations` segment rotations with `wal_durability = "fsync"` (create the
  next file + directory fsync), done on the loop (what `_seal_active` did) vs through the
  WAL's executor hop (`seal()`).

    python bench/wal_stall.py                  # prints markdown
    python bench/wal_stall.py --write-results  # ...and updates "## WAL loop stalls"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from common import machine_note, md_table, now_utc, replace_section

from exporter.wal import WriteAheadLog

RECORD = b'[{"request_id":"r","model":"gpt-4o","input_tokens":100}]' * 200  # ~11 KB


async def max_stall(work: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(longest loop stall in ms, wall time in s) while `work` runs."""
    worst = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await work()
    wall = time.perf_counter() - started
    stop.set()
    await task
    return worst * 1000, wall


async def build(directory: Path, mb: int) -> None:
    wal = WriteAheadLog(directory, segment_bytes=16 << 20, max_bytes=8 << 30, durability="os")
    wal.open()
    wal.start()
    for _ in range(mb * (1 << 20) // len(RECORD)):
        await wal.append(RECORD, 200)
    await wal.close()


async def scan(directory: Path, in_thread: bool) -> tuple[float, float]:
    wal = WriteAheadLog(directory, segment_bytes=16 << 20, max_bytes=8 << 30)

    async def work() -> None:
        if in_thread:
            await wal.open_async()
        else:
            wal.open()

    result = await max_stall(work)
    wal.start()
    await wal.close()
    return result


async def rotations(directory: Path, n: int, in_thread: bool) -> tuple[float, float]:
    wal = WriteAheadLog(directory, segment_bytes=1 << 30, max_bytes=8 << 30, durability="fsync")
    wal.open()
    wal.start()

    async def work() -> None:
        for _ in range(n):
            await wal.append(b"[]", 0)
            if in_thread:
                await wal.seal()
            else:  # the old way: create + directory fsync on the loop
                seg = wal._new_segment_sync()
                old = wal.active
                assert old is not None and old._fd is not None
                with contextlib.suppress(OSError):
                    os.close(old._fd)
                old._fd, old.sealed = None, True
                wal._segments.append(seg)

    result = await max_stall(work)
    await wal.close()
    return result


async def run(mb: int, n: int) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-wal-stall-") as tmp:
        directory = Path(tmp) / "wal"
        await build(directory, mb)
        for label, in_thread in (("on the loop (before)", False), ("in a thread (now)", True)):
            stall, wall = await scan(directory, in_thread)
            rows.append([f"start-up scan of {mb} MiB, {label}", f"{stall:.1f}", f"{wall:.2f}"])
    for label, in_thread in (("on the loop (before)", False), ("in a thread (now)", True)):
        with tempfile.TemporaryDirectory(prefix="bench-wal-rot-") as tmp:
            stall, wall = await rotations(Path(tmp) / "wal", n, in_thread)
        rows.append([f"{n} rotations (create + dir fsync), {label}", f"{stall:.1f}", f"{wall:.2f}"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=128)
    parser.add_argument("--rotations", type=int, default=50)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    started = now_utc()
    rows = asyncio.run(run(args.mb, args.rotations))
    text = (
        f"Run {started} with `python bench/wal_stall.py --mb {args.mb} --rotations "
        f"{args.rotations}` on {machine_note()}.\n\nLongest gap between the ticks of a 1 ms "
        "ticker task (the event-loop stall every other request would see), and the wall time "
        "of the work.\n\n" + md_table(["work", "longest loop stall (ms)", "wall time (s)"], rows)
    )
    print(text)
    if args.write_results:
        replace_section("WAL loop stalls", text)
        print("updated bench/RESULTS.md (## WAL loop stalls)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
