"""Budget check latency with 1,000 budgets, and the cost of matching a report, indexed vs a
scan of every budget (the baseline, measured in the same run).

1. **HTTP**: the real service (`python -m exporter serve`, SQLite, 1,000 budgets from a config
   file) after `--reports` reports from 2,000 users have been ingested, flushed and refreshed
   (stored and unflushed spend both non-empty; flush every 2 s, refresh every 5 s); one keep-alive
   client in this process sends
   `--requests` sequential `GET /v1/budgets/check` for random user/team/key/model: p50/p99.
   Then `wrk -t1 -c1` rounds on the same server, interleaved with `/healthz` and a bare
   aiohttp handler: unpinned, then pinned (each server's threads and wrk on one CPU, with
   `taskset`), then with only the event loop's thread and wrk on that CPU (the server's other
   threads on the other one); the < 1 ms target is judged on both pinned placements.
2. **In process**: `BudgetTracker.check` (the handler's work without HTTP) and
   `BudgetTracker.on_durable` per report, indexed vs a scan of all budgets.

    python bench/budgets.py [--requests 5000] [--reports 20000] [--write-results]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from common import (
    bare_server,
    idlest_cpu,
    machine_note,
    md_table,
    now_utc,
    our_server,
    percentile,
    pin,
    proc_cpu_seconds,
    replace_section,
    steal_jiffies,
    system_busy,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgcluster import start_cluster

from exporter.budgets import BudgetTracker, Filters
from exporter.budgets.index import SpecIndex
from exporter.config import BudgetSpec
from exporter.usage import UsageReport

USERS, TEAMS, KEYS, MODELS = 2000, 200, 300, 40
REFRESH = "5"
BLOCKS = 10  # check and /healthz blocks, interleaved
ZONES = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin", "Asia/Kolkata"]


def budget_config(n: int = 1000) -> list[dict[str, Any]]:
    """Mostly per-user and per-team limits, some per model and key, a few global and
    template budgets; a check matches about a dozen of them."""
    out: list[dict[str, Any]] = []
    out += [{"name": f"user-{i}", "user": f"u{i}", "window": "day", "limit_usd": 50}
            for i in range(700)]  # fmt: skip
    out += [{"name": f"team-{i}", "team": f"t{i}", "window": "month", "limit_usd": 500,
             "timezone": ZONES[i % len(ZONES)]} for i in range(150)]  # fmt: skip
    out += [{"name": f"model-{i}", "model": f"m{i}", "window": "week", "limit_usd": 1000}
            for i in range(MODELS)]  # fmt: skip
    out += [{"name": f"key-{i}", "api_key_id": f"k{i}", "window": "30d", "limit_usd": 100}
            for i in range(100)]  # fmt: skip
    out += [{"name": f"global-{w}-{z.replace('/', '_')}", "window": w, "timezone": z,
             "limit_usd": 100000} for w in ("day", "month") for z in ZONES[:4]]  # fmt: skip
    out += [{"name": "per-user-month", "per": "user", "window": "month", "limit_usd": 20},
            {"name": "per-team-7d", "per": "team", "window": "7d", "limit_usd": 200}]  # fmt: skip
    return out[:n]


def identities(rng: random.Random) -> dict[str, str]:
    return {
        "user": f"u{rng.randrange(USERS)}",
        "team": f"t{rng.randrange(TEAMS)}",
        "api_key_id": f"k{rng.randrange(KEYS)}",
        "model": f"m{rng.randrange(MODELS)}",
    }


def report(i: int, rng: random.Random) -> dict[str, Any]:
    return {"request_id": f"bb-{i}", **identities(rng), "input_tokens": 100,
            "cost_usd": rng.randrange(1, 10**6) / 10**7}  # fmt: skip


def _request(conn: http.client.HTTPConnection, method: str, path: str,
             body: bytes | None = None) -> bytes:  # fmt: skip
    headers = {"Content-Type": "application/json"} if body else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status in (200, 202), (resp.status, data[:200])
    return data


WRK_LUA = r"""
-- GET paths from a file (one per line), in turn, on one connection: wrk's own latency record.
function init(args)
  paths = {}
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  i = 0
end
function request()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"errors": %d}\n', summary.requests, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect + e.read + e.write + e.status + e.timeout))
end
"""
WRK_ROUNDS, WRK_SECONDS = 3, 4


def wrk_latency(
    port: int, paths: Sequence[str], workdir: Path, tag: str, cpu: int | None = None
) -> dict[str, Any]:
    """`wrk -t1 -c1 --latency` over `paths`: the server's answer time without a Python client's
    own cost in it (the http.client rows include ~100-200 µs of client per request); `cpu`:
    wrk (both its threads) pinned there with `taskset -c`."""
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("bench/budgets.py needs wrk: apt-get install wrk (Debian), brew install wrk")
    script, listing = workdir / "paths.lua", workdir / f"paths-{tag}.txt"
    script.write_text(WRK_LUA)
    listing.write_text("\n".join(paths) + "\n")
    pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
    cmd = [*pinned, wrk, "-t1", "-c1", f"-d{WRK_SECONDS}s", "--latency", "-s", str(script),
           f"http://127.0.0.1:{port}", "--", str(listing)]  # fmt: skip
    steal0, total0 = steal_jiffies(cpu)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=WRK_SECONDS + 60, check=True)
    steal1, total1 = steal_jiffies(cpu)
    line = next(x for x in out.stdout.splitlines() if x.startswith("WRKJSON "))
    result: dict[str, Any] = orjson.loads(line[8:])
    assert result["errors"] == 0, out.stdout
    result["steal"] = (steal1 - steal0) / max(1, total1 - total0)
    return result


def bench_http(
    requests: int, reports: int, workdir: Path, database_url: str | None = None, *,
    quiet_below: float = 0.6, quiet_wait: float = 120.0,
) -> dict[str, Any]:  # fmt: skip
    toml = workdir / "budgets.toml"
    lines = []
    for b in budget_config():
        lines.append("[[budgets]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in b.items()]
    toml.write_text("\n".join(lines) + "\n")
    rng = random.Random(1)
    db = {"database_url": database_url} if database_url else {}
    with our_server(workdir, "os", config=str(toml), flush_interval="2",
                    budget_refresh_interval=REFRESH, **db) as server:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for start in range(0, reports, 500):
            batch = [report(i, rng) for i in range(start, min(reports, start + 500))]
            _request(conn, "POST", "/v1/usage", json.dumps(batch).encode())
            if start == reports // 2:
                time.sleep(6)  # the first half is flushed and refreshed: stored spend
        for _ in range(600):  # the rest flushed (stored + unflushed stay in the mix)
            text = _request(conn, "GET", "/metrics").decode()
            if "\nllm_usage_pending_reports 0.0" in text:
                break
            time.sleep(0.1)
        quiet = wait_quiet(quiet_below, quiet_wait)
        conn.close()  # a fresh connection: the idle one may have hit the keep-alive timeout
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for _ in range(200):  # warm up
            _request(conn, "GET", "/v1/budgets/check?" + _query(rng))
            _request(conn, "GET", "/healthz")
        lat: list[float] = []
        base: list[float] = []  # the baseline: the same client and server, a trivial route
        cpu_check = cpu_base = 0.0
        matched = 0
        load = os.getloadavg()[0]
        block = max(1, requests // BLOCKS)
        for _ in range(BLOCKS):  # interleaved blocks: both routes see the same moments
            cpu0 = proc_cpu_seconds(server.proc.pid)
            for _ in range(block):
                q = _query(rng)
                t0 = time.perf_counter()
                data = _request(conn, "GET", "/v1/budgets/check?" + q)
                lat.append(time.perf_counter() - t0)
                matched += len(orjson.loads(data)["budgets"])
            cpu1 = proc_cpu_seconds(server.proc.pid)
            for _ in range(block):
                t0 = time.perf_counter()
                _request(conn, "GET", "/healthz")
                base.append(time.perf_counter() - t0)
            cpu_check += cpu1 - cpu0
            cpu_base += proc_cpu_seconds(server.proc.pid) - cpu1
        conn.close()
        checks = ["/v1/budgets/check?" + _query(rng) for _ in range(5000)]
        wrk_check: list[dict[str, Any]] = []
        wrk_base: list[dict[str, Any]] = []
        wrk_bare: list[dict[str, Any]] = []
        pinned: dict[str, list[dict[str, Any]]] = {
            "check": [], "base": [], "bare": [], "loop": [], "trickle": []
        }  # fmt: skip
        with bare_server(workdir) as bare:  # the floor: a bare aiohttp handler on this box
            for _ in range(WRK_ROUNDS):  # interleaved again: all three see the same moments
                wrk_check.append(wrk_latency(server.port, checks, workdir, "check"))
                wrk_base.append(wrk_latency(server.port, ["/healthz"], workdir, "healthz"))
                wrk_bare.append(wrk_latency(bare.port, ["/healthz"], workdir, "bare"))
            # the same rounds with each server (all its threads) and wrk on one CPU: one
            # connection's ping-pong then never wakes a thread on the other CPU
            cpu = idlest_cpu()
            pin(server.pid, cpu)
            pin(bare.pid, cpu)
            for _ in range(WRK_ROUNDS):
                pinned["check"].append(wrk_latency(server.port, checks, workdir, "check", cpu))
                pinned["base"].append(wrk_latency(server.port, ["/healthz"], workdir, "hz", cpu))
                pin(server.pid, cpu, away=True)  # its background work off the floor's CPU
                pinned["bare"].append(wrk_latency(bare.port, ["/healthz"], workdir, "bare", cpu))
                pin(server.pid, cpu)
            for _ in range(WRK_ROUNDS):  # the event loop's thread alone with wrk on that CPU
                pin(server.pid, cpu, loop_only=True)
                pinned["loop"].append(wrk_latency(server.port, checks, workdir, "check", cpu))
            pin(server.pid, cpu)
            with trickle(server.port, rng, reports):  # every refresh has new commits to read
                for _ in range(WRK_ROUNDS):
                    pinned["trickle"].append(
                        wrk_latency(server.port, checks, workdir, "check", cpu)
                    )
            pin(server.pid, None)
        load = max(load, os.getloadavg()[0])
    n = block * BLOCKS
    lat.sort()
    base.sort()
    return {
        "base_p50": percentile(base, 50),
        "base_p90": percentile(base, 90),
        "base_p99": percentile(base, 99),
        "base_max": base[-1],
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": lat[-1],
        "matched": matched / n,
        "cpu": cpu_check / n,  # the background refresh and flusher included
        "base_cpu": cpu_base / n,
        "load": load,
        "quiet": quiet,
        "wrk_check": wrk_check,
        "wrk_base": wrk_base,
        "wrk_bare": wrk_bare,
        "pinned_check": pinned["check"],
        "pinned_base": pinned["base"],
        "pinned_bare": pinned["bare"],
        "loop_check": pinned["loop"],
        "trickle_check": pinned["trickle"],
        "pin_cpu": cpu,
    }


TRICKLE_BATCH, TRICKLE_EVERY = 20, 0.2  # 100 reports/s


@contextlib.contextmanager
def trickle(port: int, rng: random.Random, first: int) -> Iterator[None]:
    """Reports arriving all along (TRICKLE_BATCH every TRICKLE_EVERY s, a thread with its own
    connection): each flush commits some, so each refresh finds the database changed and
    reads every kind of budget again (an idle database costs one probe per refresh)."""
    stop = threading.Event()

    def send() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = first
        while not stop.wait(TRICKLE_EVERY):
            batch = [report(i + k, rng) for k in range(TRICKLE_BATCH)]
            i += TRICKLE_BATCH
            _request(conn, "POST", "/v1/usage", json.dumps(batch).encode())
        conn.close()

    thread = threading.Thread(target=send, name="trickle")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def wait_quiet(below: float, wait: float) -> float:
    """Wait (at most `wait` s) until the machine's CPU busy share over 1 s is below `below`
    (of all cores); returns the share last seen. The box is shared: tails measured while
    other jobs run are their scheduling, not ours."""
    share = 1.0
    deadline = time.monotonic() + wait
    while True:
        b0, t0 = system_busy()
        time.sleep(1.0)
        b1, t1 = system_busy()
        share = (b1 - b0) / max(1.0, t1 - t0)
        if share < below or time.monotonic() >= deadline:
            return share


def _query(rng: random.Random) -> str:
    return "&".join(f"{k}={v}" for k, v in identities(rng).items())


async def _no_spend(
    since: datetime, until: datetime, filters: Filters, group: Sequence[str]
) -> dict[tuple[str, ...], Decimal]:
    return {}


def _scan(tracker: BudgetTracker, ids: tuple[str, str, str, str]) -> list[Any]:
    """The baseline: test every budget (what matching cost before the index)."""
    return [b for b in tracker.budgets
            if all(f is None or f == ids[j] for j, f in enumerate(b.fixed))]  # fmt: skip


def bench_inprocess(n: int = 20000) -> dict[str, float]:
    specs = [BudgetSpec(**b) for b in budget_config()]
    tracker = BudgetTracker(specs, _no_spend)
    rng = random.Random(2)
    now = datetime.now(UTC).isoformat()
    reports = [UsageReport.model_validate({**report(i, rng), "completed_at": now})
               for i in range(n)]  # fmt: skip
    t0 = time.perf_counter()
    for start in range(0, n, 100):
        tracker.on_durable(start // 1000, reports[start : start + 100])
        tracker.ledger  # noqa: B018 -- summed once per commit, as the loop does after each
    durable = (time.perf_counter() - t0) / n
    index: SpecIndex[Any] = SpecIndex(tracker.budgets)
    queries = [tuple(identities(rng).values()) for _ in range(5000)]
    t0 = time.perf_counter()
    for q in queries:
        index.matching(*q)
    indexed = (time.perf_counter() - t0) / len(queries)
    t0 = time.perf_counter()
    for q in queries:
        _scan(tracker, q)  # type: ignore[arg-type]
    scanned = (time.perf_counter() - t0) / len(queries)
    gc.collect()
    gc.freeze()  # the set-up's objects: a collection pass over them is not the check's cost
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        orjson.dumps(tracker.check(*q))
        lat.append(time.perf_counter() - t0)
    gc.unfreeze()
    lat.sort()
    return {"durable": durable, "indexed": indexed, "scanned": scanned,
            "check_p50": percentile(lat, 50), "check_p90": percentile(lat, 90),
            "check_p99": percentile(lat, 99)}  # fmt: skip


def reference_us() -> float:
    """How fast this box is right now: `sum(range(1000))` (about 8-10 µs on an idle core)."""
    import timeit

    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--reports", type=int, default=20000)
    p.add_argument("--backends", default="sqlite,postgres", help="sqlite, postgres or both")
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.6,
        help="measure once the machine's CPU busy share is below this (0-1)",
    )
    p.add_argument("--quiet-wait", type=float, default=120.0, help="…waiting at most this (s)")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args()
    print("in-process …", file=sys.stderr)
    inproc = bench_inprocess()
    results: dict[str, dict[str, Any]] = {}
    quiet = {"quiet_below": args.quiet_below, "quiet_wait": args.quiet_wait}
    with tempfile.TemporaryDirectory(prefix="bench-budgets-") as tmp:
        for backend in args.backends.split(","):
            print(f"HTTP ({backend}) …", file=sys.stderr)
            if backend == "postgres":
                cluster = start_cluster()
                try:
                    url = cluster.url(cluster.create_database("budgets"))
                    results[backend] = bench_http(args.requests, args.reports, Path(tmp), url,
                                                  **quiet)  # fmt: skip
                finally:
                    cluster.destroy()
            else:
                results[backend] = bench_http(args.requests, args.reports, Path(tmp), **quiet)
    h = next(iter(results.values()))
    us = 1e6
    ref = reference_us()

    pinned_keys = ("pinned_check", "pinned_base", "pinned_bare")

    def worst(key: str) -> dict[str, int]:
        return {b: max(x["p99_us"] for x in r[key]) for b, r in results.items()}

    def rng_us(r: dict[str, Any], key: str) -> str:
        p99 = [x["p99_us"] for x in r[key]]
        return f"{min(p99)}–{max(p99)} µs"

    met = all(v < 1000 for v in worst("pinned_check").values())
    verdict_pinned = "; ".join(
        f"{b}: check p99 {rng_us(r, 'pinned_check')} per round, `/healthz` "
        f"{rng_us(r, 'pinned_base')}, the bare handler {rng_us(r, 'pinned_bare')}, host steal "
        f"up to {max(x['steal'] for k in pinned_keys for x in r[k]):.1%} of the CPU"
        for b, r in results.items())  # fmt: skip
    loop_met = all(v < 1000 for v in worst("loop_check").values())
    verdict_loop = "; ".join(
        f"{b}: check p99 {rng_us(r, 'loop_check')} per round" for b, r in results.items()
    )
    verdict_trickle = "; ".join(
        f"{b}: check p99 {rng_us(r, 'trickle_check')} per round" for b, r in results.items()
    )
    verdict_free = "; ".join(
        f"{b}: check p99 {rng_us(r, 'wrk_check')} per round, the bare handler "
        f"{rng_us(r, 'wrk_bare')}" for b, r in results.items())  # fmt: skip
    free_over = all(v >= 1000 for v in worst("wrk_check").values())
    bare_over = all(v >= 1000 for v in worst("wrk_bare").values())
    placements = (
        ("wrk_check", "`GET /v1/budgets/check`", "unpinned"),
        ("wrk_base", "`GET /healthz`", "unpinned"),
        ("wrk_bare", "bare aiohttp + orjson `GET /healthz` (the floor)", "unpinned"),
        ("pinned_check", "`GET /v1/budgets/check`", "pinned"),
        ("pinned_base", "`GET /healthz`", "pinned"),
        ("pinned_bare", "bare aiohttp + orjson `GET /healthz` (the floor)", "pinned"),
        ("loop_check", "`GET /v1/budgets/check`", "loop"),
        ("trickle_check", "`GET /v1/budgets/check`", "trickle"),
    )
    wrk_rows = [
        [
            f"{what}, {backend}, "
            + {
                "pinned": f"pinned: server + wrk on CPU {r['pin_cpu']}",
                "loop": f"loop thread + wrk on CPU {r['pin_cpu']}, the server's other threads "
                "on the other CPU",
                "unpinned": "unpinned",
                "trickle": f"pinned on CPU {r['pin_cpu']}, while "
                f"{TRICKLE_BATCH / TRICKLE_EVERY:.0f} reports/s arrive",
            }[how]
            + f", round {k + 1}",
            f"{x['p50_us']} µs",
            f"{x['p90_us']} µs",
            f"**{x['p99_us']} µs**" if "check" in key else f"{x['p99_us']} µs",
            f"{x['max_us']} µs",
            f"{x['requests']:,}",
            f"{x['steal']:.1%}",
        ]
        for backend, r in results.items()
        for key, what, how in placements
        for k, x in enumerate(r[key])
    ]
    body = "\n\n".join([
        f"{now_utc()}; {machine_note()}; `python bench/budgets.py {' '.join(sys.argv[1:])}`"
        f"{'' if len(sys.argv) > 1 else ' (defaults)'}. 1,000 budgets (700 per user, "
        f"150 per team in five time zones, 40 per model, 100 per API key with a rolling 30d "
        f"window, 8 global, 2 templates); a check matches {h['matched']:.1f} of them on "
        f"average. One keep-alive client, {BLOCKS} interleaved blocks of checks and "
        f"`/healthz` (the same client, server and moments); measured once the machine's CPU "
        f"busy share was below {args.quiet_below:.0%} (waited ≤ {args.quiet_wait:g} s). Machine "
        f"speed at the time: `sum(range(1000))` took {ref:.1f} µs (about 8-10 µs on an idle "
        f"core).",
        md_table(["what", "p50", "p90", "p99", "max", "server CPU per request",
                  "machine busy at start / load avg"], [
            *([f"`GET /v1/budgets/check` over loopback, {backend} (real service)",
               f"{r['p50'] * us:.0f} µs", f"{r['p90'] * us:.0f} µs",
               f"**{r['p99'] * us:.0f} µs**", f"{r['max'] * us:.0f} µs",
               f"{r['cpu'] * us:.0f} µs", f"{r['quiet']:.0%} / {r['load']:.2f}"]
              for backend, r in results.items()),
            *([f"baseline: `GET /healthz`, {backend} (same client and server)",
               f"{r['base_p50'] * us:.0f} µs", f"{r['base_p90'] * us:.0f} µs",
               f"{r['base_p99'] * us:.0f} µs", f"{r['base_max'] * us:.0f} µs",
               f"{r['base_cpu'] * us:.0f} µs", ""]
              for backend, r in results.items()),
            ["`BudgetTracker.check` + `orjson.dumps` (the handler's work, in process)",
             f"{inproc['check_p50'] * us:.1f} µs", f"{inproc['check_p90'] * us:.1f} µs",
             f"{inproc['check_p99'] * us:.1f} µs", "", "", ""],
        ]),
        f"The server's answer time without a Python client in it: `wrk -t1 -c1 --latency` "
        f"(one keep-alive connection, the next request sent when the answer arrived), "
        f"{WRK_SECONDS} s per round, check, `/healthz` and bare-handler rounds interleaved, "
        f"5,000 random check identities in turn; the same server, right after the blocks "
        f"above. Placement of each row: **unpinned** = our server, the bare server (started "
        f"now, in its own process, while ours keeps its background work) and wrk wherever the "
        f"kernel puts them (2 CPUs); **pinned** = then every thread of our server and of the "
        f"bare server moved to one CPU (`taskset -a -p -c N PID`; threads started later "
        f"inherit it) and wrk started under `taskset -c N` on the same CPU (N = the CPU "
        f"least busy over 1 s just before), so the one connection's ping-pong never wakes "
        f"a thread on the other CPU; during the pinned bare-handler rounds our server (idle "
        f"but for its refresh and flusher) is moved to the other CPU, as if the bare handler "
        f"ran alone; **loop thread** = only our server's main thread (its event loop) with wrk "
        f"on CPU N, its other threads moved to the other CPU before each round; **while "
        f"reports arrive** = pinned again, with {TRICKLE_BATCH / TRICKLE_EVERY:.0f} reports/s "
        f"posted by a thread of the bench (so every flush commits and every refresh re-reads "
        f"every kind of budget: an idle database costs a refresh one probe). Other "
        f"processes of the box still run on both CPUs. **host steal** = the share of that "
        f"CPU's time (the machine's, unpinned) the hypervisor gave to other guests during the "
        f"round (/proc/stat): on a shared VM a stall nobody in the guest caused.",
        md_table(["wrk -c1", "p50", "p90", "p99", "max", "requests", "host steal"], wrk_rows),
        md_table(["matching one report or check against 1,000 budgets", "µs"], [
            ["indexed (`SpecIndex.matching`)", f"{inproc['indexed'] * us:.1f}"],
            ["scan of every budget (baseline)", f"{inproc['scanned'] * us:.1f}"],
            ["ratio", f"{inproc['scanned'] / inproc['indexed']:.0f}x"],
            ["`on_durable` + the per-commit sum, per report (index + ledger, Decimal)",
             f"{inproc['durable'] * us:.1f}"],
        ]),
        f"Target `GET /v1/budgets/check` p99 < 1 ms locally with 1,000 budgets, judged on "
        f"wrk's record of every **pinned** round: {'**met**' if met else '**NOT met**'} in "
        f"this run ({verdict_pinned})"
        + (
            "; the bare handler, which does nothing, also missed 1 ms pinned in this run: the "
            "machine was too busy for this run to show the target either way"
            if any(v >= 1000 for v in worst("pinned_bare").values())
            else ""
        )
        + ". With the event loop's thread alone with wrk on its CPU and the server's other "
        f"threads (the SQLite driver, the WAL file thread, the state writer, executors: the "
        f"refresh and the flush) on the other CPU, the placement a latency-sensitive deployment "
        f"would choose: {'**met**' if loop_met else '**NOT met**'} ({verdict_loop})"
        + f". Pinned while reports arrive, reported, not judged: {verdict_trickle}"
        + ". Unpinned rounds, reported, not judged: "
        f"{verdict_free}"
        + (" — above 1 ms, as is the bare handler's (which does nothing) in the same "
           "placement: so on this box the unpinned rounds cannot show the check's own tail"
           if free_over and bare_over else "")
        + f". The http.client rows add the Python client's own time. The server CPU column "
        f"includes the background work in the same moments (budget refresh every {REFRESH} s "
        f"here, 30 s by default; the flusher every 2 s).",
    ])  # fmt: skip
    print(body)
    if args.write_results:
        replace_section("Budgets", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
