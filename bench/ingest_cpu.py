"""CPU per report of the ingest path alone (no HTTP): body bytes → validated → WAL → counted.

Each measurement runs in a fresh process (`--child`): the app as `create_app` builds it, its
WAL opened with `os` durability (no fsync) and the flusher never started; bodies as
bench/limits.py sends them (common.body_templates, a unique request id each). 1-report bodies
16 at a time, 100-report bodies 4 at a time; the best of 5 rounds. `--before-src DIR` runs the
same in a process importing DIR (PYTHONSAFEPATH), alternating with this tree.

    python bench/ingest_cpu.py --before-src /tmp/before --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import body_templates

SHAPES = ((1, 16, 4000), (100, 4, 200))  # reports per body, concurrent bodies, bodies per round


async def _measure(per: int, conc: int, total: int) -> float:
    from exporter.app import create_app
    from exporter.appkeys import INGESTOR, WAL
    from exporter.config import Settings
    from exporter.ingest.body import parse_items

    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="ingest-cpu-")), wal_durability="os")
    app = create_app(settings)
    ingestor, wal = app[INGESTOR], app[WAL]
    await wal.open_async()
    wal.start()
    templates = body_templates(per)
    fast = hasattr(ingestor, "prepare_canonical")  # a tree before the fast path has none

    async def one(i: int) -> None:
        body = templates[i % len(templates)].replace(b"@@RID@@", b"r%d" % i)
        prepared: Any = ingestor.prepare_canonical(body.strip(), 1000) if fast else None
        if prepared is None:
            parsed = parse_items(body, "application/json", 1000)
            if fast:
                prepared = ingestor.prepare(parsed.items, parsed.line_errors)
            else:
                result = await ingestor.ingest(parsed.items, parsed.line_errors)
                assert result.accepted == per, result
                return
        result = await ingestor.accept(*prepared)
        assert result.accepted == per, result

    for i in range(200):  # warm: price cache, series, code paths
        await one(i)
    best = float("inf")
    for rnd in range(5):
        base = 10_000 + rnd * total
        t0 = time.process_time()
        for k in range(0, total, conc):
            await asyncio.gather(*(one(base + k + j) for j in range(conc)))
        best = min(best, (time.process_time() - t0) / (total * per) * 1e6)
    await wal.close()
    return best


def _child(per: int, conc: int, total: int, src: str | None) -> float:
    env = dict(os.environ)
    if src:
        env.update(PYTHONPATH=f"{src}{os.pathsep}{Path(__file__).parent}", PYTHONSAFEPATH="1")
    cmd = [sys.executable, __file__, "--child", f"{per},{conc},{total}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before-src", help="also measure this source tree, alternating")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        per, conc, total = (int(x) for x in args.child.split(","))
        print(asyncio.run(_measure(per, conc, total)))
        return 0
    trees = [("this tree", None)] + ([("before", args.before_src)] if args.before_src else [])
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    print("| tree | body | CPU µs/report, best of 5 per process |")
    print("|---|---|---|")
    for per, conc, total in SHAPES:
        got: dict[str, list[float]] = {name: [] for name, _ in trees}
        for rnd in range(args.rounds):
            for name, src in trees if rnd % 2 == 0 else trees[::-1]:
                got[name].append(_child(per, conc, total, src))
        for name, values in got.items():
            shape = f"{per} report{'s' if per > 1 else ''}/body, {conc} at a time"
            print(f"| {name} | {shape} | {' / '.join(f'{v:.1f}' for v in values)} |")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
