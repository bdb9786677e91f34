"""The total series cap: label sets past `max_series` fold into one all-`__other__` series.

Each label's own cap bounds that label, not their product (500 models x 2,000 users); the total
cap bounds the product. Counts are compared with sums computed here from the reports sent.
"""

from __future__ import annotations

from typing import Any

from conftest import MakeClient
from helpers import report, scrape, select, total, value


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
