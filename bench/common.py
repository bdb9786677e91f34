"""Shared pieces of the benchmarks: payloads, server processes, the load generator, RESULTS.md.

Everything here is bounded: servers are started and stopped by the benchmark, load runs for a
fixed duration against 127.0.0.1 only, and nothing loops forever.

Run as a script it serves the *bare* baseline app (used by bench/ingest.py):

    python bench/common.py bare-server --port 9999
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
LOOPBACK = "127.0.0.1"

#: placeholder for the request id inside pre-encoded bodies; replaced by a unique token per POST
ID_PLACEHOLDER = b"@@RID@@"

#: (provider, model, operation): all priced by genai-prices, so pricing runs for real
MODELS: tuple[tuple[str, str, str], ...] = (
    ("openai", "gpt-4o-mini", "chat"),
    ("openai", "gpt-4o", "chat"),
    ("openai", "gpt-4.1-mini", "chat"),
    ("openai", "o3-mini", "chat"),
    ("anthropic", "claude-3-5-haiku-latest", "chat"),
    ("anthropic", "claude-sonnet-4-20250514", "chat"),
    ("openai", "text-embedding-3-small", "embedding"),
    ("google", "gemini-2.0-flash", "chat"),
)


# -- payloads --------------------------------------------------------------------------------
def report(
    i: int, request_id: str, *, users: int = 100, models: int = len(MODELS)
) -> dict[str, Any]:
    """A realistic canonical report (the shape a gateway sends after a call)."""
    provider, model, operation = (
        MODELS[i % models]
        if models <= len(MODELS)
        else (
            "openai",
            f"model-{i % models}",
            "chat",
        )
    )
    input_tokens = 200 + (i * 37) % 4000
    output_tokens = 20 + (i * 13) % 800
    return {
        "request_id": request_id,
        "model": model,
        "provider": provider,
        "operation": operation,
        "user": f"user-{(i * 7) % users}",
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": (input_tokens // 4) if i % 3 == 0 else 0,
        "reasoning_tokens": (output_tokens // 5) if "o3" in model else 0,
        "status": "error" if i % 50 == 0 else "success",
        "duration_ms": 150.0 + (i * 97) % 9000,
        "ttft_ms": 40.0 + (i * 31) % 900,
    }


def body_templates(batch: int, variants: int = 64) -> list[bytes]:
    """Pre-encoded POST bodies whose request ids contain ID_PLACEHOLDER.

    `batch == 1` gives one JSON object per body; otherwise a JSON array of `batch` reports
    with ids `<token>-0 … <token>-(batch-1)`. `variants` templates rotate the labels.
    """
    out = []
    ph = ID_PLACEHOLDER.decode()
    for v in range(variants):
        if batch == 1:
            out.append(orjson.dumps(report(v, ph)))
        else:
            items = [report(v * batch + j, f"{ph}-{j}") for j in range(batch)]
            out.append(orjson.dumps(items))
    return out


# -- machine and process helpers ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def machine_note() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"nproc={os.cpu_count()}, CPU {cpu}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.system()} {platform.release()}"
    )


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def children_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live child of `pid` (the server's SQLite flush process), from /proc."""
    out: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out[int(stat.parent.name)] = proc_cpu_seconds(int(stat.parent.name))
    return out


def cpu_jiffies() -> dict[str, list[int]]:
    """/proc/stat's CPU lines: "cpu" (the machine) and "cpuN" → user, nice, system, idle,
    iowait, irq, softirq, steal (jiffies since boot). Raises OSError without /proc."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu"):
            out[name] = [int(x) for x in fields[:8]]
    return out


def _busy(j: list[int]) -> int:
    return sum(j) - j[3] - j[4]  # all but idle and iowait


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with contextlib.suppress(OSError):
        j = cpu_jiffies()["cpu"]
        return _busy(j), sum(j)
    return float("nan"), float("nan")


def steal_jiffies(cpu: int | None = None) -> tuple[int, int]:
    """(steal, total) jiffies of one CPU (or the whole machine) from /proc/stat: the time the
    hypervisor ran something else while this guest wanted the CPU (a VM's neighbours)."""
    with contextlib.suppress(OSError, KeyError):
        j = cpu_jiffies()["cpu" if cpu is None else f"cpu{cpu}"]
        return j[7], sum(j)
    return 0, 0


def idlest_cpu(seconds: float = 1.0) -> int:
    """The CPU with the least busy time over `seconds` (from /proc/stat's per-CPU lines)."""

    def per_cpu() -> dict[int, int]:
        return {int(n[3:]): _busy(j) for n, j in cpu_jiffies().items() if n != "cpu"}

    before = per_cpu()
    time.sleep(seconds)
    after = per_cpu()
    return min(after, key=lambda c: after[c] - before.get(c, 0))


def pin(pid: int, cpu: int | None, *, away: bool = False, loop_only: bool = False) -> None:
    """Every thread of `pid` on `cpu` (`away`: on every CPU but `cpu`; None: on every CPU
    again; `loop_only`: the main thread, which runs the event loop, on `cpu` and every other
    thread of `pid` on the other CPUs); threads it starts later inherit the mask of the thread
    that starts them (so pin again before each round)."""
    n = os.cpu_count() or 1
    others = ",".join(str(c) for c in range(n) if c != cpu) if n > 1 else str(cpu)
    if cpu is None:
        cpus = f"0-{n - 1}"
    elif away:
        cpus = others
    else:
        cpus = str(cpu)
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    if loop_only and cpu is not None:
        for task in Path(f"/proc/{pid}/task").iterdir():
            mask = str(cpu) if int(task.name) == pid else others
            subprocess.run(["taskset", "-p", "-c", mask, task.name], check=False,
                           stdout=subprocess.DEVNULL)  # fmt: skip


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass
class Server:
    """A server in its own process; `kind` is "bare" or "ours"."""

    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.kind} server exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection((LOOPBACK, server.port), timeout=0.5) as s,
        ):
            # ours: ready = migrated and the flusher's first probe done (the SQLite flush
            # process is up: its start-up is not measured as flush CPU)
            path = b"/readyz" if server.kind == "ours" else b"/healthz"
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.kind} server not ready after {timeout}s:\n{server.log_tail()}")


def _stop(server: Server, kill: bool = False) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


@contextlib.contextmanager
def bare_server(workdir: Path) -> Iterator[Server]:
    port = free_port()
    log_path = workdir / f"bare-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "common.py"), "bare-server", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server("bare", port, proc, log_path)
    try:
        _wait_ready(server, 30)
        yield server
    finally:
        _stop(server)


@contextlib.contextmanager
def our_server(
    workdir: Path, durability: str = "fsync", *, hold_flush: bool = False, **env: str
) -> Iterator[Server]:
    """The real service via its CLI (`python -m exporter serve`), on a fresh data dir.

    `hold_flush` keeps the WAL → database flusher from running during the benchmark (interval
    and batch trigger out of reach) and SIGKILLs the server at the end instead of letting
    SIGTERM flush everything: it isolates the accept path from the storage work.
    """
    if hold_flush:
        env = {"flush_interval": "86400", "flush_max_reports": str(10**12), **env}
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"ours-{durability}-", dir=workdir))
    log_path = workdir / f"ours-{port}.log"
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("LLM_USAGE_")
    }  # a developer's own settings must not leak into the benchmark
    environ["LLM_USAGE_WAL_DURABILITY"] = durability
    environ.update({f"LLM_USAGE_{k.upper()}": v for k, v in env.items()})
    cmd = [
        sys.executable,
        "-m",
        "exporter",
        "serve",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environ)
    server = Server("ours", port, proc, log_path, data_dir)
    try:
        _wait_ready(server, 120)
        yield server
    finally:
        _stop(server, kill=hold_flush)
        shutil.rmtree(data_dir, ignore_errors=True)


# -- the load generator (runs in its own process) ----------------------------------------------
@dataclass
class LoadSpec:
    url: str
    templates: list[bytes]
    reports_per_body: int
    workers: int
    duration: float
    warmup: float
    id_prefix: str
    server_pid: int
    #: open loop at this many requests/s (then `workers` is the connection pool size);
    #: 0 = closed loop, `workers` connections each sending as fast as the server answers
    rate: float = 0.0
    #: scrape this /metrics URL in a loop during the run (Accept-Encoding: gzip, like Prometheus)
    scrape_url: str | None = None
    scrape_interval: float = 0.0
    keep_latencies: bool = True
    #: check that the first answer of each worker accepted every report of its body (ours only)
    expect_accepted: bool = False


@dataclass
class LoadResult:
    window: float
    requests: int
    reports: int
    statuses: dict[int, int]
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    machine_busy: float = 0.0  # fraction of all cores busy during the window
    scrapes: int = 0
    scrape_seconds: list[float] = field(default_factory=list)
    scrape_bytes: int = 0

    @property
    def req_per_s(self) -> float:
        return self.requests / self.window

    @property
    def reports_per_s(self) -> float:
        return self.reports / self.window

    @property
    def other_cores(self) -> float:
        """CPU used by everything but the server and the load generator, in cores."""
        busy_cores = self.machine_busy * (os.cpu_count() or 1)
        return busy_cores - (self.server_cpu + self.client_cpu) / self.window

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


def run_load(spec: LoadSpec) -> LoadResult:
    """Entry point for the load process (ProcessPoolExecutor with the spawn context)."""
    return asyncio.run(_load(spec))


async def _load(spec: LoadSpec) -> LoadResult:
    import aiohttp

    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    t_start = clock()
    measure_from = t_start + spec.warmup
    end = measure_from + spec.duration
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    counts = [0, 0]  # requests, reports completed inside the window
    marks: dict[str, Any] = {}
    headers = {"Content-Type": "application/json"}
    templates = spec.templates
    n_templates = len(templates)
    per_body = spec.reports_per_body
    placeholder = ID_PLACEHOLDER

    def mark(name: str) -> None:
        marks[name] = (time.process_time(), proc_cpu_seconds(spec.server_pid), system_busy())

    async def marker() -> None:
        await asyncio.sleep(max(0.0, measure_from - clock()))
        mark("start")
        await asyncio.sleep(max(0.0, end - clock()))
        mark("end")

    async def send(session: aiohttp.ClientSession, token: bytes, n: int, began: float) -> None:
        """One POST; `began` is when it was sent (closed loop) or scheduled (open loop)."""
        body = templates[n % n_templates].replace(placeholder, token)
        async with session.post(spec.url, data=body, headers=headers) as resp:
            answer = await resp.read()
            status = resp.status
        t1 = clock()
        if n < 4 and spec.expect_accepted:
            verdict = orjson.loads(answer)
            if status != 202 or verdict.get("accepted") != per_body:
                raise RuntimeError(f"server did not accept the body: {status} {verdict}")
        if measure_from <= t1 <= end:
            counts[0] += 1
            statuses[status] = statuses.get(status, 0) + 1
            if status == 202:
                counts[1] += per_body
            if spec.keep_latencies and began >= measure_from:
                latencies.append(t1 - began)

    async def worker(wid: int, session: aiohttp.ClientSession) -> None:
        """Closed loop: the next POST leaves when the previous answer is in."""
        prefix = f"{spec.id_prefix}.{wid}.".encode()
        n = 0
        while (t0 := clock()) < end:
            await send(session, prefix + str(n).encode(), n, t0)
            n += 1

    async def dispatcher(session: aiohttp.ClientSession) -> None:
        """Open loop: POSTs leave on schedule whatever the answers do, so a stalled server
        shows up as latency (counted from the scheduled time) instead of as fewer requests."""
        interval = 1.0 / spec.rate
        prefix = f"{spec.id_prefix}.".encode()
        inflight: set[asyncio.Task[None]] = set()
        n = 0
        while (scheduled := t_start + n * interval) < end:
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(send(session, prefix + str(n).encode(), n, scheduled))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            n += 1
        if inflight:
            await asyncio.gather(*inflight)

    scrape_times: list[float] = []
    scrape_bytes = [0]

    async def scraper(session: aiohttp.ClientSession) -> None:
        assert spec.scrape_url is not None
        hdrs = {"Accept-Encoding": "gzip"}
        while clock() < end:
            t0 = clock()
            async with session.get(spec.scrape_url, headers=hdrs) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"/metrics answered {resp.status}")
            t1 = clock()
            if measure_from <= t0 and t1 <= end:
                scrape_times.append(t1 - t0)
                scrape_bytes[0] = len(data)
            if spec.scrape_interval:
                await asyncio.sleep(spec.scrape_interval)

    connector = aiohttp.TCPConnector(limit=spec.workers + 1, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        if spec.rate:
            tasks = [loop.create_task(dispatcher(session))]
        else:
            tasks = [loop.create_task(worker(w, session)) for w in range(spec.workers)]
        tasks.append(loop.create_task(marker()))
        if spec.scrape_url:
            # its own connection, as Prometheus would have
            scrape_session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
            tasks.append(loop.create_task(scraper(scrape_session)))
        try:
            await asyncio.gather(*tasks)
        finally:
            if spec.scrape_url:
                await scrape_session.close()

    c0, s0, (b0, t0) = marks["start"]
    c1, s1, (b1, t1) = marks["end"]
    latencies.sort()
    return LoadResult(
        window=spec.duration,
        requests=counts[0],
        reports=counts[1],
        statuses=statuses,
        latencies=latencies,
        client_cpu=c1 - c0,
        server_cpu=s1 - s0,
        machine_busy=(b1 - b0) / (t1 - t0) if t1 > t0 else float("nan"),
        scrapes=len(scrape_times),
        scrape_seconds=sorted(scrape_times),
        scrape_bytes=scrape_bytes[0],
    )


# -- RESULTS.md --------------------------------------------------------------------------------
def replace_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the `## heading` section of RESULTS.md, leaving the others intact.

    A section runs from its `## ` heading to the next `## ` heading (or the end of the file).
    """
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


# -- the bare baseline server -------------------------------------------------------------------
def serve_bare(port: int) -> None:
    """POST /v1/usage: orjson.loads the body, answer 202. No validation, no WAL, nothing else."""
    from aiohttp import web

    accepted = orjson.dumps({"accepted": 1})

    async def usage(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(status=202, body=accepted, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/usage", usage)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host=LOOPBACK, port=port, print=None, access_log=None, handle_signals=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bare = sub.add_parser("bare-server", help="serve the bare baseline on 127.0.0.1")
    bare.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve_bare(args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
