"""A batch observed at once counts exactly what observing its reports one by one counts."""

from __future__ import annotations

from decimal import Decimal

import pytest

from exporter.live.usage_metrics import LabelCaps, UsageMetrics
from exporter.usage import UsageReport


def _reports() -> list[UsageReport]:
    out = []
    for i in range(600):
        out.append(
            UsageReport(
                request_id=f"r-{i}",
                model=f"model-{i % 13}",
                operation=["chat", "embedding", "responses"][i % 3],
                user=f"user-{i % 37}",
                provider=["openai", "anthropic"][i % 2],
                input_tokens=100 + i,
                output_tokens=i % 50,
                cached_input_tokens=i % 7,
                reasoning_tokens=i % 3 if i % 50 >= 3 else 0,
                status=["success", "error", "cancelled", "success"][i % 4],
                duration_ms=None if i % 5 == 0 else 10.0 * (i % 300),
                ttft_ms=None if i % 7 == 0 else 1.5 * (i % 90),
                cost_usd=None if i % 6 == 0 else Decimal(i) / 7000,
            )
        )
    return out


@pytest.mark.parametrize("extra", [(), ("provider",)])
def test_observe_many_counts_what_observe_counts(extra: tuple[str, ...]) -> None:
    def metrics() -> UsageMetrics:
        # small caps: overflow folding takes the same path both ways
        return UsageMetrics(
            extra_labels=extra,
            caps=LabelCaps(model=9, user=30, series=200),
            duration_buckets=[0.5, 1.0, 2.5],
            ttft_buckets=[0.01, 0.05, 0.1],
            on_overflow=lambda _label: None,
        )

    one, many = metrics(), metrics()
    reports = _reports()
    for r in reports:
        one.observe(r)
    for i in range(0, len(reports), 100):
        many.observe_many(reports[i : i + 100])
    assert many.render(openmetrics=False) == one.render(openmetrics=False)
    assert many.generation == one.generation == len(reports)
    # and against sums computed here: every request is in one series
    text = many.render(openmetrics=False)
    counted = sum(
        int(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llm_requests_total{")
    )
    assert counted == len(reports)
