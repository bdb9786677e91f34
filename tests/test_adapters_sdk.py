"""The real OpenAI and Anthropic SDKs against a loopback fake LLM server; what they return is
posted to /v1/usage as it is (docs/clients.md recipes), and /metrics and the database must
show exactly the tokens the server sent, genai-prices' cost, the user and the errors.
LiteLLM is too heavy for the suite: its payloads were captured from the real library
(tests/payloads/litellm-1.110.2-generic_api.json, by tests/payloads/capture_litellm.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from clientcheck import (
    Expected,
    assert_metrics,
    assert_stored,
    from_call,
    metric_totals,
    stored_rows,
)
from fake_provider import FakeLLM
from helpers import scrape

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
PAYLOADS = Path(__file__).parent / "payloads"
LITELLM = PAYLOADS / "litellm-1.110.2-generic_api.json"


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeLLM, str]:
    llm = FakeLLM(prompt=3000, cached=2048, cache_write=512, completion=120, reasoning=32,
                  fail_models={"gpt-4o-broken"})  # fmt: skip
    server: TestServer = await aiohttp_server(llm.app())
    return llm, f"http://127.0.0.1:{server.port}"


async def post(client: TestClient[Any, Any], body: Any, path: str = "/v1/usage") -> Any:
    resp = await client.post(path, data=orjson.dumps(body),
                             headers={"Content-Type": "application/json"})  # fmt: skip
    answer = await resp.json()
    assert resp.status == 202, answer
    assert answer["rejected"] == 0, answer
    return answer


async def test_openai_sdk_objects_are_counted_as_they_are(
    make_client: MakeClient, fake: tuple[FakeLLM, str]
) -> None:
    llm, base = fake
    client = await make_client()
    sdk = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
    messages: Any = [{"role": "user", "content": "capital of France?"}]

    chat = await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
    await post(client, {**chat.model_dump(mode="json"), "user": "alice",
                        "tags": {"feature": "search"}})  # fmt: skip

    last = None
    stream = await sdk.chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.usage is not None:
            last = chunk
    assert last is not None and "obfuscation" in last.model_dump()
    await post(client, {**last.model_dump(mode="json"), "user": "bob"})

    response = await sdk.responses.create(model="gpt-4.1-mini", input="capital of France?")
    await post(client, {**response.model_dump(mode="json"), "user": "alice"})

    emb = await sdk.embeddings.create(model="text-embedding-3-small", input=["hello"])
    await post(client, {**emb.model_dump(mode="json"), "request_id": "emb-1", "user": "carol"})

    with pytest.raises(openai.APIStatusError) as failed:
        await sdk.chat.completions.create(model="gpt-4o-broken", messages=messages)
    await post(client, {"model": "gpt-4o-broken", "provider": "openai", "user": "alice",
                        "status": "error", "error_type": type(failed.value).__name__})  # fmt: skip
    # re-posting the same objects changes nothing (the response id is the request id)
    dup = await client.post("/v1/usage", json=chat.model_dump(mode="json"))
    assert (await dup.json())["duplicates"] == 1

    users = ["alice", "bob", "alice", "carol", "alice"]
    expected = [from_call(c, "openai", u) for c, u in zip(llm.calls, users, strict=True)]
    assert_metrics(await scrape(client), expected)
    rows = await stored_rows(client)
    assert_stored(rows, expected)
    assert {r["request_id"] for r in rows} >= {chat.id, last.id, response.id, "emb-1"}
    tags = {r["request_id"]: r["tags"] for r in rows}
    assert tags[chat.id] == {"feature": "search"} and tags[last.id] is None


async def test_anthropic_sdk_messages_count_cache_reads_and_writes(
    make_client: MakeClient, fake: tuple[FakeLLM, str]
) -> None:
    llm, base = fake
    client = await make_client()
    sdk = anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
    messages: Any = [{"role": "user", "content": "capital of France?"}]
    msg = await sdk.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=messages)
    await post(client, {**msg.model_dump(mode="json"), "user": "alice"})
    async with sdk.messages.stream(
        model="claude-3-5-haiku-latest", max_tokens=64, messages=messages
    ) as stream:
        final = await stream.get_final_message()
    await post(client, {**final.model_dump(mode="json"), "user": "bob"})

    expected = [from_call(c, "anthropic", u) for c, u in zip(llm.calls, ["alice", "bob"],
                                                                 strict=True)]  # fmt: skip
    assert expected[0].input_tokens == 3000 and expected[0].cache_write == 512
    assert_metrics(await scrape(client), expected)
    assert_stored(await stored_rows(client), expected)


def litellm_expected(item: dict[str, Any]) -> Expected:
    """From LiteLLM's payload as LiteLLM documents it (usage_object is OpenAI-shaped)."""
    md = item["metadata"]
    u = md.get("usage_object") or {}
    details = u.get("prompt_tokens_details") or {}
    provider = {"openai": "openai", "anthropic": "anthropic"}[item["custom_llm_provider"]]
    return Expected(
        item["model"],
        provider,
        item["prompt_tokens"],
        item["completion_tokens"],
        details.get("cached_tokens") or 0,
        details.get("cache_creation_tokens") or 0,
        ((u.get("completion_tokens_details") or {}).get("reasoning_tokens")) or 0,
        user=item.get("end_user") or md.get("user_api_key_user_id") or "",
        error=item["status"] == "failure",
    )


async def test_litellm_generic_api_batches_are_counted(make_client: MakeClient) -> None:
    payloads = orjson.loads(LITELLM.read_bytes())
    assert {p["status"] for p in payloads} == {"success", "failure"}
    client = await make_client()
    answer = await post(client, payloads)
    assert answer["accepted"] == len(payloads)
    again = await post(client, payloads)  # the callback retries a batch: counted once
    assert again["duplicates"] == len(payloads)
    expected = [litellm_expected(p) for p in payloads]
    samples = await scrape(client)
    assert_metrics(samples, expected)
    rows = await stored_rows(client)
    assert_stored(rows, expected)
    by_id = {r["request_id"]: r for r in rows}
    first = by_id[payloads[0]["litellm_call_id"]]
    assert (first["user"], first["team"]) == ("alice", "team-red")
    assert {r["operation"] for r in rows} == {"chat", "embedding"}


async def test_litellm_response_cost_is_used_only_for_models_we_cannot_price(
    make_client: MakeClient,
) -> None:
    payload = orjson.loads(LITELLM.read_bytes())[0]
    private = {**payload, "litellm_call_id": "private-1", "model": "acme-private-llm",
               "custom_llm_provider": "hosted_vllm"}  # fmt: skip
    client = await make_client()
    await post(client, [payload, private])
    rows = {r["request_id"]: r for r in await stored_rows(client)}
    assert float(rows["private-1"]["cost_usd"]) == payload["response_cost"]
    ours = from_call(
        {"kind": "chat", "model": payload["model"], "usage": payload["metadata"]["usage_object"]},
        "openai",
    ).cost()
    assert float(rows[payload["litellm_call_id"]]["cost_usd"]) == pytest.approx(float(ours))


def gpustack_body(i: int) -> dict[str, Any]:
    """GPUStack's `ModelUsageMetrics` as its gateway posts it: every field of the pydantic
    model, integer ids, None for what it does not know (gpustack/schemas/model_usage.py)."""
    return {
        "model": "gpt-4o-mini" if i % 2 else "claude-sonnet-4-5",
        "input_token": 1000 + i,
        "output_token": 100 + i,
        "total_token": 1100 + 2 * i,
        "input_cached_token": 512,
        "request_count": 1,
        "completed": True,
        "output_chunk_count": 0,
        "request_content_bytes": 4096,
        "started_at": 1767225600000 + i,
        "completed_at": 1767225601500 + i,
        "user_id": 42,
        "model_id": 7,
        "model_route_id": 3,
        "cluster_id": None,
        "provider_id": 2,
        "provider_name": "my-openai" if i % 2 else "claude-prod",
        "provider_type": "openai" if i % 2 else "anthropic",
        "access_key": "gpustack_9f8e7d6c5b4a39281706",
        "operation": "chat_completion",
        "organization_id": "org-1",
        "request_id": f"gpustack-{i}",
    }


async def test_gpustack_model_usage_metrics_as_posted(make_client: MakeClient) -> None:
    client = await make_client()
    bodies = [gpustack_body(i) for i in range(4)]
    for i, b in enumerate(bodies):
        path = "/v2/usage/gateway-metrics" if i % 2 else "/v1/usage"
        await post(client, b, path)
    expected = [
        Expected(b["model"], b["provider_type"], b["input_token"], b["output_token"],
                 b["input_cached_token"], user="42")
        for b in bodies
    ]  # fmt: skip
    assert_metrics(await scrape(client), expected)
    rows = await stored_rows(client)
    assert_stored(rows, expected)
    assert {(r["team"], r["source"]) for r in rows} == {("org-1", "gpustack")}
    assert all(r["api_key_id"].startswith("key-") for r in rows)  # the raw key is never kept
    assert "gpustack_9f8e" not in repr(rows)


async def test_promoted_tags_become_capped_labels(make_client: MakeClient) -> None:
    client = await make_client(promoted_tags=["feature", "env.name"], max_tag_values=2)
    features = ["search", "chat", "search", "summarise", ""]
    for i, feature in enumerate(features):
        tags = {"env.name": "prod", "other": "x"} | ({"feature": feature} if feature else {})
        await post(client, {"request_id": f"t{i}", "model": "gpt-4o", "provider": "openai",
                            "input_tokens": 10 * (i + 1), "tags": tags})  # fmt: skip
    samples = await scrape(client)
    by_feature: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "llm_input_tokens_total":
            d = dict(labels)
            assert d["tag_env_name"] == "prod" and "tag_other" not in d
            by_feature[d["tag_feature"]] = by_feature.get(d["tag_feature"], 0) + v
    # the first two distinct values are kept, the others fold into __other__ (counted)
    assert by_feature == {"search": 10 + 30, "chat": 20, "__other__": 40 + 50}
    overflow = {dict(k[1]).get("label"): v for k, v in samples.items()
                if k[0] == "llm_usage_label_overflow_total"}  # fmt: skip
    assert overflow.get("tag_feature", 0) >= 2


async def test_usage_keys_we_do_not_read_are_counted(make_client: MakeClient) -> None:
    client = await make_client()
    before = metric_totals(await scrape(client), "llm_usage_unknown_usage_fields_total")
    body = {"id": "chatcmpl-new", "object": "chat.completion", "model": "gpt-4o",
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                      "future_tokens": 3, "surcharge_tokens": 1}}  # fmt: skip
    await post(client, body)
    after = metric_totals(await scrape(client), "llm_usage_unknown_usage_fields_total")
    assert after - before == 2


async def test_tags_are_stored_on_postgres_too(make_client: MakeClient, pg_url: str) -> None:
    client = await make_client(database_url=pg_url)
    payloads = orjson.loads(LITELLM.read_bytes())
    metadata = {**payloads[0]["metadata"], "spend_logs_metadata": {"project": "faq", "n": 3}}
    tagged = {**payloads[0], "metadata": metadata}
    await post(client, [tagged, {"request_id": "c1", "model": "gpt-4o", "provider": "openai",
                                 "input_tokens": 5, "tags": {"env": "prod"}}])  # fmt: skip
    rows = {r["request_id"]: r for r in await stored_rows(client)}
    assert rows[tagged["litellm_call_id"]]["tags"] == {"n": "3", "project": "faq"}
    assert rows["c1"]["tags"] == {"env": "prod"}
    assert_stored(list(rows.values()), [litellm_expected(tagged),
                                        Expected("gpt-4o", "openai", 5, 0)])  # fmt: skip
