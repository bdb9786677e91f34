"""`serve --workers N` with the real console script: workers share one port (SO_REUSEPORT),
each keeps its own WAL and /metrics port, a worker killed under load is restarted, retries
that reach two workers are stored once, and a WAL left by a run with another N is flushed.

Every expected figure comes from the reports the test sent (tests/storecheck.py computes the
rollups); the Postgres is real (tests/pgcluster.py), the SQLite file too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from faultkit import JSON, Sender, batches_of, body, check_database, make_reports, wait_for
from helpers import (
    clean_env,
    cli_command,
    free_port,
    free_port_range,
    http,
    parse_metrics,
    total,
)
from prometheus_server import require_binary, run_prometheus

pytestmark = pytest.mark.slow


class Workers:
    """One `serve --workers N` supervisor as a subprocess in its own process group."""

    def __init__(self, tmp_path: Path, data_dir: Path, database_url: str, workers: int,
                 env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.workers = workers
        self.port = free_port()
        self.own: list[int] = []
        self.log = tmp_path / f"workers-{self.port}.log"
        args = ["serve", "--workers", str(workers), "--port", str(self.port),
                "--data-dir", str(data_dir), "--database-url", database_url]  # fmt: skip
        if workers > 1:  # consecutive free ports are not guaranteed: one base, checked free
            base = free_port_range(workers)
            self.own = [base + i for i in range(workers)]
            args += ["--worker-port", str(base)]
        full_env = {"LLM_USAGE_FLUSH_INTERVAL": "0.3", "LLM_USAGE_FLUSH_MAX_BACKOFF": "1",
                    **(env or {})}  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*cli_command(), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=clean_env(full_env),
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def own_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.own[i]}" if self.own else self.url

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 40) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"supervisor exited:\n{self.logs()}"
            try:
                return all(http("GET", f"{self.own_url(i)}/readyz", timeout=2)[0] == 200
                           for i in range(max(1, len(self.own))))  # fmt: skip
            except OSError:
                return False

        wait_for(ready, timeout, f"every worker ready; logs:\n{self.logs()}")
        time.sleep(0.3)  # each flusher's first pass runs right after its migration

    def worker_pid(self, i: int) -> int:
        return int((self.data_dir / f"worker-{i}" / "lock").read_text().strip())

    def metrics(self, i: int) -> dict[Any, float]:
        status, data, _ = http("GET", f"{self.own_url(i)}/metrics", timeout=10)
        assert status == 200
        return parse_metrics(data.decode())

    def post(self, url: str, reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        status, data, _ = http("POST", f"{url}/v1/usage", body(reports), JSON, 15)
        assert status == 202, data
        answer: dict[str, Any] = orjson.loads(data)
        return answer

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(
                f"supervisor did not drain in {timeout}s:\n{self.logs()}"
            ) from None

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every worker at once: each WAL stays as it is."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        wait_for(lambda: not _locked_dirs(self.data_dir), 10, "the workers' locks released")


def _locked_dirs(data_dir: Path) -> list[Path]:
    import fcntl

    locked = []
    for lock in [data_dir / "lock", *data_dir.glob("worker-*/lock")]:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            locked.append(lock.parent)
        finally:
            os.close(fd)
    return locked


def _wal_files(directory: Path) -> list[Path]:
    return [p for p in (directory / "wal").glob("wal-*.log") if p.stat().st_size > 0]


def _received(service: Workers, i: int) -> float:
    return total(service.metrics(i), "llm_usage_reports_received_total")


def test_two_workers_share_a_port_and_store_every_report_once_through_retries_and_a_kill(
    tmp_path: Path, pg_url: str
) -> None:
    service = Workers(tmp_path, tmp_path / "data", pg_url, 2)
    try:
        service.wait_ready()
        # 1. many connections to the shared port (one per POST): the kernel uses both workers
        spread = make_reports(400, "spread")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: service.post(service.url, b),
                                    batches_of(spread, 5)))  # fmt: skip
        assert sum(a["accepted"] for a in answers) == len(spread)
        received = [_received(service, i) for i in range(2)]
        assert sum(received) == len(spread) and min(received) > 0, received
        # what the dashboards do: a real Prometheus scrapes one target per worker and sums
        targets = [service.own_url(i).removeprefix("http://") for i in range(2)]
        with run_prometheus(tmp_path / "prom", targets) as prom:
            expr = "sum without (instance) (llm_usage_reports_received_total)"
            wait_for(lambda: [float(r["value"][1]) for r in prom.query(expr)] == [len(spread)],
                     20, f"{expr} == {len(spread)}")  # fmt: skip

        # 2. a retry (same request_ids) reaching the other worker: counted live by both,
        #    stored once
        retried = make_reports(60, "retried")
        for i, batch in enumerate(batches_of(retried, 20)):
            first, second = i % 2, 1 - i % 2
            assert service.post(service.own_url(first), batch)["accepted"] == len(batch)
            assert service.post(service.own_url(second), batch)["accepted"] == len(batch)
        after = [_received(service, i) for i in range(2)]
        assert sum(after) - sum(received) == 2 * len(retried)

        # 3. SIGKILL worker 0 while clients keep sending (and retrying what got no answer)
        sender = Sender(service.url)
        load = make_reports(1500, "killed")
        deadline = time.monotonic() + 40
        victim = service.worker_pid(0)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(sender.post_until_acked, b, deadline)
                       for b in batches_of(load, 10)]  # fmt: skip
            wait_for(lambda: len(sender.acked) >= 300, 20, "load under way")
            os.kill(victim, signal.SIGKILL)
            for f in futures:
                f.result()
        assert {r["request_id"] for r in sender.acked} == {r["request_id"] for r in load}
        wait_for(lambda: service.worker_pid(0) != victim, 20, "worker 0 restarted")
        service.wait_ready()
        logs = service.logs()
        assert f"worker 0 (pid {victim}) exited with signal SIGKILL" in logs
        for i, restarts in ((0, 1), (1, 0)):  # the failure is a self-metric too
            assert (
                service.metrics(i)[("llm_usage_worker_restarts", (("worker", str(i)),))] == restarts
            )
        assert logs.count(f"pid {victim}) exited") == 1  # logged once
    finally:
        code = service.terminate()
    assert code == 0, service.logs()
    for i in range(2):  # every worker drained its WAL into the database on SIGTERM
        assert not _wal_files(tmp_path / "data" / f"worker-{i}")
    check_database(pg_url, spread + retried + retried + sender.acked)


def test_wal_left_by_a_run_with_another_worker_count_is_flushed_at_start(
    tmp_path: Path,
) -> None:
    """3 workers → 2 (worker-2 adopted) → 1 (worker-0, worker-1 adopted) → 2 (the single
    process's own WAL adopted); each run is SIGKILLed with reports only in its WALs. SQLite:
    the workers share one file."""
    data = tmp_path / "data"
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    hold = {"LLM_USAGE_FLUSH_INTERVAL": "3600"}  # nothing leaves the WAL before the kill
    sent: list[dict[str, Any]] = []
    plan = [(3, []), (2, ["worker-2"]), (1, ["worker-0", "worker-1"]), (2, ["data"])]
    for run, (n, expect_adopted) in enumerate(plan):
        service = Workers(tmp_path, data, url, n, env=hold if run < 3 else None)
        service.wait_ready()
        for name in expect_adopted:
            assert f"/{name} holds" in service.logs(), service.logs()
            left = data if name == "data" else data / name
            assert not _wal_files(left)
        for i in range(n):
            reports = make_reports(40, f"run{run}-w{i}")
            assert service.post(service.own_url(i), reports)["accepted"] == 40
            sent += reports
        if run < 3:
            service.kill_all()
            dirs = [data] if n == 1 else [data / f"worker-{i}" for i in range(n)]
            assert all(_wal_files(d) for d in dirs)  # acknowledged, only in the WAL
        else:
            assert service.terminate() == 0, service.logs()
    check_database(url, sent)


def test_a_worker_that_cannot_start_stops_the_supervisor_with_exit_1(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    base = free_port_range(2)
    with socket.socket() as taken:  # worker 1's own port, in use by someone else
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        args = ["serve", "--workers", "2", "--port", str(free_port()), "--worker-port",
                str(base), "--data-dir", str(tmp_path / "data"), "--database-url", url]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run([*cli_command(), *args], capture_output=True, text=True,
                              env=clean_env(), timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30
    assert f"cannot listen on 127.0.0.1:{base + 1}" in done.stderr
    assert "worker 1 failed to start 5 times in a row" in done.stderr
    assert "worker 0 (pid" in done.stderr and "stopped" in done.stderr  # drained, not left

    with socket.socket() as taken:  # the shared port in use: refused before any fork
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--workers", "2", "--port", str(port),
                "--data-dir", str(tmp_path / "data2"), "--database-url", url]  # fmt: skip
        done = subprocess.run([*cli_command(), *args], capture_output=True, text=True,
                              env=clean_env(), timeout=30)  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]


def test_retries_on_both_workers_meet_in_one_sqlite_file_exactly_once(tmp_path: Path) -> None:
    """Both workers flush into the shared SQLite file at the same time (write transactions
    serialize on its lock with a busy timeout); every report sent to both is stored once."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    service = Workers(tmp_path, tmp_path / "data", url, 2, env={"LLM_USAGE_FLUSH_INTERVAL": "0.05"})
    reports = make_reports(3000, "both")
    try:
        service.wait_ready()
        batches = batches_of(reports, 50)

        def send(target: int) -> None:
            for batch in batches if target == 0 else batches[::-1]:  # the same, both ends
                service.post(service.own_url(target), batch)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        flushed = [total(service.metrics(i), "llm_usage_flushed_reports_total") for i in range(2)]
        failures = [total(service.metrics(i), "llm_usage_flush_failures_total") for i in range(2)]
    finally:
        assert service.terminate() == 0, service.logs()
    assert failures == [0, 0], service.logs()
    assert min(flushed) > 0
    check_database(url, reports)


def test_workers_of_a_killed_supervisor_drain_and_free_the_port(tmp_path: Path) -> None:
    """SIGKILL to the supervisor alone: each worker gets SIGTERM from the kernel (parent-death
    signal), flushes its WAL and exits; no orphan keeps the port or a data dir."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    service = Workers(tmp_path, tmp_path / "data", url, 2, env={"LLM_USAGE_FLUSH_INTERVAL": "3600"})
    service.wait_ready()
    sent = []
    for i in range(2):
        reports = make_reports(50, f"orphan-{i}")
        assert service.post(service.own_url(i), reports)["accepted"] == 50
        sent += reports
    pids = [service.worker_pid(i) for i in range(2)]
    service.proc.kill()
    service.proc.wait(timeout=10)
    wait_for(lambda: not _locked_dirs(tmp_path / "data"), 30, "the workers exited")
    for pid in pids:  # gone, or a zombie waiting for whoever inherited it to reap it
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "\nState:\tZ" in status.read_text()
    assert all(not _wal_files(tmp_path / "data" / f"worker-{i}") for i in range(2))
    with socket.socket() as again:  # the shared port is free again
        again.bind(("127.0.0.1", service.port))
    check_database(url, sent)


def test_documented_prometheus_config_for_workers_passes_promtool(tmp_path: Path) -> None:
    """The scrape config of docs/operations.md#several-cores-on-one-host: valid, one target
    per worker port, not the shared port."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    marker = "test_workers.py::test_documented_prometheus_config_for_workers_passes_promtool"
    block = text.split(marker, 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "prometheus.yml"
    path.write_text(block)
    done = subprocess.run([require_binary("promtool"), "check", "config", str(path)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    import yaml

    (job,) = yaml.safe_load(block)["scrape_configs"]
    targets = job["static_configs"][0]["targets"]
    assert job["job_name"] == "llm-usage-exporter"
    assert targets == ["exporter:9471", "exporter:9472"]  # port + 1 + i, the default


def test_worker_ports_follow_the_shared_port_and_never_overlap_it(tmp_path: Path) -> None:
    from exporter.config import Settings
    from exporter.errors import ConfigError
    from exporter.workers import worker_ports, worker_settings

    def settings(**kw: Any) -> Settings:
        return Settings(data_dir=tmp_path / "d", **kw)

    assert worker_ports(settings(workers=3, port=9470)) == [9471, 9472, 9473]
    assert worker_ports(settings(workers=2, port=9470, worker_port=9600)) == [9600, 9601]
    assert worker_ports(settings(workers=2, port=0)) == [0, 0]  # ephemeral, logged
    with pytest.raises(ConfigError, match="also a worker's own port"):
        worker_ports(settings(workers=3, port=9471, worker_port=9470))
    with pytest.raises(ConfigError, match="65535"):
        worker_ports(settings(workers=3, port=80, worker_port=65534))
    one = worker_settings(settings(workers=2), 1)  # its own data dir, the shared SQLite file
    assert one.data_dir == tmp_path / "d" / "worker-1" and one.workers == 1
    assert one.effective_database_url == settings().effective_database_url
