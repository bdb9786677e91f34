"""RSS per live label set, and a /metrics scrape's peak RSS against the steady RSS.

Each size runs in a fresh subprocess (so one size's freed memory does not hide the next's):
`UsageMetrics` as the app builds it (default settings, `max_series` raised out of the way)
observes `--sizes` distinct label sets (model x user, every report with duration and ttft, as
a gateway sends them); RSS is read from /proc/self/statm before and after (`gc.collect()`
first). Then one scrape (`Exposition.response`, text format, with and without gzip) runs
after resetting the peak (`/proc/self/clear_refs` = 5) and VmHWM gives its peak RSS.

    python bench/series_memory.py                  # prints markdown
    python bench/series_memory.py --write-results  # ...and replaces "## Series memory"
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import fmt_int, machine_note, md_table, now_utc, replace_section

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


async def scrape(exposition: Any, encoding: str) -> int:
    """One /metrics answer as the handler gives it to aiohttp: bytes, or pieces it writes."""
    body, _ = await exposition.response("text/plain", encoding)
    if isinstance(body, bytes):
        return len(body)
    return sum([len(piece) async for piece in body])


def child(n: int) -> dict[str, float]:
    from exporter.app import _usage_metrics
    from exporter.config import Settings
    from exporter.live.exposition import Exposition
    from exporter.selfmetrics import SelfMetrics
    from exporter.usage import UsageReport

    settings = Settings(max_series=n + 1, max_users=n, max_models=1000)
    self_metrics = SelfMetrics()
    usage = _usage_metrics(settings, self_metrics)
    exposition = Exposition(usage, self_metrics)
    models = 50
    gc.collect()
    before = rss()
    for i in range(n):
        r = UsageReport(request_id=f"r{i}", model=f"model-{i % models}", user=f"user-{i}",
                        input_tokens=100 + i % 7, output_tokens=10, cost_usd=0.001,
                        duration_ms=1200.0, ttft_ms=150.0)  # fmt: skip
        usage.observe(r)
    assert len(usage) == n, len(usage)
    gc.collect()
    steady = rss()
    out: dict[str, float] = {"n": n, "before": before, "steady": steady}
    for name, encoding in (("plain", ""), ("gzip", "gzip")):
        gc.collect()
        base = rss()
        reset_peak()
        out[f"{name}_bytes"] = asyncio.run(scrape(exposition, encoding))
        out[f"{name}_peak"] = hwm()
        out[f"{name}_base"] = base
        usage.generation += 1  # the next scrape renders again, as after a new report
    gc.collect()
    out["after"] = rss()
    return out


def render(results: list[dict[str, float]]) -> str:
    rows = []
    for r in results:
        n = r["n"]
        per = (r["steady"] - r["before"]) / n
        rows.append([
            fmt_int(n), f"{r['steady'] / 2**20:.0f}", f"{per:.0f}",
            f"{r['plain_bytes'] / 2**20:.1f}", f"{r['plain_peak'] / 2**20:.0f}",
            f"**{r['plain_peak'] / r['steady']:.2f}×**", f"{r['gzip_peak'] / 2**20:.0f}",
            f"**{r['gzip_peak'] / r['steady']:.2f}×**", f"{r['after'] / 2**20:.0f}",
        ])  # fmt: skip
    table = md_table(["label sets", "steady RSS MiB", "RSS bytes / label set",
                      "body MiB (text)", "scrape peak MiB", "peak ÷ steady",
                      "gzip scrape peak MiB", "peak ÷ steady (gzip)", "RSS after scrapes MiB"],
                     rows)  # fmt: skip
    cmd = "python bench/series_memory.py " + " ".join(sys.argv[1:])
    return (
        f"`{cmd.strip()}` — {now_utc()}; {machine_note()}; load average "
        f"{os.getloadavg()[0]:.2f}. One fresh process per size; 50 models x N users, every "
        "report with duration and ttft (so the histograms exist too); RSS from "
        "/proc/self/statm after `gc.collect()`, scrape peak from VmHWM after resetting it.\n\n"
        f"{table}\n\nTargets (issue #16): ≤ 1 KB of RSS per live label set at 100k, scrape "
        "peak ≤ 2× steady RSS.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        print(f"  {n:,} label sets …", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    text = render(results)
    print(text)
    if args.write_results:
        replace_section("Series memory", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
