"""On-disk spool: batches not yet acknowledged by the service survive a process restart.

Each batch is written (NDJSON, fsynced, renamed into place) before it is sent and removed
once the service answered for it; at start-up the files left by an earlier process are sent
first. Re-sending is safe because every report keeps its `request_id`: the service counts it
once. One process per spool directory (flock), so two processes never send one file twice.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["Spool", "SpoolLocked"]


class SpoolLocked(RuntimeError):
    pass


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool {self.directory} is used by another process") from None
        self._seq = 0

    def write(self, batch: list[dict[str, Any]]) -> Path:
        self._seq += 1
        final = self.directory / f"{os.getpid()}-{os.urandom(4).hex()}-{self._seq:09d}.ndjson"
        tmp = final.with_suffix(".tmp")
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in batch)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return final

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    def pending(self) -> list[tuple[Path, list[dict[str, Any]]]]:
        """Batches an earlier process left behind, oldest first (torn temp files are dropped:
        they were never sent, and their reports are still in that process's memory or lost
        with it before any acknowledgement)."""
        found = []
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in sorted(self.directory.glob("*.ndjson"), key=lambda p: p.stat().st_mtime_ns):
            lines = path.read_bytes().splitlines()
            found.append((path, [json.loads(line) for line in lines if line.strip()]))
        return found

    def close(self) -> None:
        os.close(self._lock_fd)
