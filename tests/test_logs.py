"""The service log, from a real `llm-usage-exporter serve` subprocess: no bearer token reaches it
(nor the WAL, the database, /metrics or the 400 answer to a malformed request) at any level in
either format, floods of malformed requests write a bounded number of lines, and timestamps are
UTC whatever `TZ` says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import (
    ServiceProcess,
    clean_env,
    cli_command,
    free_port,
    http,
    parse_metrics,
    report,
    start_service,
    value,
)

from exporter.logevents import DEFAULT_INTERVAL

#: configured, with every scope: the admin token that leaked through a query string
ADMIN = "adm-Zq7W3xK9pL2mN8vB4cR6tY1u"
#: never configured: what a client of another deployment might send
FOREIGN = "fgn-Hh5Jj6Kk7Ll8Mm9Nn0Pp1Qq2"
SECRETS = (ADMIN, FOREIGN)


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for svc in started:
        if svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def serve(
    tmp_path: Path, services: list[ServiceProcess], *extra: str, wait: bool = True
) -> ServiceProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tokens = [{"name": "ops", "token": ADMIN, "scopes": ["ingest", "read", "admin"]}]
    svc = start_service(
        ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), *extra],
        tmp_path / "service.log",
        port=port,
        env={"LLM_USAGE_TOKENS": json.dumps(tokens), "TZ": "Asia/Tokyo"},
        wait=wait,
    )
    services.append(svc)
    return svc


def wait_healthy(svc: ServiceProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert svc.proc.poll() is None, svc.logs()
        try:
            if http("GET", f"{svc.url}/healthz", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not healthy within {timeout}s:\n{svc.logs()}")


def raw_request(port: int, data: bytes) -> bytes:
    """Bytes no HTTP client library would send; returns the start of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def hostile_requests(svc: ServiceProcess) -> None:
    """Every way a token reaches us in a malformed request: a header line with a bad byte, a
    query string with one, an over-long header, an unknown or wrong token, a bad body."""
    for token in SECRETS:
        t = token.encode()
        for data in (
            b"GET /v1/budgets?token=" + t + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + t + b"\x01\r\n\r\n",
            b"POST /v1/usage?key=" + t + b" HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + t
            + b"\x7f\r\n\r\n",
            b"GET /?password=" + t + b" HTTP/1.1\r\nCookie: s=" + t + b"a" * 9000 + b"\r\n\r\n",
            b"GET /v1/budgets HTTP/1.1\r\nAuthorization: Bearer " + t + b"\r\nContent-Length: x"
            + b"\r\n\r\n",
            b"G\x01T /v1/budgets?token=" + t + b" HTTP/1.1\r\n\r\n",
        ):  # fmt: skip
            answer = raw_request(svc.port, data)
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
            # the answer names the parser's reason and echoes no byte of the request back
            assert t not in answer and b"400 Bad Request: " in answer, answer
        auth = {"Authorization": f"Bearer {token}"}
        status, _, _ = http("GET", f"{svc.url}/v1/budgets?token={token}")
        assert status == 401
        status, _, _ = http("POST", f"{svc.url}/v1/usage?key={token}", b"{bad", auth)
        assert status == (400 if token == ADMIN else 401)
        body = json.dumps({"model": 5, "authorization": f"Bearer {token}"}).encode()
        status, _, _ = http(
            "POST",
            f"{svc.url}/v1/usage?access_token={token}",
            body,
            {**auth, "Content-Type": "application/json"},
        )
        assert status in (401, 422)
        status, _, _ = http("GET", f"{svc.url}/nowhere/{token}?password={token}")
        assert status in (401, 404)


LEVELS = ("debug", "info", "warning", "error")


def test_tokens_in_malformed_requests_reach_no_log_wal_database_or_metrics_and_stamps_are_utc(
    tmp_path: Path, services: list[ServiceProcess]
) -> None:
    """Every level in both formats, under TZ=Asia/Tokyo; the eight services start together
    (start-up dominates)."""
    runs = {
        (fmt, level): serve(
            tmp_path / f"{fmt}-{level}",
            services,
            "--log-format",
            fmt,
            "--log-level",
            level,
            wait=False,
        )
        for fmt in ("text", "json")
        for level in LEVELS
    }
    scrapes = {}
    for key, svc in runs.items():
        wait_healthy(svc)
        scrapes[key] = send_hostile_requests(svc)
    for svc in runs.values():
        svc.proc.send_signal(signal.SIGTERM)  # stop together too: SIGTERM flushes the WAL
    for (fmt, level), svc in runs.items():
        assert svc.proc.wait(timeout=60) == 0, svc.logs()[-3000:]
        check_no_token_leaks(tmp_path / f"{fmt}-{level}", svc, scrapes[fmt, level], fmt, level)


def send_hostile_requests(svc: ServiceProcess) -> bytes:
    """One good report (so the WAL and database hold something), the hostile requests; returns
    a scrape of /metrics."""
    good = report(request_id="kept-1", model="m", user="ann", input_tokens=3, output_tokens=1)
    status, _, _ = http(
        "POST",
        f"{svc.url}/v1/usage",
        json.dumps(good).encode(),
        {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    assert status == 202
    hostile_requests(svc)
    status, scrape, _ = http("GET", f"{svc.url}/metrics")
    assert status == 200
    return scrape


def check_no_token_leaks(
    tmp_path: Path, svc: ServiceProcess, scrape: bytes, fmt: str, level: str
) -> None:
    where = f"{fmt} logs at {level}"
    logs = svc.logs()
    assert "listening on" in logs or level in ("warning", "error"), where
    stored = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in stored), stored
    assert b"kept-1" in b"".join(p.read_bytes() for p in stored)  # the good report is there
    for secret in SECRETS:
        assert secret not in logs, (where, logs)
        assert secret.encode() not in scrape, where
        for p in stored:
            assert secret.encode() not in p.read_bytes(), (where, p)
    if level in ("debug", "info", "warning"):
        # the parser errors are logged, as our line, not aiohttp's traceback
        assert "malformed_request" in logs, (where, logs)
        assert "Traceback" not in logs and "Error handling request" not in logs, where
    if level in ("debug", "info", "warning"):
        first = next(line for line in logs.splitlines() if "malformed_request" in line)
        if fmt == "json":  # the parser's line, as our fields: never the query or the raw bytes
            event = json.loads(first)
            assert event["level"] == "warning", where
            assert {k: event[k] for k in ("method", "path", "peer", "reason")} == {
                "method": "GET",
                "path": "/v1/budgets",
                "peer": "127.0.0.1",
                "reason": "InvalidURLError: Invalid char in url query",
            }, where
        else:
            assert first.endswith(
                "malformed_request: GET /v1/budgets from 127.0.0.1: "
                "InvalidURLError: Invalid char in url query"
            ), where
    assert logs or level == "error", where  # an error-level run may have nothing to say
    check_utc_timestamps(logs, fmt, where)


def check_utc_timestamps(logs: str, fmt: str, where: str) -> None:
    """The services ran under TZ=Asia/Tokyo: every stamp is UTC, offset and milliseconds."""
    stamps = []
    for line in logs.splitlines():
        if fmt == "json":
            stamps.append(json.loads(line)["ts"])
        elif re.match(r"\d{4}-", line):  # text: tracebacks continue on their own lines
            stamps.append(line.split(" ", 1)[0])
    now = datetime.now(UTC)
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", stamp), (where, stamp)
        assert timedelta(0) <= now - datetime.fromisoformat(stamp) < timedelta(minutes=10), stamp


async def flood(port: int, n: int) -> dict[str, int]:
    """`n` malformed requests over loopback, four kinds in equal parts: header lines with a bad
    byte (one connection each: the parser closes it), and unknown tokens, bad bodies and
    unknown paths pipelined 50 to a keep-alive connection. Returns the 4xx answers per kind."""
    t = FOREIGN.encode()
    requests = {
        "malformed_request": (b"GET / HTTP/1.1\r\nAuthorization: Bearer " + t + b"\x01\r\n\r\n", 1),
        "unauthorized": (b"GET /v1/budgets?token=" + t + b" HTTP/1.1\r\nHost: x\r\n\r\n", 50),
        "bad_body": (
            b"POST /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n{",
            50,
        ),
        "http_error": (b"GET /missing?key=" + t + b" HTTP/1.1\r\nHost: x\r\n\r\n", 50),
    }  # fmt: skip
    expected = {"malformed_request": b" 400 ", "unauthorized": b" 401 ", "bad_body": b" 400 ",
                "http_error": b" 404 "}  # fmt: skip
    answered = dict.fromkeys(requests, 0)
    gate = asyncio.Semaphore(16)

    async def connection(kind: str, count: int) -> None:
        data, _ = requests[kind]
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data * count)
            seen = b""
            while seen.count(b"HTTP/1.") < count:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    break
                seen += chunk
            writer.close()
        answered[kind] += len(re.findall(rb"HTTP/1\.[01]" + expected[kind], seen))

    jobs = []
    for kind, (_, per_connection) in requests.items():
        share = n // len(requests)
        jobs += [connection(kind, per_connection) for _ in range(share // per_connection)]
    await asyncio.gather(*jobs)
    return answered


def test_ten_thousand_malformed_requests_write_a_bounded_number_of_lines(
    tmp_path: Path, services: list[ServiceProcess]
) -> None:
    svc = serve(tmp_path, services)
    time.sleep(0.5)  # migration logged
    before = len(svc.logs().splitlines())
    started = time.monotonic()
    sent = asyncio.run(flood(svc.port, 10_000))
    elapsed = time.monotonic() - started
    assert sum(sent.values()) == 10_000, sent
    _, scrape, _ = http("GET", f"{svc.url}/metrics")
    m = parse_metrics(scrape.decode())
    for event, n in sent.items():  # every refused request is one event: logged or suppressed
        logged = value(m, "llm_usage_log_events_total", event=event)
        suppressed = value(m, "llm_usage_log_suppressed_total", event=event)
        assert logged + suppressed == n, (event, logged, suppressed)
        assert 1 <= logged <= 1 + elapsed // DEFAULT_INTERVAL
    assert svc.stop() == 0
    lines = svc.logs().splitlines()
    # the documented bound: per event class, one line per interval plus one summary at exit
    bound = len(sent) * (2 + int(elapsed // DEFAULT_INTERVAL))
    flood_lines = [  # every warning, and the info lines of the flood (not start/stop lines)
        line for line in lines[before:] if " INFO " not in line or any(k in line for k in sent)
    ]
    assert len(flood_lines) <= bound, "\n".join(flood_lines)
    assert FOREIGN not in "\n".join(lines) and ADMIN not in "\n".join(lines)
    summaries = [line for line in lines if "similar line(s) suppressed" in line]
    assert len(summaries) == len(sent)


def test_file_descriptor_exhaustion_writes_a_bounded_number_of_lines(tmp_path: Path) -> None:
    """With 60 file descriptors and 150 clients (running out once wrote 192 MB of accept()
    tracebacks in 4 minutes): whatever fails is counted, one line per class is written."""
    import resource
    import subprocess

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (60, 60))

    port = free_port()
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*cli_command(), "serve", "--port", str(port), "--data-dir", str(tmp_path / "d")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            preexec_fn=few_fds,
        )
    svc = ServiceProcess(proc, "127.0.0.1", port, log_path)
    try:
        wait_healthy(svc)
        clients = []
        for _ in range(150):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # keep the held connections busy
            for c in clients[:20]:
                with contextlib.suppress(OSError):
                    c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.05)
        for c in clients:
            c.close()
        time.sleep(1.5)  # asyncio retries accept() after 1 s
        _, scrape, _ = http("GET", f"{svc.url}/metrics")
        m = parse_metrics(scrape.decode())
        # the connection cap (exporter.server) usually keeps accept() from failing at all;
        # when it does fail, each failure is counted and goes through the rate limit
        failed_accepts = value(m, "llm_usage_os_errors_total", errno="EMFILE")
        events = sum(v for k, v in m.items() if k[0] == "llm_usage_log_events_total")
        suppressed = sum(v for k, v in m.items() if k[0] == "llm_usage_log_suppressed_total")
        assert events + suppressed >= failed_accepts
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log_path.read_text(errors="replace")
    records = [line for line in text.splitlines() if re.match(r"\d{4}-\d\d-\d\dT", line)]
    errors = [r for r in records if " ERROR " in r or "suppressed" in r]
    assert len(errors) <= 8, "\n".join(records)  # one line per class, one summary at exit
    assert len(text) < 64 * 1024, len(text)
