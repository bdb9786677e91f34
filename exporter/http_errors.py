"""Answers to requests the HTTP parser refused, without echoing the request back.

aiohttp answers a malformed request with the parser's message, which quotes the offending
line: a bad `Authorization` header would be sent back, token and all, through every proxy and
capture on the way. Ours says only the parser's fixed reason ("Invalid header value char"),
the same one the `malformed_request` log event carries."""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from exporter.logevents import parser_reason


class QuietRequestHandler(RequestHandler):
    """aiohttp's protocol with error answers that carry no byte of the request."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError) and status != HTTPStatus.INTERNAL_SERVER_ERROR:
            message = f"{status} {HTTPStatus(status).phrase}: {parser_reason(exc)}\n"
        return super().handle_error(request, status, exc, message)


def quiet_handler(server: web.Server) -> RequestHandler:
    """What `server()` returns (one protocol per connection), with quiet error answers."""
    kwargs = getattr(server, "_kwargs", {})
    return QuietRequestHandler(server, loop=server._loop, **kwargs)
