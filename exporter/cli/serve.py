"""`llm-usage-exporter serve`: its flags and settings checks; running it is exporter/server.py.

Not `web.run_app`: it logs nothing we can place after the bind and answers a port in use
with a traceback. There the data dir is locked and the sockets bound first, so a second
process or a port in use is one line and exit code 1 before the WAL is opened or the
database touched.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from exporter.cli.common import add_settings_flags
from exporter.config import Settings
from exporter.errors import ConfigError

__all__ = ["register", "serve_command"]

log = logging.getLogger("exporter")

SHUTDOWN_TIMEOUT_S = 10.0


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service")
    add_settings_flags(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1; env LLM_USAGE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 9470; env LLM_USAGE_PORT)")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port, one WAL each in <data-dir>/worker-<i> (default 1; "
        "env LLM_USAGE_WORKERS)",
    )
    serve.add_argument(
        "--worker-port",
        type=int,
        help="with --workers > 1, worker i also listens on this port + i for its own /metrics "
        "(default port + 1; env LLM_USAGE_WORKER_PORT)",
    )
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

    if settings.workers > 1:
        from exporter.workers import run_workers

        code = run_workers(create_app, settings)  # supervisor: lock, port, fork, restart
    else:
        from exporter.leftovers import flush_leftovers, leftover_dirs
        from exporter.server import run

        left = leftover_dirs(settings.data_dir, 1)  # WAL of an earlier `--workers N` run
        if left:
            flush_leftovers(settings, left)
        code = run(create_app, settings)  # data-dir lock, bind, fd limit, connection cap
    log.info("stopped")
    return code
