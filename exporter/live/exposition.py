"""/metrics body: our usage families + the self-metrics registry, text 0.0.4 or OpenMetrics."""

from __future__ import annotations

import asyncio
import gzip

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.live.negotiation import negotiate
from exporter.live.usage_metrics import UsageMetrics
from exporter.selfmetrics import SelfMetrics

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_EOF = b"# EOF\n"
_GZIP_INLINE_MAX = 256 * 1024


class Exposition:
    """Renders on demand, reusing the usage part while no report arrived since the last scrape."""

    def __init__(self, usage: UsageMetrics, self_metrics: SelfMetrics) -> None:
        self._usage = usage
        self._self = self_metrics
        self._cache: dict[bool, tuple[int, bytes]] = {}

    def _usage_part(self, openmetrics: bool) -> bytes:
        cached = self._cache.get(openmetrics)
        if cached is not None and cached[0] == self._usage.generation:
            return cached[1]
        body = self._usage.render(openmetrics).encode()
        self._cache[openmetrics] = (self._usage.generation, body)
        return body

    def render(self, openmetrics: bool) -> bytes:
        usage = self._usage_part(openmetrics)
        if openmetrics:
            own: bytes = generate_openmetrics(self._self.registry)  # type: ignore[no-untyped-call]
            if own.endswith(_EOF):
                own = own[: -len(_EOF)]
            return usage + own + _EOF
        text: bytes = generate_latest(self._self.registry)
        return usage + text

    async def response(self, accept: str, accept_encoding: str) -> tuple[bytes, dict[str, str]]:
        openmetrics, gzip_ok = negotiate(accept, accept_encoding)
        body = self.render(openmetrics)
        headers = {
            "Content-Type": OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE,
            "Vary": "Accept, Accept-Encoding",
        }
        if gzip_ok:
            if len(body) > _GZIP_INLINE_MAX:  # zlib releases the GIL: keep the loop free
                body = await asyncio.get_running_loop().run_in_executor(None, _gzip, body)
            else:
                body = _gzip(body)
            headers["Content-Encoding"] = "gzip"
        return body, headers


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=1)
