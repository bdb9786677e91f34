"""The total series cap: label sets past `max_series` fold into one all-`__other__` series;
a large /metrics body is streamed in pieces instead of held (and cached) whole.

Each label's own cap bounds that label, not their product (500 models x 2,000 users); the total
cap bounds the product. Counts are compared with sums computed here from the reports sent.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import MakeClient
from helpers import parse_metrics, report, scrape, select, total, value

from exporter.live.exposition import LARGE_SERIES


async def test_label_sets_past_max_series_fold_into_other(make_client: MakeClient) -> None:
    client = await make_client(max_series=4, max_users=100, max_models=100)
    sent: list[dict[str, Any]] = [
        report(model=f"model-{i % 3}", user=f"user-{i}", input_tokens=10 + i) for i in range(10)
    ]
    sent.append(report(model="model-0", user="user-0", input_tokens=7))  # an existing set
    resp = await client.post("/v1/usage", json=sent)
    assert resp.status == 202, await resp.text()

    m = await scrape(client)
    series = select(m, "llm_requests_total")
    labels = [dict(k[1]) for k in series]
    kept = [(d["model"], d["user"]) for d in labels if d["user"] != "__other__"]
    # the first four distinct label sets keep their own series, in arrival order
    first = list(dict.fromkeys((r["model"], r["user"]) for r in sent))[:4]
    assert sorted(kept) == sorted(first)
    other = [d for d in labels if d["user"] == "__other__"]
    assert other == [{"model": "__other__", "operation": "__other__", "user": "__other__"}]
    folded = [r for r in sent if (r["model"], r["user"]) not in first]
    assert value(m, "llm_requests_total", **other[0]) == len(folded)
    assert value(m, "llm_input_tokens_total", **other[0]) == sum(r["input_tokens"] for r in folded)
    assert total(m, "llm_input_tokens_total") == sum(r["input_tokens"] for r in sent)
    assert value(m, "llm_usage_label_overflow_total", label="series") == len(folded)
    assert value(m, "llm_requests_total", model="model-0", operation="chat", user="user-0") == 2


async def test_series_cap_default_leaves_small_deployments_alone(make_client: MakeClient) -> None:
    client = await make_client()
    sent = [report(model=f"m-{i % 5}", user=f"u-{i}") for i in range(200)]
    resp = await client.post("/v1/usage", json=sent)
    assert resp.status == 202
    m = await scrape(client)
    assert len(select(m, "llm_requests_total")) == len({(r["model"], r["user"]) for r in sent})
    assert total(m, "llm_usage_label_overflow_total", label="series") == 0


async def test_a_large_scrape_is_streamed_in_pieces_and_adds_up(make_client: MakeClient) -> None:
    n = LARGE_SERIES + 500
    client = await make_client(max_users=n, max_batch_items=n)
    sent = [
        report(model=f"m-{i % 7}", user=f"u-{i}", input_tokens=1 + i % 13, duration_ms=10.0 * i)
        for i in range(n)
    ]
    resp = await client.post("/v1/usage", json=sent)
    assert resp.status == 202, await resp.text()
    for encoding in ("identity", "gzip"):
        resp = await client.get("/metrics", headers={"Accept-Encoding": encoding})
        assert resp.status == 200
        # no Content-Length: aiohttp writes the pieces as they are rendered
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in resp.headers
        assert resp.headers.get("Content-Encoding", "identity") == encoding
        m = parse_metrics(await resp.text())  # the client undoes gzip
        assert len(select(m, "llm_requests_total")) == n
        assert total(m, "llm_input_tokens_total") == sum(r["input_tokens"] for r in sent)
        assert total(m, "llm_request_duration_seconds_count") == n
        assert total(m, "llm_request_duration_seconds_sum") == pytest.approx(
            sum(r["duration_ms"] for r in sent) / 1000
        )
        assert value(m, "llm_requests_total", model="m-3", operation="chat", user="u-3") == 1
        assert total(m, "llm_usage_label_overflow_total") == 0
