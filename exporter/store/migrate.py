"""Run the Alembic migrations in code: no alembic.ini needed on disk.

Replicas starting together on one Postgres serialize on an advisory lock held for the
migration transaction, so exactly one of them creates the tables and the others see them.
"""

from __future__ import annotations

import logging
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.store.db import redact_url

log = logging.getLogger(__name__)

SCRIPT_LOCATION = "exporter.store:migrations"
_ADVISORY_LOCK_KEY = 0x6C6C6D7573616765  # "llmusage"; any constant shared by all replicas


def alembic_config(**attributes: Any) -> Config:
    """Alembic settings pointing at the packaged migrations; `attributes` reach env.py."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes.update(attributes)
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection=connection), revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the schema to `revision` (idempotent); returns the revision now current."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
            )
        before = await conn.run_sync(_current)
        await conn.run_sync(_upgrade, revision)
        after = await conn.run_sync(_current)
    if before != after:
        log.info(
            "database %s migrated from %s to %s", redact_url(engine.url), before or "empty", after
        )
    return after


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)
