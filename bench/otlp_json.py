"""OTLP JSON decoding on the event loop: ours (walking orjson's dicts) vs protobuf's ParseDict.

The old /v1/traces path converted hex ids to base64 and ran protobuf's pure-Python
`json_format.ParseDict` on the event loop before reading the spans; ours walks the dicts
orjson returns and keeps only the attributes usage needs. Both run here on the same bodies in
the same process, and each call's duration is the event-loop stall it causes (nothing else
runs while it does). Bounded: `--spans` spans per body, `--repeat` runs, best taken.

    python bench/otlp_json.py [--spans 10000] [--repeat 5] [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from common import machine_note, now_utc, replace_section
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from exporter.ingest.otlp import usage_items
from exporter.ingest.otlp_decode import parse_json, parse_protobuf


def body(spans: int) -> bytes:
    """An export as the OTel JS/collector JSON exporters send it: hex ids, int64 as strings,
    each span with the attributes a GenAI instrumentation sets (plus some it does not need)."""

    def kv(key: str, value: Any) -> dict[str, Any]:
        if isinstance(value, int):
            return {"key": key, "value": {"intValue": str(value)}}
        return {"key": key, "value": {"stringValue": value}}

    out = []
    for i in range(spans):
        attrs = [
            kv("gen_ai.operation.name", "chat"),
            kv("gen_ai.provider.name", "openai"),
            kv("gen_ai.request.model", "gpt-4o-mini"),
            kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
            kv("gen_ai.response.id", f"chatcmpl-{i:012d}"),
            kv("gen_ai.usage.input_tokens", 1000 + i % 500),
            kv("gen_ai.usage.output_tokens", 100 + i % 50),
            kv("gen_ai.usage.cache_read.input_tokens", 512),
            kv("server.address", "api.openai.com"),
            kv("server.port", 443),
            kv("http.response.status_code", 200),
            kv("user.id", f"user-{i % 100}"),
        ]
        out.append({
            "traceId": f"{i + 1:032x}", "spanId": f"{i + 1:016x}", "name": "chat gpt-4o-mini",
            "kind": 3, "startTimeUnixNano": str(1_767_225_600_000_000_000 + i),
            "endTimeUnixNano": str(1_767_225_601_000_000_000 + i), "attributes": attrs,
            "status": {},
        })  # fmt: skip
    resource = {"attributes": [kv("service.name", "bench")]}
    doc = {"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": out}]}]}
    return orjson.dumps(doc)


def parse_dict_path(data: bytes) -> int:
    """The old path: orjson → hex ids to base64 → ParseDict → protobuf spans → items."""
    doc = orjson.loads(data)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    message = ExportTraceServiceRequest()
    json_format.ParseDict(doc, message, ignore_unknown_fields=True)
    # the spans were then read from the message as the protobuf path still does
    resources = parse_protobuf(message.SerializeToString())
    return len(usage_items(resources)[0])


def ours(data: bytes) -> int:
    return len(usage_items(parse_json(data))[0])


async def _stall_while(work: Callable[[], Any]) -> float:
    """The longest gap a 1 ms ticker sees on the loop while `work()` is awaited."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await work()
    done = True
    await task
    return worst


def loop_stall(data: bytes, threaded: bool) -> float:
    """What the handler does with a body of this size: inline, or in `asyncio.to_thread`."""

    async def inline() -> None:
        ours(data)

    async def threaded_work() -> None:
        await asyncio.to_thread(ours, data)

    return asyncio.run(_stall_while(threaded_work if threaded else inline))


def best(fn: Callable[[bytes], int], data: bytes, repeat: int, want: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        assert fn(data) == want
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    started = now_utc()
    rows = []
    for n in (1_000, args.spans):
        data = body(n)
        old = best(parse_dict_path, data, args.repeat, n)
        new = best(ours, data, args.repeat, n)
        thread = min(loop_stall(data, True) for _ in range(args.repeat))
        rows.append((n, len(data), old, new, thread))
        print(f"  {n} spans: ParseDict {old * 1000:.0f} ms, ours {new * 1000:.0f} ms",
              file=sys.stderr)  # fmt: skip
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/otlp_json.py", *sys.argv[1:]])
    lines = [
        f"Run {started} with `{command}` on {machine_note()}. One process, no HTTP; each figure "
        "is the best of the runs and is the event-loop stall one POST /v1/traces of that body "
        "causes while it is decoded into usage items; the last column is the longest gap a 1 ms "
        "ticker on the loop saw while the same decode ran in `asyncio.to_thread` (it holds the "
        "GIL, but the loop gets it back every switch interval).",
        "",
        "| spans | body | ParseDict path (before) | ours, inline | ratio | ours, loop stall with "
        "the body decoded in a thread (what /v1/traces does above 256 KiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, size, old, new, thread in rows:
        lines.append(f"| {n:,} | {size / 1e6:.1f} MB | {old * 1000:.0f} ms | {new * 1000:.0f} ms "
                     f"| {old / new:.1f}x | {thread * 1000:.0f} ms |")  # fmt: skip
    lines += [
        "",
        "What remains of the threaded stall is `orjson.loads` of the whole body: one C call "
        "that keeps the GIL (this shared box is loaded; absolute times are noise).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        replace_section("OTLP JSON decoding", text)
        print("updated bench/RESULTS.md (## OTLP JSON decoding)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
