"""/metrics body: our usage families + the self-metrics registry, text 0.0.4 or OpenMetrics."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.live.negotiation import negotiate
from exporter.live.usage_metrics import UsageMetrics
from exporter.selfmetrics import SelfMetrics

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_EOF = b"# EOF\n"
_GZIP_INLINE_MAX = 256 * 1024
#: above this many label sets (~6 MB of text) a scrape is streamed in pieces and not cached, so
#: its peak memory stays near the steady RSS (bench/series_memory.py)
LARGE_SERIES = 10_000


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

    def _own(self, openmetrics: bool) -> bytes:
        """The self-metrics registry, and the OpenMetrics EOF marker."""
        if openmetrics:
            own: bytes = generate_openmetrics(self._self.registry)  # type: ignore[no-untyped-call]
            if own.endswith(_EOF):
                own = own[: -len(_EOF)]
            return own + _EOF
        text: bytes = generate_latest(self._self.registry)
        return text

    def render(self, openmetrics: bool) -> bytes:
        return self._usage_part(openmetrics) + self._own(openmetrics)

    async def _stream(self, openmetrics: bool, gzipped: bool) -> AsyncIterator[bytes]:
        """A big body piece by piece as aiohttp writes it (chunked): only one piece is alive at
        a time, and the loop serves ingest between pieces; gzip compresses each in a thread."""
        own = self._own(openmetrics)
        pieces = self._usage.render_chunks(openmetrics)
        if not gzipped:
            for piece in pieces:
                yield piece
            yield own
            return
        z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
        loop = asyncio.get_running_loop()
        for piece in pieces:
            out = await loop.run_in_executor(None, z.compress, piece)
            if out:
                yield out
        yield z.compress(own) + z.flush()

    async def response(
        self, accept: str, accept_encoding: str
    ) -> tuple[bytes | AsyncIterator[bytes], dict[str, str]]:
        """(body, headers); past LARGE_SERIES label sets the body is an async iterator of
        pieces (aiohttp sends it chunked) and nothing is cached."""
        openmetrics, gzip_ok = negotiate(accept, accept_encoding)
        headers = {
            "Content-Type": OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE,
            "Vary": "Accept, Accept-Encoding",
        }
        if len(self._usage) > LARGE_SERIES:
            self._cache.clear()
            if gzip_ok:
                headers["Content-Encoding"] = "gzip"
            return self._stream(openmetrics, gzip_ok), headers
        body = self.render(openmetrics)
        if gzip_ok:
            if len(body) > _GZIP_INLINE_MAX:  # zlib releases the GIL: keep the loop free
                body = await asyncio.get_running_loop().run_in_executor(None, _gzip, body)
            else:
                body = _gzip(body)
            headers["Content-Encoding"] = "gzip"
        return body, headers


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=1)
