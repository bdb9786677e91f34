"""Command line: `llm-usage-exporter serve | db upgrade | report | version`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from exporter import __version__
from exporter.config import Settings, load_settings
from exporter.logs import configure

log = logging.getLogger("exporter")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML settings file (env LLM_USAGE_CONFIG)")
    p.add_argument("--data-dir", help="WAL and SQLite directory (env LLM_USAGE_DATA_DIR)")
    p.add_argument(
        "--database-url",
        help="e.g. postgresql+asyncpg://user:pass@host/db; default SQLite in the data dir "
        "(env LLM_USAGE_DATABASE_URL)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-usage-exporter",
        description="Ingest LLM usage reports; export Prometheus metrics; keep billable rollups.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    _common(serve)
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

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply database migrations")
    _common(upgrade)

    from exporter import report

    rep = sub.add_parser("report", help="usage per group and period (as GET /v1/stats)")
    _common(rep)
    report.add_arguments(rep)

    sub.add_parser("version", help="print the version")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    keys = (
        "config",
        "data_dir",
        "database_url",
        "log_level",
        "log_format",
        "host",
        "port",
        "insecure",
        "auto_migrate",
    )
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    return load_settings(**overrides)


def _serve(settings: Settings) -> int:
    from aiohttp import web

    from exporter.app import create_app

    if not settings.tokens and not settings.bind_is_loopback() and not settings.insecure:
        log.error(
            "refusing to bind %s with no bearer token configured: set LLM_USAGE_TOKENS "
            "(or `tokens` in the config file), bind 127.0.0.1, or pass --insecure",
            settings.host,
        )
        return 2
    app = create_app(settings)
    log.info(
        "llm-usage-exporter %s listening on http://%s:%d (data dir %s)",
        __version__,
        settings.host,
        settings.port,
        settings.data_dir.resolve(),
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=10,
        handle_signals=True,
    )
    log.info("stopped")
    return 0


def _db_upgrade(settings: Settings) -> int:
    import asyncio

    from exporter.store import Store

    async def run() -> str | None:
        store = Store.from_url(settings.effective_database_url)
        try:
            return await store.upgrade()
        finally:
            await store.close()

    revision = asyncio.run(run())
    log.info("database is at schema %s", revision)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    try:
        settings = _settings(args)
    except (ValidationError, ValueError) as exc:
        print(f"llm-usage-exporter: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    if args.command == "serve":
        return _serve(settings)
    if args.command == "report":
        from exporter import report

        return report.run(args, settings)
    return _db_upgrade(settings)


if __name__ == "__main__":
    raise SystemExit(main())
