"""`serve --workers 1` vs `--workers 2` under the same wrk load, in one run.

The service as users run it (WAL fsync, the default WAL → SQLite flusher, one SQLite file
for every worker), on a fresh data dir per run; wrk (`-t1`, bodies and unique request ids
from bench/limits.py's Lua script) on the shared port. Server CPU is the supervisor and all
its workers (/proc), per report accepted; the machine's busy share and load average are
printed because wrk and anything else running share the same cores.

    python bench/multicore.py                  # prints markdown
    python bench/multicore.py --write-results  # ...and replaces "## Workers" in RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    Server,
    body_templates,
    machine_note,
    md_table,
    now_utc,
    our_server,
    proc_cpu_seconds,
    replace_section,
    system_busy,
)
from limits import LUA, require_wrk, run_wrk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import free_port_range


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and its children (the workers)."""
    return proc_cpu_seconds(pid) + sum(proc_cpu_seconds(k) for k in _children(pid))


@dataclass
class Run:
    workers: int
    body: str
    per_body: int
    conns: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu: float
    machine_busy: float
    load: float
    split: str = ""  # each worker's share of the reports (SO_REUSEPORT hashes connections)

    @property
    def reports_s(self) -> float:
        return self.requests * self.per_body / self.seconds

    @property
    def cpu_us_per_report(self) -> float:
        return self.server_cpu / max(1, self.requests * self.per_body) * 1e6

    @property
    def server_cores(self) -> float:
        return self.server_cpu / self.seconds


def measure(
    wrk: str, workers: int, per_body: int, conns: int, args: argparse.Namespace, workdir: Path
) -> Run:
    bodies = workdir / f"bodies-{per_body}.txt"
    if not bodies.exists():
        bodies.write_bytes(b"\n".join(body_templates(per_body)) + b"\n")
    script = workdir / "bodies.lua"
    script.write_text(LUA)
    base = free_port_range(workers)
    with our_server(workdir, args.durability, workers=str(workers),
                    worker_port=str(base)) as server:  # fmt: skip
        _wait_workers(server, base, workers)
        tag = f"w{workers}-{per_body}-{time.monotonic_ns()}"
        print(f"  --workers {workers}, {per_body} report(s)/POST, wrk -c{conns} …", flush=True)
        run_wrk(wrk, server, bodies, script, conns, args.warmup, tag + "w")
        cpu0, busy0, load0 = tree_cpu_seconds(server.pid), system_busy(), os.getloadavg()[0]
        r = run_wrk(wrk, server, bodies, script, conns, args.duration, tag)
        cpu, busy1 = tree_cpu_seconds(server.pid) - cpu0, system_busy()
        split = _split(base, workers)
    errors = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
    run = Run(
        workers, "1 report/POST" if per_body == 1 else f"{per_body} reports/POST", per_body,
        conns, r["requests"], r["duration_us"] / 1e6, r["p50_us"] / 1e3, r["p99_us"] / 1e3,
        errors, cpu, (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        max(load0, os.getloadavg()[0]), split,
    )  # fmt: skip
    print(f"    {run.reports_s:,.0f} reports/s, p99 {run.p99_ms:.1f} ms, "
          f"{run.cpu_us_per_report:.1f} µs CPU/report, errors {errors}", flush=True)  # fmt: skip
    return run


def _split(base: int, workers: int) -> str:
    """Each worker's share of the reports it received (warm-up included), from its own
    /metrics port."""
    if workers == 1:
        return "100%"
    got = []
    for i in range(workers):
        url = f"http://127.0.0.1:{base + i}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        line = next(
            x for x in text.splitlines() if x.startswith("llm_usage_reports_received_total")
        )
        got.append(float(line.split()[-1]))
    return " / ".join(f"{g / max(1.0, sum(got)):.0%}" for g in got)


def _wait_workers(server: Server, base: int, workers: int) -> None:
    """Every worker answers /healthz on its own port, not just the first on the shared one."""
    if workers == 1:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        up = 0
        for i in range(workers):
            url = f"http://127.0.0.1:{base + i}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
                up += 1
        if up == workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"workers not up:\n{server.log_tail()}")


def _median_run(runs: Sequence[Run]) -> Run:
    """The run with the median throughput (its own latencies and CPU, not a blend)."""
    ordered = sorted(runs, key=lambda r: r.reports_s)
    return ordered[(len(ordered) - 1) // 2]


def render(args: argparse.Namespace, runs: Sequence[Run]) -> str:
    groups: dict[tuple[str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.body, r.workers), []).append(r)
    base = {body: _median_run(g) for (body, n), g in groups.items() if n == 1}
    rows = []
    for (body, _n), group in groups.items():
        r = _median_run(group)
        every = " / ".join(f"{x.reports_s:,.0f}" for x in group)
        rows.append((
            body, f"-c{r.conns}", f"`--workers {r.workers}`", f"{r.reports_s:,.0f}", every,
            f"{r.reports_s / base[body].reports_s:.2f}×", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
            f"{r.cpu_us_per_report:.1f}", f"{r.server_cores:.2f}", f"{r.machine_busy:.0%}",
            f"{r.load:.1f}", r.split, r.errors,
        ))  # fmt: skip
    table = md_table(
        ("body", "wrk", "server", "reports/s (median)", "each run", "vs 1 worker", "p50 ms",
         "p99 ms", "server CPU µs/report", "server cores used", "machine busy", "load avg",
         "split over workers", "errors"),
        rows,
    )  # fmt: skip
    return f"""Run {now_utc()} on {machine_note()}; load average at start {args.load_at_start:.1f}
(other benchmarks share the box: the load average and "machine busy" columns say how much).
Command: `python bench/multicore.py --duration {args.duration} --repeat {args.repeat}` (wrk
-t1, {args.duration} s measured after a {args.warmup} s warm-up, `--workers 1` and
`--workers 2` alternated {args.repeat}×, the median run shown; fresh data dir and SQLite file
per run, WAL {args.durability}, default flusher; "server CPU" counts the supervisor and every
worker).

{table}

wrk itself needs most of a core at these rates, so on a 2-core box two workers compete with
the load generator for the second core: the gain shows what the second core is worth here,
not what N workers give on a bigger host. CPU µs per report is the figure that carries over.
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bodies", default="single,batch", help="comma list of single, batch")
    p.add_argument("--workers", default="1,2", help="comma list of worker counts")
    p.add_argument("--duration", type=int, default=10, help="measured s per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs per worker count, alternated")
    p.add_argument("--single-conns", type=int, default=32)
    p.add_argument("--batch-conns", type=int, default=8)
    p.add_argument("--batch", type=int, default=100, help="reports per batch body")
    p.add_argument("--durability", choices=["fsync", "os"], default="fsync", help="WAL")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    args.load_at_start = os.getloadavg()[0]
    wrk = require_wrk()
    shapes = {"single": (1, args.single_conns), "batch": (args.batch, args.batch_conns)}
    workdir = Path(tempfile.mkdtemp(prefix="bench-multicore-"))
    runs: list[Run] = []
    try:
        for per_body, conns in (shapes[b] for b in args.bodies.split(",")):
            for _ in range(args.repeat):  # alternated, so a drifting box hits both alike
                for n in (int(x) for x in args.workers.split(",")):
                    runs.append(measure(wrk, n, per_body, conns, args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = render(args, runs)
    print(text)
    if args.write_results:
        replace_section("Workers", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
