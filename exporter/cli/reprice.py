"""`llm-usage-exporter reprice --from … --to … [--model …] [--dry-run]` (exporter.reprice)."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, date, datetime, time
from typing import Any

from exporter.cli.common import add_settings_flags
from exporter.config import Settings
from exporter.errors import ConfigError

__all__ = ["register"]


def _moment(value: str) -> datetime:
    """A date (UTC midnight) or an RFC 3339 time (naive means UTC)."""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or RFC 3339 time: {value!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "reprice",
        help="recompute stored costs with today's price data and price file",
        description="Re-price computed costs of audit rows completed in [--from, --to) and move "
        "the rollups by the exact difference, one transaction per batch. Idempotent: a second "
        "run changes nothing. Client-sent costs are never changed.",
    )
    add_settings_flags(p)
    p.add_argument(
        "--from", dest="since", type=_moment, required=True, help="date or time, inclusive"
    )
    p.add_argument(
        "--to", dest="until", type=_moment, required=True, help="date or time, exclusive"
    )
    p.add_argument("--model", help="only this model (exact name as stored)")
    p.add_argument("--price-file", help="user price file (default: the configured one)")
    p.set_defaults(run=run)
    p.add_argument(
        "--dry-run", action="store_true", help="report what would change, change nothing"
    )
    p.add_argument("--batch-size", type=int, default=1000, help="rows per transaction")
    p.add_argument("--format", choices=["text", "json"], default="text")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from exporter.pricing import Pricer
    from exporter.reprice import reprice
    from exporter.store import Store

    if args.until <= args.since:
        raise ConfigError("reprice: --to must be after --from")
    if args.batch_size < 1:
        raise ConfigError("reprice: --batch-size must be positive")
    try:
        pricer = Pricer(settings.price_file)  # --price-file overrides the setting
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    async def go() -> int:
        store = Store.from_url(settings.effective_database_url)
        try:
            result = await reprice(
                store.engine,
                pricer,
                args.since,
                args.until,
                args.model,
                dry_run=args.dry_run,
                batch_size=args.batch_size,
                promoted_tags=settings.promoted_tags,
            )
        finally:
            await store.close()
        if args.format == "json":
            print(json.dumps(result.as_json(), indent=2))
        else:
            print(result.as_text())
        return 0

    return asyncio.run(go())
