"""A loopback fake LLM server in the test's own loop (tests/fake_llm.py is the threaded one the
SDK tests use): OpenAI and Anthropic endpoints answering with bodies shaped like the real APIs'
(usage blocks with cache and reasoning details, SSE streams with a final usage
chunk, error bodies). Tests point the real SDKs and instrumentations at it.

`FakeLLM.calls` records what was answered, so a test can compute the expected totals from the
exact usage numbers the server sent, independently of the exporter.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


def anthropic_stream_events(
    message: dict[str, Any], usage: dict[str, Any], output_tokens: int
) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events of an Anthropic Messages stream for `message` (its text in one delta),
    as the API sends them: input usage on message_start, cumulative output on message_delta."""
    text = message["content"][0]["text"]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}  # fmt: skip
    return [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": output_tokens}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip


@dataclass
class FakeLLM:
    """Usage numbers per model; `fail_models` answer 500 with an API error body."""

    prompt: int = 1200
    cached: int = 1024
    cache_write: int = 0
    completion: int = 40
    reasoning: int = 8
    fail_models: set[str] = field(default_factory=set)
    calls: list[dict[str, Any]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/messages", self.messages)
        return app

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}{int(time.time())}"

    def _fail(self, model: str, kind: str) -> web.Response | None:
        if model not in self.fail_models:
            return None
        self.calls.append({"kind": kind, "model": model, "error": True})
        if kind == "anthropic":
            body = {"type": "error", "error": {"type": "api_error", "message": "overloaded"}}
        else:
            body = {"error": {"message": "upstream failed", "type": "server_error", "code": None}}
        return web.json_response(body, status=500)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        if (failed := self._fail(model, "chat")) is not None:
            return failed
        rid = self._id("chatcmpl-")
        usage = {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {
                "cached_tokens": self.cached,
                "audio_tokens": 0,
                "cache_write_tokens": self.cache_write,
            },
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        self.calls.append({"kind": "chat", "model": model, "id": rid, "usage": usage})
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "Paris.",
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake0001",
                },
                dumps=lambda o: orjson.dumps(o).decode(),
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake0001",
        }
        deltas = [{"role": "assistant", "content": ""}, {"content": "Par"}, {"content": "is."}]
        for delta in deltas:
            chunk = {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
                "usage": None,
                "obfuscation": "x1Yz",
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        stop = {
            **base,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            "usage": None,
        }
        await resp.write(b"data: " + orjson.dumps(stop) + b"\n\n")
        final = {**base, "choices": [], "usage": usage, "obfuscation": "Qm3k7e"}
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body["model"]
        if (failed := self._fail(model, "responses")) is not None:
            return failed
        rid = self._id("resp_")
        usage = {
            "input_tokens": self.prompt,
            "input_tokens_details": {
                "cached_tokens": self.cached,
                "cache_write_tokens": self.cache_write,
            },
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt + self.completion,
        }
        self.calls.append({"kind": "responses", "model": model, "id": rid, "usage": usage})
        return web.json_response(
            {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "status": "completed",
                "error": None,
                "incomplete_details": None,
                "instructions": None,
                "max_output_tokens": None,
                "model": model,
                "output": [
                    {
                        "type": "message",
                        "id": "msg_fake",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "Paris.", "annotations": []}],
                    }
                ],
                "parallel_tool_calls": True,
                "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None},
                "store": True,
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage,
                "user": None,
                "metadata": {},
            }
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body["model"]
        if (failed := self._fail(model, "embedding")) is not None:
            return failed
        usage = {"prompt_tokens": self.prompt, "total_tokens": self.prompt}
        self.calls.append({"kind": "embedding", "model": model, "usage": usage})
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
                "model": model,
                "usage": usage,
            }
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        if (failed := self._fail(model, "anthropic")) is not None:
            return failed
        rid = self._id("msg_")
        uncached = self.prompt - self.cached - self.cache_write
        usage = {
            "input_tokens": uncached,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cached,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_write,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": self.completion,
            "service_tier": "standard",
        }
        self.calls.append({"kind": "anthropic", "model": model, "id": rid, "usage": usage})
        message = {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "Paris."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(message)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = anthropic_stream_events(message, usage, self.completion)
        for name, data in events:
            await resp.write(f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n")
        await resp.write_eof()
        return resp
