"""/metrics render benchmark: our renderer vs prometheus_client.generate_latest, same series.

For each size (default 1k, 10k, 100k samples) the same reports are observed twice: by our
`UsageMetrics` (+ `Exposition`, which appends the self-metrics registry) and by a
prometheus_client `CollectorRegistry` holding the same families as `Counter`s and `Histogram`s
with the same label names, label values, buckets and values. Both are rendered repeatedly; the
table shows median times and ours ÷ generate_latest. Before timing, the outputs of the
`--verify` sizes are parsed back with `prometheus_client.parser` (text 0.0.4) and the
OpenMetrics parser and must give the same families, types, help texts and sample values.

    python bench/metrics_render.py
    python bench/metrics_render.py --sizes 1000,10000,100000 --min-runs 5 --write-results
"""

from __future__ import annotations

import argparse
import gc
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import fmt_int, machine_note, md_table, now_utc, replace_section, report
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client import generate_latest as prom_text
from prometheus_client.openmetrics.exposition import generate_latest as prom_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.config import Settings
from exporter.live.exposition import Exposition
from exporter.live.usage_metrics import (
    COUNTER_FAMILIES,
    HISTOGRAM_FAMILIES,
    LabelCaps,
    UsageMetrics,
)
from exporter.selfmetrics import SelfMetrics
from exporter.usage import UsageReport

# ours never emits `_created` samples (exporter.selfmetrics drops them from its own registry):
# keep prometheus_client on the same footing so both render the same samples
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass
class Dataset:
    label_sets: int
    models: int
    samples: int
    usage: UsageMetrics
    exposition: Exposition
    registry: CollectorRegistry


def build(target_samples: int) -> Dataset:
    """Label sets (model x user, operation chat/embedding) sized so the usage families hold
    about `target_samples` samples: 8 counters per label set + histograms per model x op."""
    defaults = Settings()
    dur_bounds, ttft_bounds = defaults.duration_buckets, defaults.ttft_buckets
    hist_samples = (len(dur_bounds) + 3) + (len(ttft_bounds) + 3)  # buckets + Inf + sum + count
    label_sets = max(1, target_samples // len(COUNTER_FAMILIES))
    models = max(1, label_sets // 100)
    label_sets = max(1, (target_samples - models * hist_samples) // len(COUNTER_FAMILIES))
    self_metrics = SelfMetrics()
    usage = UsageMetrics(
        caps=LabelCaps(model=10**6, user=10**6, operation=100),
        duration_buckets=dur_bounds,
        ttft_buckets=ttft_bounds,
        on_overflow=self_metrics.overflow,
    )
    registry = CollectorRegistry(auto_describe=False)
    names = list(usage.label_names)
    counters = [Counter(n, h, names, registry=registry) for n, h in COUNTER_FAMILIES]
    hists = [
        Histogram(n, h, ["model", "operation"], buckets=b, registry=registry)
        for (n, h), b in zip(HISTOGRAM_FAMILIES, (dur_bounds, ttft_bounds), strict=True)
    ]
    hist_keys = set()
    for i in range(label_sets):
        raw = report(i, f"render-{i}")
        raw["model"] = f"model-{i % models:05d}"
        raw["provider"] = "bench"
        raw["user"] = f"user-{i // models:05d}"
        raw["cost_usd"] = round((i * 0.000137) % 3, 9) if i % 7 else None  # some unpriced
        r = UsageReport.model_validate(raw)
        if r.cost_usd is None:
            r.cost_usd = 0.0
        usage.observe(r)
        labels = (r.model, r.operation.value, r.user)
        children = [c.labels(*labels) for c in counters]
        children[0].inc()
        children[1].inc(1 if r.status.value != "success" else 0)
        children[2].inc(r.input_tokens)
        children[3].inc(r.output_tokens)
        children[4].inc(r.cached_input_tokens)
        children[5].inc(r.cache_creation_input_tokens)
        children[6].inc(r.reasoning_tokens)
        children[7].inc(r.cost_usd or 0)
        hist_keys.add(labels[:2])
        if r.duration_ms is not None:
            hists[0].labels(r.model, r.operation.value).observe(r.duration_ms / 1000)
        if r.ttft_ms is not None:
            hists[1].labels(r.model, r.operation.value).observe(r.ttft_ms / 1000)
    samples = label_sets * len(COUNTER_FAMILIES) + len(hist_keys) * hist_samples
    return Dataset(label_sets, models, samples, usage, Exposition(usage, self_metrics), registry)


# -- verification --------------------------------------------------------------------------------
def _samples(families: Any) -> tuple[dict[Any, float], dict[str, tuple[str, str]]]:
    values: dict[Any, float] = {}
    meta: dict[str, tuple[str, str]] = {}
    for fam in families:
        meta[fam.name] = (fam.type, fam.documentation)
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if key in values:
                raise AssertionError(f"duplicate sample {key}")
            values[key] = s.value
    return values, meta


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12))


def verify(ds: Dataset) -> list[str]:
    """Ours and prometheus_client must parse to the same families and sample values."""
    checks = []
    for fmt, ours_text, theirs_text, parse in (
        ("text 0.0.4", ds.usage.render(False), prom_text(ds.registry).decode(), parse_text),
        (
            "OpenMetrics",
            ds.usage.render(True) + "# EOF\n",
            prom_openmetrics(ds.registry).decode(),  # type: ignore[no-untyped-call]
            parse_openmetrics,
        ),
    ):
        ours, ours_meta = _samples(parse(ours_text))
        theirs, theirs_meta = _samples(parse(theirs_text))
        if ours_meta != theirs_meta:
            diff = set(ours_meta.items()) ^ set(theirs_meta.items())
            raise AssertionError(f"{fmt}: families differ: {sorted(diff)[:5]}")
        # ours sums costs and durations exactly; prometheus_client adds binary floats, so sums
        # may differ in the last digits (ours is the one without the noise)
        diff = {k for k in ours.keys() | theirs.keys() if not _same(ours.get(k), theirs.get(k))}
        if diff:
            sample = sorted(diff)[:3]
            raise AssertionError(
                f"{fmt}: {len(diff)} samples differ, e.g. "
                + "; ".join(f"{k}: ours {ours.get(k)} vs {theirs.get(k)}" for k in sample)
            )
        checks.append(f"{fmt}: {len(ours_meta)} families, {fmt_int(len(ours))} samples equal")
    # the full /metrics body: same usage samples, plus only the exporter's own families
    full, _ = _samples(parse_text(ds.exposition.render(False).decode()))
    reference, _ = _samples(parse_text(prom_text(ds.registry).decode()))
    usage_part = {k: v for k, v in full.items() if k in reference}
    extra = {k[0] for k in full.keys() - reference.keys()}
    if (
        usage_part.keys() != reference.keys()
        or any(not _same(v, reference[k]) for k, v in usage_part.items())
        or any(not n.startswith(("llm_usage_", "llm_budget_")) for n in extra)
    ):
        raise AssertionError("Exposition.render differs from the usage families + self-metrics")
    checks.append(
        f"Exposition.render (text): the same {fmt_int(len(reference))} usage samples + "
        f"{fmt_int(len(full) - len(reference))} self-metric samples"
    )
    return checks


# -- timing --------------------------------------------------------------------------------------
def median_time(fn: Callable[[], Any], min_runs: int, min_time: float, max_runs: int) -> float:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - started < min_time
    ):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(ds: Dataset, args: argparse.Namespace) -> dict[str, float]:
    usage, expo = ds.usage, ds.exposition

    def uncached(openmetrics: bool) -> Callable[[], bytes]:
        def run() -> bytes:
            usage.generation += 1  # as if a report arrived since the last scrape
            return expo.render(openmetrics)

        return run

    cases: dict[str, Callable[[], Any]] = {
        "ours_usage": lambda: usage.render(False).encode(),
        "ours_text": uncached(False),
        "ours_text_cached": lambda: expo.render(False),
        "prom_text": lambda: prom_text(ds.registry),
        "ours_om": uncached(True),
        "prom_om": lambda: prom_openmetrics(ds.registry),  # type: ignore[no-untyped-call]
    }
    expo.render(False)
    return {
        name: median_time(fn, args.min_runs, args.min_time, args.max_runs)
        for name, fn in cases.items()
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}" if seconds < 0.01 else f"{seconds * 1000:.1f}"


def render_results(
    args: argparse.Namespace,
    rows: list[tuple[Dataset, dict[str, float]]],
    checks: dict[int, list[str]],
) -> str:
    table = []
    for ds, t in rows:
        ours, prom = t["ours_text"], t["prom_text"]
        table.append(
            (
                fmt_int(ds.samples),
                fmt_int(ds.label_sets),
                _ms(t["prom_text"]),
                _ms(t["ours_usage"]),
                _ms(t["ours_text"]),
                f"**{ours / prom:.3f}** (1/{prom / ours:.0f})",
                _ms(t["ours_text_cached"]),
                _ms(t["prom_om"]),
                _ms(t["ours_om"]),
                f"{t['ours_om'] / t['prom_om']:.3f}",
                f"{prom / ds.samples * 1e6:.2f} / {ours / ds.samples * 1e6:.3f}",
            )
        )
    big_ds, big = rows[-1]
    ratio = big["ours_text"] / big["prom_text"]
    verified = "\n".join(f"- {fmt_int(n)} samples, {c}" for n, cs in checks.items() for c in cs)
    return (
        "Same reports observed by our `UsageMetrics` and by a prometheus_client "
        "`CollectorRegistry` (8 `Counter`s with labels model, operation, user; 2 `Histogram`s "
        "with labels model, operation and the default buckets; `_created` samples disabled on "
        "both sides). Median wall time of ≥ "
        f"{args.min_runs} renders (and ≥ {args.min_time:g} s per case), `gc.collect()` before "
        "each. *ours /metrics* is `Exposition.render`: the usage families plus the "
        "self-metrics registry (which prometheus_client renders), with the cache defeated as if "
        "a report had arrived since the last scrape; *cached* is a scrape with no new report. "
        "gzip (`Accept-Encoding: gzip`) is not included on either side.\n\n"
        + md_table(
            (
                "samples",
                "label sets",
                "generate_latest ms",
                "ours usage render ms",
                "ours /metrics ms",
                "ours ÷ generate_latest",
                "ours cached ms",
                "OpenMetrics: prometheus_client ms",
                "OpenMetrics: ours ms",
                "OpenMetrics ratio",
                "µs/sample: generate_latest / ours",
            ),
            table,
        )
        + f"\n\nTarget at {fmt_int(big_ds.samples)} samples: ours ≤ 1/10 of generate_latest → "
        f"ratio **{ratio:.3f}** → {'MET' if ratio <= 0.1 else 'MISSED'}.\n\n"
        "Fairness check (parsed back with `prometheus_client.parser` and the OpenMetrics "
        "parser; same family names, types, help, label sets and values):\n\n" + verified + "\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="target sample counts")
    p.add_argument("--verify", default="1000", help="sizes whose outputs are parse-compared")
    p.add_argument("--min-runs", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per case at least")
    p.add_argument("--max-runs", type=int, default=500)
    p.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    verify_sizes = {int(x) for x in args.verify.split(",") if x.strip()}

    started = now_utc()
    rows = []
    checks: dict[int, list[str]] = {}
    for size in sizes:
        print(f"{size} samples: building …", file=sys.stderr)
        ds = build(size)
        if size in verify_sizes:
            checks[ds.samples] = verify(ds)
            for c in checks[ds.samples]:
                print(f"  verified {c}", file=sys.stderr)
        t = measure(ds, args)
        print(
            f"  {ds.samples} samples: generate_latest {t['prom_text'] * 1000:.1f} ms, "
            f"ours {t['ours_text'] * 1000:.2f} ms ({t['ours_text'] / t['prom_text']:.3f})",
            file=sys.stderr,
        )
        rows.append((ds, t))
        del ds
        gc.collect()

    command = "python " + " ".join(
        shlex.quote(a) for a in ["bench/metrics_render.py", *sys.argv[1:]]
    )
    text = (
        f"Run {started} with `{command}` on {machine_note()}. One process, no HTTP; "
        "both renderers run on the same core in the same run, so the ratio is the result "
        "(absolute times on this shared machine are noise).\n\n"
        + render_results(args, rows, checks)
    )
    print(text)
    if args.write_results:
        replace_section("/metrics render", text)
        print("updated bench/RESULTS.md (## /metrics render)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
