"""Connection floods against the real `serve` under a small file-descriptor limit (prlimit):
idle connections, request heads trickled byte by byte (slowloris) and bodies trickled byte
by byte, 300 at a time, re-opened as the server closes them. A gateway keeps being served,
nothing is logged per event, and the service is itself again when the flood stops."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
from faultkit import JSON, Service, body, check_database, make_reports, wait_for
from helpers import http, total, value

pytestmark = pytest.mark.slow

FD_LIMIT = 256
TIMEOUT_S = 2.0
HEAD = b"POST /v1/usage HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
BODY_HEAD = HEAD + b"Content-Length: 100000\r\n\r\n["


class Flood:
    """`per_kind` connections of each kind, each re-opened when the server closes it."""

    def __init__(self, port: int, per_kind: int) -> None:
        self.port = port
        self.per_kind = per_kind
        self.stop = threading.Event()
        self.opened = 0
        self.established = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, first: bytes) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            s.setblocking(False)
            if first:
                s.send(first)
        except OSError:
            return None
        self.opened += 1
        return s

    def _run(self) -> None:
        kinds = {"idle": b"", "head": b"P", "body": BODY_HEAD}
        socks: dict[str, list[socket.socket | None]] = {
            k: [self._open(first) for _ in range(self.per_kind)] for k, first in kinds.items()
        }
        self.established.set()
        while not self.stop.wait(0.25):
            for kind, lst in socks.items():
                for i, s in enumerate(lst):
                    if s is None or self._closed_by_server(s) or not self._trickle(kind, s):
                        if s is not None:
                            s.close()
                        lst[i] = self._open(kinds[kind])
        for lst in socks.values():
            for s in lst:
                if s is not None:
                    s.close()

    @staticmethod
    def _closed_by_server(s: socket.socket) -> bool:
        try:
            return s.recv(4096) == b""  # a 503/408 answer or EOF: the server let go
        except BlockingIOError:
            return False
        except OSError:
            return True

    @staticmethod
    def _trickle(kind: str, s: socket.socket) -> bool:
        with contextlib.suppress(BlockingIOError):
            try:
                if kind == "body":
                    s.send(b" ")
                elif kind == "head":
                    s.send(b"O")  # a request line that never ends
            except OSError:
                return False
        return True


def test_connection_floods_do_not_starve_a_gateway_and_the_service_recovers(
    tmp_path: Path,
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    service = Service(
        tmp_path / "svc", tmp_path / "data", db_url,
        env={"LLM_USAGE_HTTP_KEEPALIVE_TIMEOUT": str(TIMEOUT_S),
             "LLM_USAGE_HTTP_BODY_TIMEOUT": str(TIMEOUT_S)},
        wrap=["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"],
    )  # fmt: skip
    service.start()
    acked: list[dict[str, object]] = []
    try:
        service.wait_ready()
        m = service.metrics()
        # exporter/server.py's reserve: max(64, 10%) plus the accept backlog (1/8, 16..128)
        backlog = max(16, min(128, FD_LIMIT // 8))
        expected_cap = FD_LIMIT - max(64, FD_LIMIT // 10) - backlog
        assert value(m, "llm_usage_http_connection_limit") == expected_cap

        flood = Flood(service.port, per_kind=100)  # 300 connections at a time > the cap
        flood.thread.start()
        assert flood.established.wait(30)
        wait_for(lambda: value(service.metrics(), "llm_usage_http_connections") >= expected_cap - 2,
                 10, "the flood to reach the connection cap")  # fmt: skip
        reports = make_reports(3000, "flood")
        latencies: list[float] = []
        flood_until = time.monotonic() + 3 * TIMEOUT_S
        i = 0
        while (time.monotonic() < flood_until or i == 0) and i * 10 < len(reports):
            batch = reports[i * 10 : (i + 1) * 10]
            started = time.monotonic()
            while True:  # a gateway: retry on 503 / reset until acknowledged
                try:
                    status, _, _ = http("POST", f"{service.url}/v1/usage", body(batch), JSON, 10)
                except OSError:
                    status = 0
                if status == 202:
                    break
                assert status in (0, 503), status
                time.sleep(0.05)
            latencies.append(time.monotonic() - started)
            acked.extend(batch)
            i += 1
            time.sleep(0.05)
        during = service.metrics()
        flood.stop.set()
        flood.thread.join(timeout=10)
        assert flood.opened > 300, "the server closed flood connections and they came back"
        assert len(acked) >= 50
        assert max(latencies) < 2 * TIMEOUT_S + 2, latencies
        closed = {r: total(during, "llm_usage_http_connections_closed_total", reason=r)
                  for r in ("evicted_idle", "body_timeout")}  # fmt: skip
        assert closed["evicted_idle"] > 0 and closed["body_timeout"] > 0, closed
        assert total(during, "llm_usage_client_disconnects_total") > 0
        # one accept burst (the backlog) may land before the cap is seen: the reserve covers it
        assert value(during, "llm_usage_http_connections") <= expected_cap + backlog

        # the flood is gone: connections drain and requests are fast again
        wait_for(lambda: value(service.metrics(), "llm_usage_http_connections") <= 2,
                 3 * TIMEOUT_S, "the flood's connections to close")  # fmt: skip
        started = time.monotonic()
        more = make_reports(10, "after-flood")
        assert service.post(more)[0] == 202
        acked.extend(more)
        assert time.monotonic() - started < 1.0
    finally:
        assert service.stop() == 0, service.logs()[-3000:]
    logs = service.logs()
    for bad in ("Traceback", "unhandled error", "Too many open files", "Error handling request"):
        assert bad not in logs, bad
    check_database(db_url, acked)
