"""Run tests/payloads/capture_vercel.mjs against the fake LLM and save what it exported.

    python tests/payloads/capture_vercel.py /tmp/vercel   # the npm project with `ai` installed

Writes tests/payloads/vercel-ai-<ai version>-otlp.json: a list of OTLP/HTTP JSON bodies, as
the real @opentelemetry/exporter-trace-otlp-http posted them, and the fake server's answers
(`calls`) so the test can compute what each span should count.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import orjson
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fake_provider import FakeLLM  # noqa: E402


async def main(project: Path) -> None:
    fake = FakeLLM(prompt=3000, cached=2048, cache_write=512, completion=120, reasoning=32,
                   fail_models={"gpt-4o-broken"})  # fmt: skip
    posted: list[object] = []

    async def capture(request: web.Request) -> web.Response:
        posted.append(orjson.loads(await request.read()))
        return web.json_response({})

    app = fake.app()
    app.router.add_post("/capture/v1/traces", capture)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    env = {**os.environ, "LLM_BASE": f"http://127.0.0.1:{port}",
           "CAPTURE": f"http://127.0.0.1:{port}/capture/v1/traces"}  # fmt: skip
    script = project / "capture_vercel.mjs"
    script.write_bytes((HERE / "capture_vercel.mjs").read_bytes())
    proc = await asyncio.create_subprocess_exec("node", str(script), cwd=project, env=env)
    assert await asyncio.wait_for(proc.wait(), 120) == 0
    await runner.cleanup()
    version = json.loads((project / "node_modules/ai/package.json").read_text())["version"]
    out = HERE / f"vercel-ai-{version}-otlp.json"
    doc = {"exports": posted, "calls": fake.calls}
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {len(posted)} exports to {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
