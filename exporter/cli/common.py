"""What every command shares: the settings flags and turning parsed flags into Settings."""

from __future__ import annotations

import argparse
from typing import Any

from exporter.config import Settings, load_settings

__all__ = ["add_settings_flags", "settings_from_args"]


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """Flags every command that opens the data dir or the database takes."""
    p.add_argument("--config", help="TOML or YAML settings file (env LLM_USAGE_CONFIG)")
    p.add_argument("--data-dir", help="WAL and SQLite directory (env LLM_USAGE_DATA_DIR)")
    p.add_argument(
        "--database-url",
        help="e.g. postgresql+asyncpg://user:pass@host/db; default SQLite in the data dir "
        "(env LLM_USAGE_DATABASE_URL)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags (those named like a Settings field, when given) over env over file over defaults."""
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    return load_settings(**overrides)
