"""Fault injection with the REAL service (the installed CLI, a subprocess) on a real Postgres.

- crash: SIGKILL at random moments under load, restart, clients retry what was not
  acknowledged (same request_ids) and re-send some that were: nothing lost, nothing doubled;
- outage: Postgres stopped for 30 s under load: ingest keeps answering 202, memory stays flat,
  everything is flushed exactly once when it returns; a small WAL cap answers 503 +
  Retry-After instead of accepting what it cannot keep;
- replicas: two services on one database, overlapping retried reports: exact, no deadlocks.

The database is checked against the reports *sent*, computed independently (storecheck).
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import free_port, http, parse_metrics, start_service, total
from pgcluster import PgCluster, start_cluster
from storecheck import assert_stored_exactly, report

from exporter.store import Store

pytestmark = pytest.mark.slow

INPUT_FIELDS = ("request_id", "model", "provider", "operation", "user", "team", "api_key_id",
                "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens",
                "status", "completed_at", "duration_ms", "cost_usd")  # fmt: skip


def make_reports(n: int, prefix: str) -> list[dict[str, Any]]:
    """WAL-form reports (what the DB must end up holding) with unique ids for this test,
    spread over hours and days but inside the service's dedupe window (max_report_age)."""
    now = datetime.now(UTC)
    return [
        report(i, request_id=f"{prefix}-{i:06d}",
               completed_at=now - timedelta(seconds=(17 * 60 * i) % (300 * 86400)))
        for i in range(n)
    ]  # fmt: skip


def body(reports: Sequence[Mapping[str, Any]]) -> bytes:
    """The HTTP request a client sends for these reports (canonical shape)."""
    return orjson.dumps([{k: r[k] for k in INPUT_FIELDS} for r in reports])


def batches_of(reports: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [list(reports[i : i + size]) for i in range(0, len(reports), size)]


# -- the service under test ------------------------------------------------------------------


@dataclass
class Service:
    """One exporter process that can be killed and restarted on the same data dir."""

    workdir: Path
    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    starts: int = 0
    proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = {
            "LLM_USAGE_FLUSH_INTERVAL": "0.3",
            "LLM_USAGE_FLUSH_MAX_BACKOFF": "1",
            "LLM_USAGE_WAL_SEGMENT_BYTES": str(256 * 1024),
            **self.env,
        }
        args = ["serve", "--port", str(self.port), "--data-dir", str(self.workdir / "data")]
        self.proc = start_service(
            [*args, "--database-url", self.database_url],
            self.workdir / f"service-{self.starts}.log",
            port=self.port,
            env=env,
            timeout=60,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.stop(signal.SIGKILL)

    def stop(self) -> int:
        assert self.proc is not None
        code: int = self.proc.stop(signal.SIGTERM, timeout=60)
        return code

    def logs(self) -> str:
        return "\n".join(
            (self.workdir / f"service-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
        )

    def metrics(self) -> dict[Any, float]:
        status, data, _ = http("GET", f"{self.url}/metrics", timeout=10)
        assert status == 200
        return parse_metrics(data.decode())

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def wait_flushed(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        pending = -1.0
        while time.monotonic() < deadline:
            pending = total(self.metrics(), "llm_usage_pending_reports")
            if pending == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"{pending} report(s) still pending; logs:\n{self.logs()[-5000:]}")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    """Services created by a test; whatever is still running at the end is killed."""
    created: list[Service] = []
    yield created
    for s in created:
        if s.proc is not None and s.proc.proc.poll() is None:
            s.proc.proc.kill()
            s.proc.proc.wait()


class Sender:
    """Clients that retry each batch (same request_ids) until it is acknowledged with 202."""

    def __init__(self, targets: Sequence[Service], workers: int = 4) -> None:
        self.targets = targets
        self.workers = workers
        self.acked = 0
        self.statuses: list[int] = []
        self.retry_after: list[str] = []
        self._lock = threading.Lock()

    def post_until_acked(self, batch: Sequence[Mapping[str, Any]], target: int = 0) -> None:
        data = body(batch)
        headers = {"Content-Type": "application/json"}
        while True:
            service = self.targets[target]
            try:
                status, _, resp_headers = http(
                    "POST", f"{service.url}/v1/usage", data, headers, timeout=15
                )
            except OSError:  # down or killed mid-request: not acknowledged, send again
                time.sleep(0.05)
                continue
            with self._lock:
                self.statuses.append(status)
                if status == 503:
                    self.retry_after.append(resp_headers.get("Retry-After", ""))
            if status == 202:
                with self._lock:
                    self.acked += 1
                return
            time.sleep(0.05)

    def send_all(self, jobs: Sequence[tuple[Sequence[Mapping[str, Any]], int]]) -> None:
        with ThreadPoolExecutor(self.workers) as pool:
            for f in [pool.submit(self.post_until_acked, b, t) for b, t in jobs]:
                f.result()


async def check_database(url: str, reports: Sequence[Mapping[str, Any]]) -> None:
    store = Store.from_url(url)
    try:
        await assert_stored_exactly(store, reports)
    finally:
        await store.close()


def no_server_errors(statuses: Sequence[int], allowed: Sequence[int] = ()) -> None:
    bad = sorted({s for s in statuses if s >= 500 and s not in allowed})
    assert not bad, f"server errors: {bad}"


# -- crash -----------------------------------------------------------------------------------


def test_sigkill_under_load_loses_nothing_and_doubles_nothing(
    tmp_path: Path, pg_url: str, services: list[Service]
) -> None:
    rnd = random.Random(20260301)
    reports = make_reports(24_000, "crash")
    batches = batches_of(reports, 100)
    resent = rnd.sample(batches, 30)  # clients that re-send acknowledged batches too
    jobs = [(b, 0) for b in batches + resent]
    service = Service(tmp_path, pg_url, env={"LLM_USAGE_FLUSH_MAX_REPORTS": "3000"})
    services.append(service)
    service.start()
    sender = Sender([service], workers=4)
    thread = threading.Thread(target=sender.send_all, args=(jobs,))
    thread.start()
    kills = 0
    for fraction in (0.1, 0.2, 0.35, 0.5, 0.6, 0.75, 0.9):
        while thread.is_alive() and sender.acked < fraction * len(jobs):
            time.sleep(0.01)
        time.sleep(rnd.uniform(0, 1.5))  # a random moment: mid-request, mid-flush, idle
        service.kill()
        kills += 1
        service.start()
    thread.join(timeout=300)
    assert not thread.is_alive()
    service.kill()  # once more, right after the last acknowledgement
    kills += 1
    service.start()
    service.wait_flushed()
    assert service.stop() == 0
    assert kills >= 3
    no_server_errors(sender.statuses)
    asyncio.run(check_database(pg_url, reports))
    assert "Traceback" not in service.logs()


# -- outage ----------------------------------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A cluster this test may stop and start without disturbing the others."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_database_outage_under_load(
    tmp_path: Path, own_cluster: PgCluster, services: list[Service]
) -> None:
    url = own_cluster.url(own_cluster.create_database())
    reports = make_reports(92_000, "outage")
    warmup, during = reports[:2_000], reports[2_000:]
    service = Service(tmp_path / "a", url, env={"LLM_USAGE_FLUSH_MAX_REPORTS": "2000"})
    # a second replica with a tiny WAL cap: it must push back instead of accepting
    small = Service(tmp_path / "b", url, env={"LLM_USAGE_WAL_MAX_BYTES": "60000"})
    services += [service, small]
    service.start()
    small.start()
    sender = Sender([service, small], workers=4)
    sender.send_all([(b, 0) for b in batches_of(warmup, 200)])
    service.wait_flushed()
    rss_before = service.rss_bytes()

    own_cluster.stop()
    outage_started = time.monotonic()
    rss_max = rss_before
    batches = batches_of(during, 200)
    for i in range(0, len(batches), 8):  # ~30 s of steady load
        sender.send_all([(b, 0) for b in batches[i : i + 8]])
        rss_max = max(rss_max, service.rss_bytes())
        time.sleep(max(0.0, outage_started + 30 * (i + 8) / len(batches) - time.monotonic()))
    assert time.monotonic() - outage_started >= 29
    assert set(sender.statuses) == {202}, "ingest answers 202 while the WAL holds"
    during_outage = service.metrics()
    assert total(during_outage, "llm_usage_pending_reports") == len(during)
    assert total(during_outage, "llm_usage_flush_failures_total") >= 3
    wal_bytes = total(during_outage, "llm_usage_wal_bytes")
    status, _, _ = http("GET", f"{service.url}/readyz", timeout=10)
    assert status == 503
    # memory stays flat while the backlog grows on disk
    mb = 1e6
    print(f"outage: RSS {rss_before / mb:.1f} → {rss_max / mb:.1f} MB, WAL {wal_bytes / mb:.1f} MB")
    assert wal_bytes > 45e6
    assert rss_max - rss_before < 40e6, (rss_before, rss_max, wal_bytes)

    # the small replica fills its WAL and answers 503 + Retry-After, never a silent drop
    extra = make_reports(400, "small")
    small_sender = Sender([small], workers=1)
    refused: list[list[dict[str, Any]]] = []
    accepted: list[dict[str, Any]] = []
    for b in batches_of(extra, 50):
        status, _, headers = http("POST", f"{small.url}/v1/usage", body(b),
                                  {"Content-Type": "application/json"}, timeout=15)  # fmt: skip
        assert status in (202, 503), status
        if status == 503:
            assert int(headers["Retry-After"]) > 0
            refused.append(b)
        else:
            accepted.extend(b)
    assert refused, "a full WAL must push back"

    own_cluster.start()
    service.wait_flushed()
    small.wait_flushed()
    # after the drain the small replica accepts again: the refused reports are retried
    small_sender.send_all([(b, 0) for b in refused])
    small.wait_flushed()
    assert service.stop() == 0
    assert small.stop() == 0
    asyncio.run(check_database(url, reports + accepted + [r for b in refused for r in b]))
    logs = service.logs()
    assert logs.count("flush failed") == 1, "one outage, logged once"
    assert "flush recovered" in logs
    assert "Traceback" not in logs


# -- replicas --------------------------------------------------------------------------------


def test_two_replicas_overlapping_retries_are_exact(
    tmp_path: Path, pg_cluster: PgCluster, pg_url: str, services: list[Service]
) -> None:
    rnd = random.Random(7)
    reports = make_reports(30_000, "replica")
    a = Service(tmp_path / "a", pg_url, env={"LLM_USAGE_FLUSH_INTERVAL": "0.2"})
    b = Service(tmp_path / "b", pg_url, env={"LLM_USAGE_FLUSH_INTERVAL": "0.2"})
    services += [a, b]
    # started together: both run the migrations at once (serialized by an advisory lock)
    starters = [threading.Thread(target=s.start) for s in (a, b)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    order_a = reports[:]
    rnd.shuffle(order_a)
    order_b = rnd.sample(reports, 20_000)  # the same reports, other batches, other order
    jobs = [(x, 0) for x in batches_of(order_a, 100)] + [(x, 1) for x in batches_of(order_b, 37)]
    rnd.shuffle(jobs)
    sender = Sender([a, b], workers=6)
    sender.send_all(jobs)
    a.wait_flushed()
    b.wait_flushed()
    assert a.stop() == 0
    assert b.stop() == 0
    no_server_errors(sender.statuses)
    asyncio.run(check_database(pg_url, reports))
    assert "deadlock" not in pg_cluster.server_log().lower()
    for s in (a, b):
        logs = s.logs().lower()
        assert "deadlock" not in logs
        assert "flush failed" not in logs
        assert "traceback" not in logs
