"""The limits and ours side by side, in one run: prints the ratio table of issue #16.

One command, one load generator (wrk) for every HTTP server, one Postgres cluster for every
flush:

- **HTTP, 1 report per POST** (`wrk -c32`): the bare aiohttp + orjson handler
  (`bench/common.py bare-server`) vs our service (`python -m exporter serve`, WAL fsync, the
  default WAL → SQLite flusher running) and the same with the flusher held off (p99 ratio).
- **HTTP, 100 reports per POST** (`wrk -c8`, bodies from a Lua script): the same three.
- **Postgres flush** of `--reports` reports over `--keys` rollup keys: ours (`Flusher` →
  `StoreWriter` on the real schema with the read API's indexes) vs an exactly-once CTE on a
  thin schema (typed arrays in, `INSERT … ON CONFLICT DO NOTHING RETURNING` feeding the rollup
  upsert in one statement) vs binary COPY (`copy_records_to_table`) into a table with only a
  primary key, all on the same throwaway cluster (tests/pgcluster.py); Postgres CPU (the
  whole cluster) and this process's CPU per report beside the wall time.

wrk rewrites the request id of every body (Lua `gsub` on a placeholder), so every report is
new to our dedupe. Needs `wrk` (Debian: `apt-get install wrk`) and PostgreSQL binaries.

    python bench/limits.py                  # prints markdown
    python bench/limits.py --write-results  # ...and replaces "## Limits" in RESULTS.md
    python bench/limits.py --parts pg --write-results   # the flush part only:
                                            # "## Limits: Postgres flush"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from common import (
    ID_PLACEHOLDER,
    Server,
    bare_server,
    body_templates,
    children_cpu_seconds,
    fmt_int,
    machine_note,
    md_table,
    now_utc,
    our_server,
    proc_cpu_seconds,
    replace_section,
)
from flush import _pg_dsn, cluster_cpu, json_flush, log, make_payloads, run_ours
from pgcluster import start_cluster

from exporter.store import Store

# -- wrk ---------------------------------------------------------------------------------------
LUA = r"""
-- Bodies from a file (one per line); the request id placeholder becomes a unique token.
local n = 0
function setup(thread)
  n = n + 1
  thread:set("tid", n)
end
function init(args)
  bodies = {}
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  prefix = args[2] .. "." .. tostring(tid) .. "."
  counter = 0
  headers = {["Content-Type"] = "application/json"}
end
function request()
  counter = counter + 1
  local body = bodies[(counter % #bodies) + 1]:gsub("@@RID@@", prefix .. counter)
  return wrk.format("POST", "/v1/usage", headers, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class WrkResult:
    server: str
    body: str
    per_body: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu: float
    load: float
    #: CPU of the server's children (the SQLite flush process) over the same window
    child_cpu: float = 0.0

    @property
    def req_s(self) -> float:
        return self.requests / self.seconds

    @property
    def reports_s(self) -> float:
        return self.req_s * self.per_body

    @property
    def cpu_us_per_report(self) -> float:
        return self.server_cpu / max(1, self.requests * self.per_body) * 1e6

    @property
    def child_us_per_report(self) -> float:
        return self.child_cpu / max(1, self.requests * self.per_body) * 1e6


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit("bench/limits.py needs wrk: apt-get install wrk (Debian), brew install wrk")
    return path


def run_wrk(
    wrk: str, server: Server, bodies: Path, script: Path, conns: int, seconds: float, tag: str
) -> dict[str, Any]:
    cmd = [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    cmd.append("--latency")
    cmd += ["-s", str(script), server.url, "--", str(bodies), tag]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            result: dict[str, Any] = orjson.loads(line[8:])
            return result
    raise RuntimeError(f"no summary from wrk:\n{out.stdout}\n{out.stderr}")


def measure_http(
    wrk: str, server: Server, name: str, per_body: int, conns: int, args: argparse.Namespace,
    workdir: Path,
) -> WrkResult:  # fmt: skip
    bodies = workdir / f"bodies-{per_body}.txt"
    if not bodies.exists():
        bodies.write_bytes(b"\n".join(body_templates(per_body)) + b"\n")
    script = workdir / "bodies.lua"
    script.write_text(LUA)
    tag = f"{name.split()[0]}-{per_body}-{time.monotonic_ns()}"
    log(f"  {name}, {per_body} report(s)/POST, wrk -c{conns} …")
    run_wrk(wrk, server, bodies, script, conns, args.warmup, tag + "w")
    cpu0, kids0 = proc_cpu_seconds(server.pid), children_cpu_seconds(server.pid)
    load0 = os.getloadavg()[0]
    r = run_wrk(wrk, server, bodies, script, conns, args.duration, tag)
    cpu = proc_cpu_seconds(server.pid) - cpu0
    kids = sum(c - kids0.get(pid, 0.0) for pid, c in children_cpu_seconds(server.pid).items())
    errors = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
    res = WrkResult(
        name, "1 report/POST" if per_body == 1 else f"{per_body} reports/POST", per_body,
        r["requests"], r["duration_us"] / 1e6, r["p50_us"] / 1e3, r["p99_us"] / 1e3,
        r["max_us"] / 1e3, errors, cpu, max(load0, os.getloadavg()[0]), kids,
    )  # fmt: skip
    log(
        f"    {res.reports_s:,.0f} reports/s, p99 {res.p99_ms:.1f} ms, errors {errors}, CPU "
        f"{res.cpu_us_per_report:.1f} + child {res.child_us_per_report:.1f} µs/report"
    )
    return res


def http_part(args: argparse.Namespace, workdir: Path) -> list[WrkResult]:
    wrk = require_wrk()
    out: list[WrkResult] = []
    shapes = {"single": (1, args.single_conns), "batch": (args.batch, args.batch_conns)}
    for per_body, conns in (shapes[b] for b in args.bodies.split(",")):
        with bare_server(workdir) as s:
            out.append(measure_http(wrk, s, "bare", per_body, conns, args, workdir))
        with our_server(workdir) as s:
            out.append(measure_http(wrk, s, "ours", per_body, conns, args, workdir))
        with our_server(workdir, hold_flush=True) as s:
            out.append(measure_http(wrk, s, "ours (flush held)", per_body, conns, args, workdir))
        if args.flush_in_process:
            with our_server(workdir, sqlite_flush_process="false") as s:
                out.append(measure_http(wrk, s, "ours (SQLite flush in process)", per_body,
                                        conns, args, workdir))  # fmt: skip
        if args.before_src:
            out += before_rows(wrk, per_body, conns, args, workdir)
    return out


def before_rows(
    wrk: str, per_body: int, conns: int, args: argparse.Namespace, workdir: Path
) -> list[WrkResult]:
    """The same two servers run from another source tree (`--before-src`, e.g.
    `git worktree add /tmp/before <commit>`), in the same run: before/after on one box state.
    PYTHONSAFEPATH: `python -m exporter` would otherwise import the tree in the current
    directory ahead of PYTHONPATH (run from a checkout, "before" was that checkout)."""
    src = Path(args.before_src).resolve()
    out = []
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
    os.environ.update(PYTHONPATH=str(src), PYTHONSAFEPATH="1")
    try:
        probe = [sys.executable, "-c", "import exporter; print(exporter.__file__)"]
        found = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
        if not Path(found.strip()).is_relative_to(src):
            sys.exit(f"--before-src {src}: the server would import {found.strip()}")
        for hold, name in ((False, "before: ours"), (True, "before: ours (flush held)")):
            with our_server(workdir, hold_flush=hold) as s:
                out.append(measure_http(wrk, s, name, per_body, conns, args, workdir))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return out


# -- Postgres limits ---------------------------------------------------------------------------
THIN_DDL = """
CREATE TABLE thin_details (request_id text PRIMARY KEY, model text NOT NULL,
  user_id text NOT NULL, completed_at timestamptz NOT NULL, input_tokens int8 NOT NULL,
  output_tokens int8 NOT NULL, cost numeric NOT NULL);
CREATE TABLE thin_rollups (model text, user_id text, bucket timestamptz, requests int8,
  input_tokens int8, output_tokens int8, cost numeric, PRIMARY KEY (model, user_id, bucket));
CREATE TABLE copy_details (LIKE thin_details INCLUDING ALL);
"""
THIN_CTE = """
WITH src AS (
  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int8[],
                       $6::int8[], $7::numeric[])
    AS s(request_id, model, user_id, completed_at, input_tokens, output_tokens, cost)
  ORDER BY request_id),
ins AS (INSERT INTO thin_details SELECT * FROM src
        ON CONFLICT (request_id) DO NOTHING RETURNING *)
INSERT INTO thin_rollups
SELECT model, user_id, date_trunc('hour', completed_at), count(*), sum(input_tokens),
       sum(output_tokens), sum(cost)
FROM ins GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
ON CONFLICT (model, user_id, bucket) DO UPDATE SET
  requests = thin_rollups.requests + excluded.requests,
  input_tokens = thin_rollups.input_tokens + excluded.input_tokens,
  output_tokens = thin_rollups.output_tokens + excluded.output_tokens,
  cost = thin_rollups.cost + excluded.cost
"""
THIN_COLUMNS = ("request_id", "model", "user_id", "completed_at", "input_tokens",
                "output_tokens", "cost")  # fmt: skip


def thin_records(payloads: Sequence[bytes]) -> list[tuple[Any, ...]]:
    """The thin schema's rows, decoded before the clock starts (the limit is Postgres')."""
    rows = []
    for p in payloads:
        for r in orjson.loads(p):
            rows.append((r["request_id"], r["model"], r["user"] or "",
                         datetime.fromisoformat(r["completed_at"]), r["input_tokens"],
                         r["output_tokens"], Decimal(str(r["cost_usd"] or 0))))  # fmt: skip
    return rows


def batches(rows: Sequence[tuple[Any, ...]], size: int) -> Iterator[Sequence[tuple[Any, ...]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@dataclass
class FlushResult:
    name: str
    reports: int
    wall: float
    pg_cpu: float
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.reports / self.wall


async def pg_part(args: argparse.Namespace) -> list[FlushResult]:
    log(f"postgres: {args.reports:,} reports over {args.keys:,} keys")
    payloads = make_payloads(args.reports, args.keys, 100)
    counts = [len(orjson.loads(p)) for p in payloads]
    rows = thin_records(payloads)
    cluster = start_cluster(fsync=True)
    out = []
    try:
        thin = cluster.url(cluster.create_database("thin"))
        conn = await asyncpg.connect(_pg_dsn(thin))
        await conn.execute(THIN_DDL)
        for name, kind in (("exactly-once CTE, thin schema", "cte"),
                           ("binary COPY, primary key only", "copy")):  # fmt: skip
            log(f"  {name} …")
            srv0, cpu0, t0 = cluster_cpu(cluster), time.process_time(), time.perf_counter()
            for chunk in batches(rows, args.flush_batch):
                if kind == "cte":
                    async with conn.transaction():
                        await conn.execute(THIN_CTE, *zip(*chunk, strict=True))
                else:
                    await conn.copy_records_to_table(
                        "copy_details", records=chunk, columns=THIN_COLUMNS
                    )
            wall = time.perf_counter() - t0
            out.append(FlushResult(name, len(rows), wall, cluster_cpu(cluster) - srv0,
                                   time.process_time() - cpu0))  # fmt: skip
            log(f"    {out[-1].rate:,.0f} reports/s")
        n = await conn.fetchval("SELECT sum(requests) FROM thin_rollups")
        assert n == len(rows), (n, len(rows))
        await conn.close()
        ours_url = cluster.url(cluster.create_database("ours"))
        (run,) = await run_ours(
            cluster, ours_url, payloads, counts, args.flush_batch, labels=("ours: flush",)
        )
        assert run.inserted == len(rows), (run.inserted, len(rows))
        out.append(FlushResult("ours (Flusher → StoreWriter, real schema)", run.reports,
                               run.wall, run.server_cpu, run.client_cpu))  # fmt: skip
        # the write before COPY (Postgres parses the WAL records), same schema, for reference
        before_url = cluster.url(cluster.create_database("before"))
        store = Store.from_url(before_url)
        await store.upgrade()
        await store.close()
        conn = await asyncpg.connect(_pg_dsn(before_url))
        log("  before: JSON statement …")
        srv0, cpu0, t0 = cluster_cpu(cluster), time.process_time(), time.perf_counter()
        inserted = await json_flush(conn, payloads, args.flush_batch)
        out.append(FlushResult("before: JSON statement (Postgres parses the records)",
                               len(rows), time.perf_counter() - t0, cluster_cpu(cluster) - srv0,
                               time.process_time() - cpu0))  # fmt: skip
        assert inserted == len(rows), (inserted, len(rows))
        await conn.close()
    finally:
        cluster.destroy()
    return out


# -- report ------------------------------------------------------------------------------------
def verdict(value: float, target: float, lower_is_better: bool = False) -> str:
    ok = value <= target if lower_is_better else value >= target
    return f"{'met' if ok else 'NOT met'} (target {'≤' if lower_is_better else '≥'} {target})"


def render(args: argparse.Namespace, http: list[WrkResult], pg: list[FlushResult]) -> str:
    lines = [
        f"`python bench/limits.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"— {now_utc()}; {machine_note()}; load average at start "
        f"{args.load_at_start:.2f} (the box is shared)."
        + (
            f" wrk `-t1`, {args.duration:g} s measured after {args.warmup:g} s warm-up per "
            "server; WAL fsync; every server a fresh process."
            if http
            else ""
        ),
        "",
    ]
    summary: list[list[str]] = []
    if http:
        by = {(r.server, r.per_body): r for r in http}
        shapes = {r.per_body for r in http}
        lines.append(md_table(
            ["server", "body", "wrk -c", "req/s", "reports/s", "p50 / p99 / max ms",
             "server CPU µs/report", "flush child CPU µs/report", "errors", "load avg"],
            [[r.server, r.body, str(args.single_conns if r.per_body == 1 else args.batch_conns),
              fmt_int(r.req_s), fmt_int(r.reports_s),
              f"{r.p50_ms:.1f} / {r.p99_ms:.1f} / {r.max_ms:.0f}", f"{r.cpu_us_per_report:.1f}",
              f"{r.child_us_per_report:.1f}", str(r.errors), f"{r.load:.1f}"] for r in http],
        ))  # fmt: skip
        lines.append("")
        for per_body, label, target in ((1, "HTTP, 1 report per POST (wrk -c32)", 0.5),
                                        (args.batch, f"HTTP, {args.batch} reports per POST "
                                         "(wrk -c8)", 0.25)):  # fmt: skip
            if per_body not in shapes:
                continue
            bare, ours, held = by["bare", per_body], by["ours", per_body], by[
                "ours (flush held)", per_body]  # fmt: skip
            ratio = ours.reports_s / bare.reports_s
            cpu_ratio = bare.cpu_us_per_report / ours.cpu_us_per_report
            summary.append([label, f"bare {fmt_int(bare.reports_s)} reports/s, p99 "
                            f"{bare.p99_ms:.1f} ms", f"{fmt_int(ours.reports_s)} reports/s, p99 "
                            f"{ours.p99_ms:.1f} ms", f"**{ratio:.2f}×** (CPU cost "
                            f"{cpu_ratio:.2f}×)", verdict(round(ratio, 2), target)])  # fmt: skip
            p99 = ours.p99_ms / held.p99_ms
            summary.append([f"{label}: p99 flusher on ÷ held off", f"held off: p99 "
                            f"{held.p99_ms:.1f} ms", f"on: p99 {ours.p99_ms:.1f} ms",
                            f"**{p99:.2f}×**", verdict(round(p99, 2), 2.0, True)])  # fmt: skip
        for per_body, name in (
            (b, n) for b in sorted(shapes) for n in ("ours", "ours (flush held)")
        ):
            before = by.get((f"before: {name}", per_body))
            if before is not None:
                after = by[name, per_body]
                shape = "1 report" if per_body == 1 else f"{per_body} reports"
                summary.append([f"HTTP, {shape} per POST: {name}, this tree vs `--before-src`",
                                f"before: {before.cpu_us_per_report:.1f} µs CPU/report, "
                                f"{fmt_int(before.reports_s)} reports/s, p99 "
                                f"{before.p99_ms:.1f} ms",
                                f"{after.cpu_us_per_report:.1f} µs CPU/report (+ child "
                                f"{after.child_us_per_report:.1f}), {fmt_int(after.reports_s)} "
                                f"reports/s, p99 {after.p99_ms:.1f} ms",
                                f"**{after.cpu_us_per_report / before.cpu_us_per_report:.2f}×** "
                                "CPU", "-"])  # fmt: skip
    if pg:
        cte, copy, ours_pg = pg[:3]
        for limit, target in ((cte, 0.5), (copy, None)):
            ratio = ours_pg.rate / limit.rate
            summary.append([f"Postgres flush, {args.reports:,} reports over {args.keys:,} keys",
                            f"{limit.name} {fmt_int(limit.rate)}/s", f"{fmt_int(ours_pg.rate)}/s",
                            f"**{ratio:.2f}×**", verdict(round(ratio, 2), target) if target
                            else "-"])  # fmt: skip
        lines.append(md_table(
            ["flush", "reports", "wall s", "reports/s", "Postgres CPU s", "Postgres CPU µs/report",
             "client CPU µs/report"],
            [[r.name, fmt_int(r.reports), f"{r.wall:.2f}", fmt_int(r.rate), f"{r.pg_cpu:.2f}",
              f"{r.pg_cpu / r.reports * 1e6:.1f}", f"{r.client_cpu / r.reports * 1e6:.1f}"]
             for r in pg],
        ))  # fmt: skip
        lines.append("")
    lines += ["Ratio table (limits and ours in the same run):", ""]
    lines.append(md_table(["measure", "limit", "ours", "ratio", "issue #16"], summary))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="http,pg", help="comma list of http, pg")
    p.add_argument("--bodies", default="single,batch", help="HTTP: comma list of single, batch")
    # ≥ the 10 s flush interval, so the default flusher runs inside the measured window
    p.add_argument("--duration", type=int, default=12, help="measured s per server")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--single-conns", type=int, default=32)
    p.add_argument("--batch-conns", type=int, default=8)
    p.add_argument("--batch", type=int, default=100, help="reports per batch body")
    p.add_argument("--reports", type=int, default=100_000, help="Postgres flush reports")
    p.add_argument("--keys", type=int, default=10_000, help="Postgres flush rollup keys")
    p.add_argument("--flush-batch", type=int, default=50_000, help="reports per transaction")
    p.add_argument("--before-src", help="also run ours (flusher on, held) from this source tree")
    p.add_argument("--flush-in-process", action="store_true",
                   help="also run ours with sqlite_flush_process=false (this tree)")  # fmt: skip
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    args.load_at_start = os.getloadavg()[0]
    parts = set(args.parts.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    try:
        http = http_part(args, workdir) if "http" in parts else []
        pg = asyncio.run(pg_part(args)) if "pg" in parts else []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = render(args, http, pg)
    print(text)
    if args.write_results:
        # the flush part alone (while iterating on the write) gets a section of its own, so it
        # never replaces the HTTP figures of a full run
        replace_section("Limits" if "http" in parts else "Limits: Postgres flush", text)
    assert ID_PLACEHOLDER  # the Lua script's placeholder is common.ID_PLACEHOLDER
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
