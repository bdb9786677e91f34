"""WAL left by a run with another `--workers`: flushed to the store before the service starts.

`serve --workers N` keeps one WAL per worker in `<data_dir>/worker-<i>`; `serve` with one
worker keeps it in `<data_dir>` itself. Changing N would otherwise leave acknowledged reports
in directories nobody replays: `<data_dir>/worker-<j>` for j ≥ N after scaling down, or
`<data_dir>/wal` after going from 1 to N > 1. Each such directory is locked (a process still
running on it is refused, naming its pid), its segments are flushed with the service's own
Flusher (the same exactly-once transaction; a retry that also reached the store is a
duplicate there), and only committed segments are deleted. If the store cannot take them the
service refuses to start, loudly; the segments stay where they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from exporter.config import Settings
from exporter.errors import StartupError, one_line
from exporter.flusher import Flusher
from exporter.selfmetrics import SelfMetrics
from exporter.server import DataDirLock, DataDirLocked
from exporter.startup import open_store, run_migrations
from exporter.store.errors import describe_error
from exporter.wal import WriteAheadLog

__all__ = ["WORKER_DIR_PREFIX", "flush_leftovers", "leftover_dirs", "worker_dir"]

log = logging.getLogger(__name__)

WORKER_DIR_PREFIX = "worker-"


def worker_dir(data_dir: Path, index: int) -> Path:
    return data_dir / f"{WORKER_DIR_PREFIX}{index}"


def _has_wal(directory: Path) -> bool:
    wal = directory / "wal"
    return wal.is_dir() and any(p.stat().st_size > 0 for p in wal.glob("wal-*.log"))


def leftover_dirs(data_dir: Path, workers: int) -> list[Path]:
    """Directories under `data_dir` holding WAL segments that a run with `workers` workers
    would not replay: `data_dir` itself when workers > 1, `worker-<j>` for j ≥ workers (all
    of them when workers == 1)."""
    found = [data_dir] if workers > 1 and _has_wal(data_dir) else []
    indexed: list[tuple[int, Path]] = []
    for path in data_dir.glob(f"{WORKER_DIR_PREFIX}*"):
        suffix = path.name[len(WORKER_DIR_PREFIX) :]
        if suffix.isdigit() and (workers == 1 or int(suffix) >= workers) and _has_wal(path):
            indexed.append((int(suffix), path))
    return found + [path for _i, path in sorted(indexed)]


async def _flush_dir(settings: Settings, directory: Path) -> int:
    """Flush the WAL of `directory` into the database of `settings`; returns reports."""
    store = open_store(settings)
    try:
        if settings.auto_migrate:
            await run_migrations(store)
        wal = WriteAheadLog(
            directory / "wal",
            segment_bytes=settings.wal_segment_bytes,
            max_bytes=settings.wal_max_bytes,
            durability=settings.wal_durability,
        )
        await wal.open_async()
        wal.start()
        try:
            pending = wal.pending_reports
            log.warning(
                "%s holds %d unflushed report(s) from a run with a different number of "
                "workers; flushing them before start",
                directory,
                pending,
                extra={"event": "leftover_wal", "event_key": ("leftover_wal", str(directory))},
            )
            flusher = Flusher(wal, store.writer, SelfMetrics(), settings)
            try:
                await flusher.flush_once()
            except Exception as exc:
                raise StartupError(
                    f"cannot flush the {wal.pending_reports} report(s) left in {directory} by "
                    f"a run with a different number of workers ({describe_error(exc, 200)}); "
                    "they stay there: start again once the database takes writes"
                ) from None
            return pending
        finally:
            await wal.close()
    finally:
        await store.close()


def flush_leftovers(settings: Settings, dirs: Sequence[Path], *, held: Path | None = None) -> int:
    """Flush every directory of `dirs` (blocking; before any event loop of the service runs).

    `settings.database_url` must already name the shared database. Each directory is locked
    first, except `held`, whose lock the caller holds already. Returns the reports flushed.
    """
    total = 0
    for directory in dirs:
        lock = None if directory == held else DataDirLock(directory)
        try:
            if lock is not None:
                lock.acquire()
        except DataDirLocked as exc:
            raise StartupError(
                f"{one_line(exc)}: it holds reports from a run with a different number of "
                "workers, which must be flushed before this one starts"
            ) from None
        try:
            total += asyncio.run(_flush_dir(settings, directory))
        finally:
            if lock is not None:
                lock.release()
        log.info("flushed the WAL left in %s", directory)
    return total
