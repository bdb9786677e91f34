"""A loopback fake of the OpenAI and Anthropic HTTP APIs, for driving the real SDKs.

It answers in the providers' documented wire shapes (JSON and SSE streams), with seeded random
usage per call, and records what it returned in `calls`: that record is the independent truth
the tests compare the exporter's numbers with. It runs in its own thread and event loop, so the
blocking (sync) SDK clients can call it from test code.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from fake_provider import anthropic_stream_events

__all__ = ["Call", "FakeLLM"]


@dataclass
class Call:
    """What the fake returned, in canonical terms (input includes cache reads and writes)."""

    id: str
    provider: str
    operation: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0
    failed: bool = False


def _sse(events: list[tuple[str | None, dict[str, Any] | str]]) -> bytes:
    out = []
    for name, data in events:
        if name:
            out.append(f"event: {name}\n".encode())
        payload = data if isinstance(data, str) else orjson.dumps(data).decode()
        out.append(f"data: {payload}\n\n".encode())
    return b"".join(out)


class FakeLLM:
    def __init__(self, seed: int = 7, fail_models: frozenset[str] = frozenset({"boom"})) -> None:
        self.calls: list[Call] = []
        self._rng = random.Random(seed)
        self._fail = fail_models
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._seq = 0

    # --- life cycle --------------------------------------------------------------------

    def __enter__(self) -> FakeLLM:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise AssertionError("fake LLM server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self._loop.run_forever()

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- usage -------------------------------------------------------------------------

    def _new_call(
        self, provider: str, operation: str, model: str, cache: bool, reasoning: bool
    ) -> Call:
        with self._lock:
            self._seq += 1
            rng = self._rng
            inp = rng.randint(20, 5000)
            cached = rng.randint(0, inp // 2) if cache else 0
            written = (
                rng.randint(0, (inp - cached) // 2) if cache and provider == "anthropic" else 0
            )
            out = rng.randint(1, 1500) if operation != "embedding" else 0
            call = Call(
                id=f"{provider[:4]}-{self._seq}",
                provider=provider,
                operation=operation,
                model=model,
                input_tokens=inp,
                output_tokens=out,
                cached_input_tokens=cached,
                cache_creation_input_tokens=written,
                reasoning_tokens=rng.randint(0, out) if reasoning else 0,
                failed=model in self._fail,
            )
            self.calls.append(call)
        return call

    @staticmethod
    def _failure(call: Call) -> web.Response:
        body = {"error": {"message": "the fake is told to fail", "type": "server_error"}}
        call.input_tokens = call.output_tokens = call.cached_input_tokens = 0
        call.cache_creation_input_tokens = call.reasoning_tokens = 0
        return web.json_response(body, status=500)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        call = self._new_call("openai", "chat", body["model"], True, body["model"].startswith("o"))
        if call.failed:
            return self._failure(call)
        usage = {
            "prompt_tokens": call.input_tokens,
            "completion_tokens": call.output_tokens,
            "total_tokens": call.input_tokens + call.output_tokens,
            "prompt_tokens_details": {"cached_tokens": call.cached_input_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": call.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        base = {
            "id": call.id,
            "created": int(time.time()),
            "model": call.model,
            "system_fingerprint": "fp_fake",
            "service_tier": "default",
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "usage": usage,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "logprobs": None,
                            "message": {"role": "assistant", "content": "ok", "refusal": None},
                        }
                    ],
                }
            )
        chunk = {**base, "object": "chat.completion.chunk", "obfuscation": "xyz"}
        events: list[tuple[str | None, dict[str, Any] | str]] = [
            (
                None,
                {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            ),
            (None, {**chunk, "choices": [{"index": 0, "delta": {"content": "ok"}}]}),
            (None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**chunk, "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        return web.Response(body=_sse(events), content_type="text/event-stream")

    async def _responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = self._new_call("openai", "responses", body["model"], True, True)
        if call.failed:
            return self._failure(call)
        return web.json_response(
            {
                "id": call.id,
                "object": "response",
                "created_at": int(time.time()),
                "model": call.model,
                "status": "completed",
                "output": [],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": call.input_tokens,
                    "input_tokens_details": {"cached_tokens": call.cached_input_tokens},
                    "output_tokens": call.output_tokens,
                    "output_tokens_details": {"reasoning_tokens": call.reasoning_tokens},
                    "total_tokens": call.input_tokens + call.output_tokens,
                },
            }
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = self._new_call("openai", "embedding", body["model"], False, False)
        if call.failed:
            return self._failure(call)
        return web.json_response(
            {
                "object": "list",
                "model": call.model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": call.input_tokens, "total_tokens": call.input_tokens},
            }
        )

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = self._new_call("anthropic", "chat", body["model"], True, False)
        if call.failed:
            return self._failure(call)
        own_input = call.input_tokens - call.cached_input_tokens - call.cache_creation_input_tokens
        usage = {
            "input_tokens": own_input,
            "output_tokens": call.output_tokens,
            "cache_read_input_tokens": call.cached_input_tokens,
            "cache_creation_input_tokens": call.cache_creation_input_tokens,
        }
        message = {
            "id": call.id,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(message)
        events: list[tuple[str | None, dict[str, Any] | str]] = list(
            anthropic_stream_events(message, usage, call.output_tokens)
        )
        return web.Response(body=_sse(events), content_type="text/event-stream")
