"""Real OpenTelemetry GenAI instrumentations (the official opentelemetry-instrumentation-genai-
openai, OpenLLMetry's opentelemetry-instrumentation-openai and -anthropic) wrap the real SDKs
talking to a loopback fake LLM; their spans go through the real OTLP/HTTP exporter to
/v1/traces. /metrics and the database must show the tokens each span carries (the server's
numbers, less what an instrumentation is known not to record), genai-prices' cost, the user
(from the span or inherited from a parent span) and the failed calls as errors."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from clientcheck import assert_metrics, assert_stored, from_call, stored_rows
from fake_provider import FakeLLM
from helpers import scrape
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MESSAGES: Any = [{"role": "user", "content": "capital of France?"}]


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeLLM, str]:
    llm = FakeLLM(prompt=3000, cached=2048, cache_write=512, completion=120, reasoning=32,
                  fail_models={"gpt-4o-broken", "claude-broken"})  # fmt: skip
    server: TestServer = await aiohttp_server(llm.app())
    return llm, f"http://127.0.0.1:{server.port}"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "support-bot"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


async def export(client: TestClient[Any, Any], memory: InMemorySpanExporter) -> None:
    """The real OTLP/HTTP exporter, in a thread: it is synchronous and the app shares our loop."""
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{client.server.port}/v1/traces")
    finished = memory.get_finished_spans()
    assert await asyncio.to_thread(exporter.export, finished) is SpanExportResult.SUCCESS
    # a retried export changes nothing
    assert await asyncio.to_thread(exporter.export, finished) is SpanExportResult.SUCCESS


async def openai_calls(provider: TracerProvider, base: str, user_kwarg: bool) -> None:
    sdk = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
    tracer = provider.get_tracer("app")
    user: Any = {"user": "alice"} if user_kwarg else {}
    with tracer.start_as_current_span("handle request", attributes={"enduser.id": "alice"}):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **user)
        stream = await sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for _ in stream:
            pass
        await sdk.embeddings.create(model="text-embedding-3-small", input=["hello"])
        with pytest.raises(openai.APIStatusError):
            await sdk.chat.completions.create(model="gpt-4o-broken", messages=MESSAGES)


async def test_official_genai_openai_instrumentation(
    make_client: MakeClient, fake: tuple[FakeLLM, str], spans: Any
) -> None:
    from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor

    llm, base = fake
    provider, memory = spans
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        await openai_calls(provider, base, user_kwarg=False)
    finally:
        instrumentor.uninstrument()
    client = await make_client()
    await export(client, memory)
    # the user is on the parent span only: inherited
    expected = [from_call(c, "openai", "alice") for c in llm.calls]
    assert_metrics(await scrape(client), expected)
    rows = await stored_rows(client)
    assert_stored(rows, expected)
    assert {r["node"] for r in rows} == {"support-bot"}
    assert any(r["ttft_ms"] for r in rows)  # the stream's time to first chunk


async def test_openllmetry_openai_instrumentation(
    make_client: MakeClient, fake: tuple[FakeLLM, str], spans: Any
) -> None:
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor

    llm, base = fake
    provider, memory = spans
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        await openai_calls(provider, base, user_kwarg=True)
    finally:
        instrumentor.uninstrument()
    client = await make_client()
    await export(client, memory)
    expected = [from_call(c, "openai", "alice") for c in llm.calls]
    # OpenLLMetry 0.62 records neither cache writes nor a stream's reasoning tokens
    expected = [dataclasses.replace(e, cache_write=0) for e in expected]
    expected[1] = dataclasses.replace(expected[1], reasoning=0)
    assert_metrics(await scrape(client), expected)
    assert_stored(await stored_rows(client), expected)


async def test_openllmetry_anthropic_instrumentation(
    make_client: MakeClient, fake: tuple[FakeLLM, str], spans: Any
) -> None:
    from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor

    llm, base = fake
    provider, memory = spans
    instrumentor = AnthropicInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    sdk = anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
    tracer = provider.get_tracer("app")
    try:
        with tracer.start_as_current_span("handle", attributes={"user.id": "bob"}):
            await sdk.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES)
            async with sdk.messages.stream(
                model="claude-3-5-haiku-latest", max_tokens=64, messages=MESSAGES
            ) as stream:
                await stream.get_final_message()
            with pytest.raises(anthropic.APIStatusError):
                await sdk.messages.create(model="claude-broken", max_tokens=64, messages=MESSAGES)
    finally:
        instrumentor.uninstrument()
    client = await make_client()
    await export(client, memory)
    expected = [from_call(c, "anthropic", "bob") for c in llm.calls]
    # OpenLLMetry adds message_start's output count (1) to the stream's final one
    expected[1] = dataclasses.replace(expected[1], output_tokens=expected[1].output_tokens + 1)
    assert_metrics(await scrape(client), expected)
    assert_stored(await stored_rows(client), expected)
