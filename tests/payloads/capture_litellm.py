"""Capture real LiteLLM StandardLoggingPayload batches, as its `generic_api` callback posts them.

Not part of the suite (LiteLLM takes ~35 s to install): run by hand in a throwaway venv,

    python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install litellm orjson
    /tmp/litellm-venv/bin/python tests/payloads/capture_litellm.py

It starts the fake LLM server of tests/fake_provider.py and a capture server on 127.0.0.1, points
LiteLLM at both (its GenericAPILogger, what `callbacks: ["generic_api"]` builds), makes
successful and failing calls, and writes the posted payloads to
tests/payloads/litellm-<version>-generic_api.json.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fake_provider import FakeLLM  # noqa: E402


async def main() -> None:
    fake = FakeLLM(prompt=1500, cached=1024, completion=60, reasoning=0,
                   fail_models={"gpt-4o-broken"})  # fmt: skip
    llm = web.AppRunner(fake.app())
    await llm.setup()
    llm_site = web.TCPSite(llm, "127.0.0.1", 0)
    await llm_site.start()
    llm_port = llm_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    posted: list[bytes] = []

    async def capture(request: web.Request) -> web.Response:
        posted.append(await request.read())
        return web.json_response({"ok": True})

    cap_app = web.Application()
    cap_app.router.add_post("/litellm", capture)
    cap = web.AppRunner(cap_app)
    await cap.setup()
    cap_site = web.TCPSite(cap, "127.0.0.1", 0)
    await cap_site.start()
    cap_port = cap_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    os.environ["GENERIC_LOGGER_ENDPOINT"] = f"http://127.0.0.1:{cap_port}/litellm"

    import litellm
    from litellm.integrations.generic_api.generic_api_callback import GenericAPILogger

    # what `callbacks: ["generic_api"]` builds on the proxy, with a short flush interval
    logger = GenericAPILogger(endpoint=os.environ["GENERIC_LOGGER_ENDPOINT"], flush_interval=1)
    litellm.callbacks = [logger]
    base = f"http://127.0.0.1:{llm_port}/v1"
    md = {"user_api_key_user_id": "alice", "user_api_key_team_id": "team-red"}
    await litellm.acompletion(
        model="openai/gpt-4o-mini", api_base=base, api_key="sk-fake-0000",
        messages=[{"role": "user", "content": "capital of France?"}], user="end-user-7",
        metadata=md,
    )  # fmt: skip
    await litellm.acompletion(
        model="anthropic/claude-sonnet-4-5-20250929", api_base=f"http://127.0.0.1:{llm_port}",
        api_key="sk-ant-fake", max_tokens=64,
        messages=[{"role": "user", "content": "capital of France?"}],
    )  # fmt: skip
    await litellm.aembedding(
        model="openai/text-embedding-3-small", api_base=base, api_key="sk-fake-0000",
        input=["hello"],
    )  # fmt: skip
    try:
        await litellm.acompletion(
            model="openai/gpt-4o-broken", api_base=base, api_key="sk-fake-0000", num_retries=0,
            messages=[{"role": "user", "content": "fail"}],
        )  # fmt: skip
    except Exception as exc:
        print("failure as expected:", type(exc).__name__)
    for _ in range(100):  # the callback batches and flushes on a timer
        await asyncio.sleep(0.2)
        if sum(len(orjson.loads(b)) for b in posted) >= 4:
            break
    from importlib.metadata import version as dist_version

    version = dist_version("litellm")
    items = [item for body in posted for item in orjson.loads(body)]
    out = HERE / f"litellm-{version}-generic_api.json"
    out.write_bytes(orjson.dumps(items, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {len(items)} payloads in {len(posted)} posts to {out}")
    print("fake LLM calls:", orjson.dumps(fake.calls).decode())
    await cap.cleanup()
    await llm.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
