"""`llm-usage-exporter reprice --from … --to … [--model …] [--dry-run]` (exporter.reprice)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from datetime import UTC, date, datetime, time

from exporter.config import Settings

__all__ = ["add_parser", "run"]


def _moment(value: str) -> datetime:
    """A date (UTC midnight) or an RFC 3339 time (naive means UTC)."""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or RFC 3339 time: {value!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "reprice",
        help="recompute stored costs with today's price data and price file",
        description="Re-price computed costs of audit rows completed in [--from, --to) and move "
        "the rollups by the exact difference, one transaction per batch. Idempotent: a second "
        "run changes nothing. Client-sent costs are never changed.",
    )
    common(p)
    p.add_argument(
        "--from", dest="since", type=_moment, required=True, help="date or time, inclusive"
    )
    p.add_argument(
        "--to", dest="until", type=_moment, required=True, help="date or time, exclusive"
    )
    p.add_argument("--model", help="only this model (exact name as stored)")
    p.add_argument("--price-file", help="user price file (default: the configured one)")
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
        print("llm-usage-exporter reprice: --to must be after --from")
        return 2
    if args.batch_size < 1:
        print("llm-usage-exporter reprice: --batch-size must be positive")
        return 2
    pricer = Pricer(args.price_file or settings.price_file)

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
            )
        finally:
            await store.close()
        if args.format == "json":
            print(json.dumps(result.as_json(), indent=2))
        else:
            print(result.as_text())
        return 0

    return asyncio.run(go())
