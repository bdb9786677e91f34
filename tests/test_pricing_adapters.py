"""Billed units from the real SDKs' usage objects reach the canonical report and its price.

The payloads are built with the installed `anthropic` and `openai` packages' own types
(`model_dump`), so the field names are the libraries', not ours. Expected prices come from
genai-prices' `calc_price` (tests/pricing_oracle.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from anthropic.types import CacheCreation, ServerToolUsage
from anthropic.types import Usage as AnthropicUsage
from openai.types import CompletionUsage
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails
from openai.types.responses import ResponseUsage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pricing_oracle import expected_cost
from pydantic import ValidationError

from exporter.ingest.adapters import adapt
from exporter.ingest.pipeline import key_alias
from exporter.pricing import Pricer, Unpriced
from exporter.usage import UsageReport

AT = datetime(2026, 11, 20, 12, tzinfo=UTC)


def canonical(body: dict[str, Any]) -> UsageReport:
    report = UsageReport.model_validate(adapt(body, key_alias))
    report.__dict__["completed_at"] = AT
    return report


def priced(report: UsageReport) -> Any:
    value = Pricer().price(report.__dict__)
    return value.value if isinstance(value, Unpriced) else value


def test_anthropic_cache_writes_by_ttl_web_searches_and_tier() -> None:
    usage = AnthropicUsage(
        input_tokens=1200,
        cache_creation_input_tokens=3000,
        cache_read_input_tokens=5000,
        cache_creation=CacheCreation(
            ephemeral_5m_input_tokens=1000, ephemeral_1h_input_tokens=2000
        ),
        output_tokens=700,
        server_tool_use=ServerToolUsage(web_search_requests=3, web_fetch_requests=1),
        service_tier="priority",
    )
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "usage": usage.model_dump(mode="json")}  # fmt: skip
    r = canonical(body)
    assert (r.input_tokens, r.cached_input_tokens, r.cache_creation_input_tokens) == (
        1200 + 3000 + 5000, 5000, 3000)  # fmt: skip
    assert r.cache_creation_1h_input_tokens == 2000
    assert r.web_search_requests == 3
    assert r.service_tier == "priority"
    assert priced(r) == expected_cost(r.__dict__)
    # the 1-hour writes and the searches are billed: dropping them is cheaper
    cheaper = r.model_copy(update={"cache_creation_1h_input_tokens": 0, "web_search_requests": 0})
    assert priced(cheaper) < priced(r)


def test_anthropic_ttl_split_without_a_total() -> None:
    by_ttl = {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 60}
    body = {"type": "message", "model": "claude-haiku-4-5", "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 5,
        "cache_creation": by_ttl}}  # fmt: skip
    r = canonical(body)
    assert (r.input_tokens, r.cache_creation_input_tokens, r.cache_creation_1h_input_tokens) == (
        110, 100, 60)  # fmt: skip


def test_openai_chat_audio_and_cached_tokens() -> None:
    usage = CompletionUsage(
        prompt_tokens=5000,
        completion_tokens=900,
        total_tokens=5900,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=1024, audio_tokens=2000),
        completion_tokens_details=CompletionTokensDetails(audio_tokens=600, reasoning_tokens=0),
    )
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-audio-preview",
            "service_tier": "default", "usage": usage.model_dump(mode="json")}  # fmt: skip
    r = canonical(body)
    assert (r.input_audio_tokens, r.output_audio_tokens, r.cached_input_tokens) == (2000, 600, 1024)
    assert r.service_tier == "default"
    assert priced(r) == expected_cost(r.__dict__)


def test_openai_responses_tier_and_cache_writes() -> None:
    usage = ResponseUsage(
        input_tokens=9000,
        input_tokens_details=InputTokensDetails(cached_tokens=3000, cache_write_tokens=2000),
        output_tokens=1500,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=1200),
        total_tokens=10500,
    )
    body = {"id": "resp_1", "object": "response", "model": "o3", "service_tier": "flex",
            "usage": usage.model_dump(mode="json")}  # fmt: skip
    r = canonical(body)
    assert (r.cached_input_tokens, r.cache_creation_input_tokens, r.reasoning_tokens) == (
        3000, 2000, 1200)  # fmt: skip
    assert r.service_tier == "flex"
    flex = priced(r)
    assert flex == expected_cost(r.__dict__)
    assert flex < priced(r.model_copy(update={"service_tier": ""}))  # flex is cheaper


def test_openai_image_tokens() -> None:
    body = {"model": "gpt-image-1", "provider": "openai", "usage": {
        "input_tokens": 300, "output_tokens": 4160,
        "input_tokens_details": {"text_tokens": 100, "image_tokens": 200},
        "output_tokens_details": {"image_tokens": 4160}}}  # fmt: skip
    r = canonical(body)
    assert (r.input_image_tokens, r.output_image_tokens) == (200, 4160)
    assert priced(r) == expected_cost(r.__dict__)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cache_creation_input_tokens": 10, "cache_creation_1h_input_tokens": 11}, "1h"),
        ({"input_audio_tokens": 60, "input_image_tokens": 50}, "input_audio_tokens"),
        ({"output_audio_tokens": 9}, "output_audio_tokens"),
        ({"cached_audio_input_tokens": 5, "input_audio_tokens": 5}, "cached_audio_input_tokens"),
        ({"cost_usd": "10000.0000000001"}, "cap"),
        ({"cost_usd": "NaN"}, "finite"),
        ({"cost_usd": "-1"}, "non-negative"),
        ({"cost_usd": True}, "number"),
    ],
)
def test_billed_units_that_contradict_their_whole_are_refused(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        UsageReport.model_validate({"model": "m", "input_tokens": 100, "output_tokens": 8,
                                    "cache_creation_input_tokens": 10, **fields})  # fmt: skip
