"""Shared parts of the fault tests (tests/test_faults_*.py): a real tmpfs, reports, a
retrying client, the service as a subprocess, and the database check.

Nothing is simulated: the disk really fills (ENOSPC) or runs out of inodes, the process is
really killed, connections are real sockets. Each test ends with the database compared to
the distinct set of acknowledged reports (tests/storecheck.py computes the expected rollups).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import storequeries as queries
from helpers import free_port, http, parse_metrics, start_service
from storecheck import assert_stored_exactly, expected_rollups
from storecheck import report as stored_report

from exporter.store import Store

INPUT_FIELDS = ("request_id", "model", "provider", "operation", "user", "team", "api_key_id",
                "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens",
                "status", "completed_at", "duration_ms", "cost_usd")  # fmt: skip
JSON = {"Content-Type": "application/json"}


def make_reports(n: int, prefix: str, *, age: timedelta = timedelta(0)) -> list[dict[str, Any]]:
    """WAL-form reports (what the database must end up holding), completed recently (the
    dedupe window is relative to the wall clock), unique ids for this test."""
    now = datetime.now(UTC) - age
    return [
        stored_report(i, request_id=f"{prefix}-{i:06d}", completed_at=now - timedelta(seconds=i))
        for i in range(n)
    ]


def body(reports: Sequence[Mapping[str, Any]]) -> bytes:
    return orjson.dumps([{k: r[k] for k in INPUT_FIELDS} for r in reports])


def batches_of(reports: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [list(reports[i : i + size]) for i in range(0, len(reports), size)]


# -- a real small filesystem -----------------------------------------------------------------


@dataclass
class Tmpfs:
    path: Path

    def fill(self, leave: int = 0) -> Path:
        """Write a filler file until at most `leave` bytes are free (ENOSPC is the stop)."""
        filler = self.path / f"filler-{time.monotonic_ns()}"
        with filler.open("wb", buffering=0) as f:
            for size in (1 << 20, 1 << 16, 1 << 12):
                chunk = b"\0" * size
                while self.free() >= leave + size:
                    try:
                        f.write(chunk)
                    except OSError:
                        break
        return filler

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def use_up_inodes(self) -> list[Path]:
        """Create empty files until the filesystem refuses another (ENOSPC on create)."""
        made: list[Path] = []
        for i in range(100_000):
            p = self.path / f"inode-{i}"
            try:
                p.touch()
            except OSError:
                return made
            made.append(p)
        raise AssertionError("the inode limit was never reached")


def mount_tmpfs(path: Path, options: str) -> Iterator[Tmpfs]:
    """A real tmpfs (we run as root); fails loudly when mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} (root needed): {done.stderr.strip()}")
    try:
        yield Tmpfs(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- the service -------------------------------------------------------------------------------


@dataclass
class Service:
    """One `llm-usage-exporter serve` that can be killed and restarted on the same data dir."""

    workdir: Path
    data_dir: Path
    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    wrap: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    starts: int = 0
    proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = {"LLM_USAGE_FLUSH_INTERVAL": "0.3", "LLM_USAGE_FLUSH_MAX_BACKOFF": "1", **self.env}
        args = ["serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--database-url", self.database_url]  # fmt: skip
        self.proc = start_service(args, self.workdir / f"service-{self.starts}.log",
                                  port=self.port, env=env, timeout=60, wrap=self.wrap)  # fmt: skip

    def wait_ready(self, timeout: float = 30) -> None:
        """/readyz 200: migrated, and the flusher's start-up replay has run."""
        wait_for(lambda: http("GET", f"{self.url}/readyz")[0] == 200, timeout, "/readyz 200")
        time.sleep(0.3)  # the flusher's first pass runs right after the migration

    def stop(self) -> int:
        code: int = self.proc.stop(timeout=60)
        return code

    def logs(self) -> str:
        return "\n".join((self.workdir / f"service-{i}.log").read_text(errors="replace")
                         for i in range(1, self.starts + 1))  # fmt: skip

    def metrics(self) -> dict[Any, float]:
        status, data, _ = http("GET", f"{self.url}/metrics", timeout=10)
        assert status == 200
        return parse_metrics(data.decode())

    def post(self, reports: Sequence[Mapping[str, Any]], timeout: float = 15) -> tuple[int, Any]:
        status, data, _ = http("POST", f"{self.url}/v1/usage", body(reports), JSON, timeout)
        return status, orjson.loads(data) if data else None


class Sender:
    """Clients that retry each batch (same request_ids) until it is answered 202."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.retry_after: set[str] = set()
        self._lock = threading.Lock()

    def post_until_acked(self, batch: Sequence[dict[str, Any]], deadline: float) -> None:
        data = body(batch)
        while time.monotonic() < deadline:
            try:
                status, _, headers = http("POST", f"{self.url}/v1/usage", data, JSON, 15)
            except OSError:
                time.sleep(0.05)
                continue
            with self._lock:
                self.statuses.append(status)
                if status == 503:
                    self.retry_after.add(headers.get("Retry-After", ""))
            if status == 202:
                with self._lock:
                    self.acked.extend(batch)
                return
            time.sleep(0.05)
        raise AssertionError("a batch was never acknowledged")


async def _check(url: str, reports: Sequence[Mapping[str, Any]]) -> None:
    store = Store.from_url(url)
    try:
        try:
            await assert_stored_exactly(store, reports)
        except AssertionError:
            got = await queries.rollup_rows(store.engine)
            want = expected_rollups(reports)
            ids = sorted(await queries.request_ids(store.engine))
            diff = {
                k: (got.get(k), want.get(k))
                for k in set(got) | set(want)
                if k not in got or k not in want or got[k].exact() != want[k].exact()
            }
            raise AssertionError(f"{len(ids)} stored ids; rollup differences: {diff}") from None
    finally:
        await store.close()


def check_database(url: str, acknowledged: Sequence[Mapping[str, Any]]) -> None:
    """The database holds exactly the distinct acknowledged reports, rollups included."""
    asyncio.run(_check(url, acknowledged))


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
