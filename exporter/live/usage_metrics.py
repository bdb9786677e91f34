"""Usage counters and histograms, rendered from pre-rendered label strings.

`prometheus_client.generate_latest` spends ~14 µs per sample and blocks the event loop; here a
series renders its label string once, at creation, and a scrape is a string join.

Costs and histogram sums accumulate exactly, in integers (cost in the store's quantum of
1e-10 USD, seconds in nanoseconds), and render as the shortest repr of the correctly rounded
float: `0.00042`, never `0.00041999999999999996`.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter

from prometheus_client.utils import floatToGoString

from exporter.live.labels import OVERFLOW, BoundedLabel, escape
from exporter.money import UNITS_PER_USD, cost_units
from exporter.usage import Status, UsageReport

#: (metric base name, help); the order is the order of `Series.values`.
COUNTER_FAMILIES: tuple[tuple[str, str], ...] = (
    ("llm_requests", "Model calls reported."),
    ("llm_request_errors", "Model calls that ended in error or were cancelled."),
    ("llm_input_tokens", "Input tokens, cache reads and writes included."),
    ("llm_output_tokens", "Output tokens, reasoning included."),
    ("llm_cached_input_tokens", "Input tokens read from a prompt cache."),
    ("llm_cache_creation_input_tokens", "Input tokens written to a prompt cache."),
    ("llm_reasoning_tokens", "Reasoning tokens (part of output)."),
    ("llm_cost_usd", "Cost in US dollars."),
)
HISTOGRAM_FAMILIES: tuple[tuple[str, str], ...] = (
    ("llm_request_duration_seconds", "Model call duration in seconds."),
    ("llm_time_to_first_token_seconds", "Time to first token in seconds."),
)
BASE_LABELS = ("model", "operation", "user")
_NOT_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_]")


def tag_label(key: str) -> str:
    """The label name of a promoted tag: `tag_` + the key with other characters as `_`."""
    return "tag_" + _NOT_LABEL_CHARS.sub("_", key)


_COST = len(COUNTER_FAMILIES) - 1
#: series per rendered piece (~1 MB of text): bounds a scrape's transient memory
CHUNK_SERIES = 10_000
_NS_PER_S = 10**9


def exact_text(units: int, per_unit: int) -> str:
    """`units / per_unit` as the shortest repr of the nearest float (int / int rounds once)."""
    return repr(units / per_unit)


class Series:
    __slots__ = ("labels", "values")

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.values: list[int] = [0, 0, 0, 0, 0, 0, 0, 0]  # cost in units of 1e-10 USD


class Histogram:
    __slots__ = ("buckets", "count", "labels", "sum_ns")

    def __init__(self, labels: str, n_buckets: int) -> None:
        self.labels = labels
        self.buckets = [0] * n_buckets  # per-bucket, made cumulative at render
        self.count = 0
        self.sum_ns = 0


@dataclass(frozen=True)
class LabelCaps:
    model: int = 500
    operation: int = 50
    user: int = 2000
    provider: int = 100
    team: int = 500
    tag: int = 100  # values per promoted tag
    #: label sets in total (the product of the per-label caps is far larger); past it, new
    #: label sets fold into the one all-`__other__` series. ~0.75 KB each (bench/RESULTS.md)
    series: int = 100_000


_observed = itemgetter("model", "operation", "user", "status", "input_tokens", "output_tokens",
                       "cached_input_tokens", "cache_creation_input_tokens", "reasoning_tokens",
                       "cost_usd", "duration_ms", "ttft_ms")  # fmt: skip


def _label_string(names: Sequence[str], values: Iterable[str]) -> str:
    return ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True))


class UsageMetrics:
    """The usage families for one process. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        *,
        extra_labels: Sequence[str] = (),
        caps: LabelCaps = LabelCaps(),
        duration_buckets: Sequence[float],
        ttft_buckets: Sequence[float],
        on_overflow: Callable[[str], None],
        promoted_tags: Sequence[str] = (),
    ) -> None:
        tag_names = tuple(tag_label(k) for k in promoted_tags)
        self.label_names = (*BASE_LABELS, *extra_labels, *tag_names)
        self._hist_label_names = ("model", "operation")
        self._bounders = tuple(
            BoundedLabel(name, getattr(caps, name) if name in BASE_LABELS + tuple(extra_labels)
                         else caps.tag, on_overflow)
            for name in self.label_names
        )  # fmt: skip
        self._tags = tuple(promoted_tags)
        self._max_series = caps.series
        self._on_overflow = on_overflow
        self._overflow_key = (OVERFLOW,) * len(self.label_names)
        self._series: dict[tuple[str, ...], Series] = {}
        self._raw_index: dict[tuple[str, ...], Series] = {}
        self._raw_index_cap = 8 * caps.user + 10_000
        self._bucket_bounds = (tuple(duration_buckets), tuple(ttft_buckets))
        self._hists: tuple[dict[tuple[str, str], Histogram], ...] = ({}, {})
        self._hist_index: tuple[dict[tuple[str, str], Histogram], ...] = ({}, {})
        self._extra = tuple(extra_labels)
        self.generation = 0  # bumps on every change; lets /metrics reuse its last render

    def _series_for(self, raw: tuple[str, ...]) -> Series:
        series = self._raw_index.get(raw)
        if series is not None:
            return series
        bounded = tuple(b(v) for b, v in zip(self._bounders, raw, strict=True))
        series = self._series.get(bounded)
        if series is None and len(self._series) >= self._max_series:
            self._on_overflow("series")
            bounded = self._overflow_key
            series = self._series.get(bounded)
        if series is None:
            series = Series(_label_string(self.label_names, bounded))
            self._series[bounded] = series
        if len(self._raw_index) < self._raw_index_cap:
            self._raw_index[raw] = series
        return series

    def __len__(self) -> int:
        """Live counter label sets."""
        return len(self._series)

    def observe(self, r: UsageReport) -> None:
        raw: tuple[str, ...] = (r.model, r.operation.value, r.user)
        if self._extra:
            raw += tuple(getattr(r, name) for name in self._extra)
        if self._tags:
            tags = r.tags or {}
            raw += tuple(tags.get(key, "") for key in self._tags)
        series = self._series_for(raw)
        v = series.values
        v[0] += 1
        if r.status is not Status.SUCCESS:
            v[1] += 1
        v[2] += r.input_tokens
        v[3] += r.output_tokens
        v[4] += r.cached_input_tokens
        v[5] += r.cache_creation_input_tokens
        v[6] += r.reasoning_tokens
        if r.cost_usd:
            v[_COST] += cost_units(r.cost_usd)
        if r.duration_ms is not None or r.ttft_ms is not None:
            # histogram labels are the bounded model and operation of the counter series
            key = (raw[0], raw[1])
            if r.duration_ms is not None:
                self._observe_hist(0, key, r.duration_ms)
            if r.ttft_ms is not None:
                self._observe_hist(1, key, r.ttft_ms)
        self.generation += 1

    def observe_many(self, reports: Iterable[UsageReport]) -> None:
        """`observe` for each report, as one loop: the fields read through one itemgetter,
        series and histograms found through the same indexes, one generation bump."""
        if self._extra or self._tags:
            for r in reports:
                self.observe(r)
            return
        raw_index, series_for = self._raw_index, self._series_for
        bounds_d, bounds_t = self._bucket_bounds
        index_d, index_t = self._hist_index
        success = Status.SUCCESS
        n = 0
        for r in reports:
            n += 1
            (model, op, user, status, inp, out, cached, creation, reasoning, cost, dur,
             ttft) = _observed(r.__dict__)  # fmt: skip
            # a StrEnum member hashes and compares as its value: the index finds the series
            # without `.value` (an enum property, ~0.3 µs); a new series is made from the str
            raw = (model, op, user)
            series = raw_index.get(raw)
            if series is None:
                raw = (model, op.value, user)
                series = series_for(raw)
            v = series.values
            v[0] += 1
            if status is not success:
                v[1] += 1
            v[2] += inp
            v[3] += out
            v[4] += cached
            v[5] += creation
            v[6] += reasoning
            if cost:
                v[_COST] += cost_units(cost)
            if dur is not None:
                hist = index_d.get((model, op))
                if hist is None:
                    self._observe_hist(0, (model, op.value), dur)
                else:
                    hist.buckets[bisect_left(bounds_d, dur / 1000)] += 1
                    hist.count += 1
                    hist.sum_ns += round(dur * 1_000_000)
            if ttft is not None:
                hist = index_t.get((model, op))
                if hist is None:
                    self._observe_hist(1, (model, op.value), ttft)
                else:
                    hist.buckets[bisect_left(bounds_t, ttft / 1000)] += 1
                    hist.count += 1
                    hist.sum_ns += round(ttft * 1_000_000)
        self.generation += n

    def _observe_hist(self, which: int, key: tuple[str, str], millis: float) -> None:
        index = self._hist_index[which]
        hist = index.get(key)
        bounds = self._bucket_bounds[which]
        if hist is None:
            hists = self._hists[which]
            bounded = (self._bounders[0](key[0]), self._bounders[1](key[1]))
            hist = hists.get(bounded)
            if hist is None:
                hist = Histogram(_label_string(self._hist_label_names, bounded), len(bounds) + 1)
                hists[bounded] = hist
            if len(index) < self._raw_index_cap:
                index[key] = hist
        hist.buckets[bisect_left(bounds, millis / 1000)] += 1
        hist.count += 1
        hist.sum_ns += round(millis * 1_000_000)  # ≤ 6.1e14 < 2**53: exact to the ns

    def render(self, openmetrics: bool) -> str:
        return "".join(chain.from_iterable(self._parts(openmetrics)))

    def render_chunks(self, openmetrics: bool) -> Iterator[bytes]:
        """The same text as `render`, encoded in pieces of ~CHUNK_SERIES series per family,
        so a large scrape never holds the whole body as lines, as a str and as bytes at once.
        The label sets are a snapshot taken at the first piece; values are read as it goes."""
        for part in self._parts(openmetrics):
            yield "".join(part).encode()

    def _parts(self, openmetrics: bool) -> Iterator[list[str]]:
        series = list(self._series.values())
        step = CHUNK_SERIES
        for i, (name, help_text) in enumerate(COUNTER_FAMILIES):
            if openmetrics:
                yield [f"# TYPE {name} counter\n# HELP {name} {help_text}\n"]
            else:
                yield [f"# HELP {name}_total {help_text}\n# TYPE {name}_total counter\n"]
            prefix = f"{name}_total{{"
            for j in range(0, len(series), step):
                part = series[j : j + step]
                if i == _COST:
                    yield [
                        f"{prefix}{s.labels}}} {exact_text(s.values[i], UNITS_PER_USD)}\n"
                        for s in part
                    ]
                else:
                    yield [f"{prefix}{s.labels}}} {s.values[i]}\n" for s in part]
        for (name, help_text), hists, bounds in zip(
            HISTOGRAM_FAMILIES, self._hists, self._bucket_bounds, strict=True
        ):
            out: list[str] = []
            if openmetrics:
                out.append(f"# TYPE {name} histogram\n# HELP {name} {help_text}\n")
            else:
                out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
            les = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
            for k, hist in enumerate(list(hists.values()), 1):
                cumulative = 0
                for le, n in zip(les, hist.buckets, strict=True):
                    cumulative += n
                    out.append(f'{name}_bucket{{{hist.labels},le="{le}"}} {cumulative}\n')
                out.append(f"{name}_sum{{{hist.labels}}} {exact_text(hist.sum_ns, _NS_PER_S)}\n")
                out.append(f"{name}_count{{{hist.labels}}} {hist.count}\n")
                if k % step == 0:
                    yield out
                    out = []
            yield out
