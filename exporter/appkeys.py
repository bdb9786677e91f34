"""The typed keys of the application's state (`web.AppKey`), shared by app and startup."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from exporter.auth import AccessPolicy
from exporter.budgets import BudgetTracker
from exporter.config import Settings
from exporter.flusher import Flusher
from exporter.ingest.pipeline import Ingestor
from exporter.live.usage_metrics import UsageMetrics
from exporter.selfmetrics import SelfMetrics
from exporter.store import Store
from exporter.wal import WriteAheadLog

__all__ = [
    "ACCESS",
    "BUDGETS",
    "FLUSHER",
    "INGESTOR",
    "SELF_METRICS",
    "SETTINGS",
    "STARTUP",
    "STORE",
    "USAGE",
    "WAL",
    "StartupState",
]


@dataclass
class StartupState:
    """How far start-up got: readiness reads it, shutdown acts on it."""

    migrated: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


ACCESS = web.AppKey("access", AccessPolicy)
SETTINGS = web.AppKey("settings", Settings)
SELF_METRICS = web.AppKey("self_metrics", SelfMetrics)
USAGE = web.AppKey("usage", UsageMetrics)
WAL = web.AppKey("wal", WriteAheadLog)
INGESTOR = web.AppKey("ingestor", Ingestor)
STORE = web.AppKey("store", Store)
BUDGETS = web.AppKey("budgets", BudgetTracker)
FLUSHER = web.AppKey("flusher", Flusher)
STARTUP = web.AppKey("startup", StartupState)
