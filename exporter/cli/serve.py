"""`llm-usage-exporter serve`: bind, log "listening" once the socket is ours, stop on a signal.

Not `web.run_app`: it logs nothing we can place after the bind and answers a port in use
with a traceback. Here the sockets are bound first, so a port in use is one line and exit
code 1 before the WAL is opened or the database touched.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
from typing import Any

from exporter import __version__
from exporter.cli.common import add_settings_flags
from exporter.config import Settings
from exporter.errors import ConfigError, StartupError

__all__ = ["register", "serve_command"]

log = logging.getLogger("exporter")

SHUTDOWN_TIMEOUT_S = 10.0


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service")
    add_settings_flags(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1; env LLM_USAGE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 9470; env LLM_USAGE_PORT)")
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow binding a non-loopback address with no bearer token configured",
    )
    serve.add_argument(
        "--no-migrate",
        dest="auto_migrate",
        action="store_false",
        default=None,
        help="do not run database migrations on start",
    )
    serve.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.tokens and not settings.bind_is_loopback() and not settings.insecure:
        raise ConfigError(
            f"refusing to bind {settings.host} with no bearer token configured: set "
            "LLM_USAGE_TOKENS (or `tokens` in the config file), bind 127.0.0.1, or pass "
            "--insecure"
        )
    from exporter.app import create_app

    app = create_app(settings)
    asyncio.run(_serve(app, settings))
    log.info("stopped")
    return 0


def bind(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address `host` resolves to, as asyncio's
    create_server would make them; a port in use fails here, before any start step ran."""
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:  # asyncio's rule: a family not enabled
                    raise
                sockets.pop().close()
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


async def _serve(app: Any, settings: Settings) -> None:
    from aiohttp import web

    sockets = bind(settings.host, settings.port)
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S, handle_signals=False
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()  # the app's start steps: WAL open (and locked), background jobs
        try:
            for sock in sockets:
                await web.SockSite(runner, sock).start()
            port = sockets[0].getsockname()[1]
            log.info("llm-usage-exporter %s listening on http://%s:%d (data dir %s)",
                     __version__, settings.host, port, settings.data_dir.resolve())  # fmt: skip
            await stop.wait()
            log.info("shutting down")
        finally:
            await runner.cleanup()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for sock in sockets:
            sock.close()
