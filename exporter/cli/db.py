"""`llm-usage-exporter db upgrade`: apply the database migrations and say where they left it."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from exporter.cli.common import add_settings_flags
from exporter.config import Settings

__all__ = ["register"]

log = logging.getLogger("exporter")


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply database migrations")
    add_settings_flags(upgrade)
    upgrade.set_defaults(run=upgrade_command)


def upgrade_command(args: argparse.Namespace, settings: Settings) -> int:
    from exporter.startup import open_store, run_migrations

    async def run() -> str | None:
        store = open_store(settings)
        try:
            return await run_migrations(store)
        finally:
            await store.close()

    revision = asyncio.run(run())
    log.info("database is at schema %s", revision)
    return 0
