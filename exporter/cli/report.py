"""`llm-usage-exporter report`: /v1/stats as a table, CSV or JSON, from a running service
(`--url`, `--token`) or straight from the database (`--database-url` or the settings).

Both ways produce the same document (exporter.api.stats.stats_document), so the figures and
their definitions are the API's. Bad input exits 2 with the reason; an unreachable service or
database exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any, TextIO

from multidict import MultiDict

from exporter.cli.common import add_settings_flags
from exporter.config import Settings

__all__ = ["TABLE_FIELDS", "add_arguments", "register", "render", "run"]

#: What the table shows per group (CSV and JSON carry every figure).
TABLE_FIELDS = ("requests", "success_rate", "input_tokens", "output_tokens", "total_tokens",
                "cost_usd", "avg_duration_ms", "p95_duration_ms", "avg_ttft_ms")  # fmt: skip


class ReportError(Exception):
    """Bad input (exit 2) or, with code 1, a service or database that did not answer."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def register(sub: Any) -> None:
    rep = sub.add_parser("report", help="usage per group and period (as GET /v1/stats)")
    add_settings_flags(rep)
    add_arguments(rep)
    rep.set_defaults(run=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="since", help="start (RFC 3339 or YYYY-MM-DD); default 24h ago")
    p.add_argument("--to", dest="until", help="end, exclusive; default now")
    p.add_argument("--group-by", help="e.g. team,model or model,day (as /v1/stats group_by)")
    p.add_argument("--tz", help="IANA time zone for periods and dates (default UTC)")
    p.add_argument("--top", help="keep the N most expensive groups, fold the rest")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only matching requests, e.g. team=red (repeatable)",
    )
    p.add_argument(
        "--no-percentiles",
        dest="percentiles",
        action="store_false",
        help="answer from the rollups alone (p50/p95 scan the audit rows)",
    )
    p.add_argument("--format", dest="output", choices=["table", "csv", "json"], default="table")
    p.add_argument("--url", help="a running service, e.g. http://127.0.0.1:9470")
    p.add_argument("--token", help="bearer token with the read scope (env LLM_USAGE_TOKEN)")


def _query(args: argparse.Namespace) -> MultiDict[str]:
    q: MultiDict[str] = MultiDict()
    for key, value in (("from", args.since), ("to", args.until), ("group_by", args.group_by),
                       ("tz", args.tz), ("top", args.top)):  # fmt: skip
        if value is not None:
            q.add(key, value)
    if not args.percentiles:
        q.add("percentiles", "false")
    for item in args.filter:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReportError(f"--filter takes KEY=VALUE, not {item!r}")
        q.add(key.strip(), value)
    return q


def _from_service(url: str, token: str | None, q: MultiDict[str]) -> dict[str, Any]:
    target = f"{url.rstrip('/')}/v1/stats?{urllib.parse.urlencode(list(q.items()))}"
    if not target.startswith(("http://", "https://")):
        raise ReportError(f"--url must start with http:// or https://, not {url!r}")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(target, headers=headers)  # noqa: S310 (scheme checked)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise ReportError(f"the service refused: {message}", 2 if exc.code < 500 else 1) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ReportError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}", 1) from None


def _from_database(settings: Settings, q: MultiDict[str]) -> dict[str, Any]:
    from exporter.api.params import ParamError, parse_stats
    from exporter.api.stats import stats_document
    from exporter.store import Store
    from exporter.store.readsql import ReadError
    from exporter.store.stats import run_stats

    try:
        query = parse_stats(
            q,
            now=datetime.now(UTC),
            max_range_days=settings.read_max_range_days,
            retention_days=settings.retention_days,
            promoted_tags=getattr(settings, "promoted_tags", ()),
        )
    except ParamError as exc:
        raise ReportError(str(exc)) from None

    async def go() -> dict[str, Any]:
        store = Store.from_url(settings.effective_database_url, pool_size=1)
        try:
            return stats_document(
                query, await run_stats(store.engine, query, settings.read_time_limit)
            )
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except ReadError as exc:
        raise ReportError(f"database {_safe(settings)}: {exc}", 1) from None


def _safe(settings: Settings) -> str:
    from exporter.store.db import redact_url

    return redact_url(settings.effective_database_url)


def _cell(field: str, value: Any) -> str:
    if value is None:
        return "-"
    if field == "success_rate":
        return f"{value:.2%}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value) if value != "" else "(none)"


def _table(doc: dict[str, Any], out: TextIO) -> None:
    """Groups, then one bold totals row per period (one without a period)."""
    from rich.console import Console
    from rich.table import Table

    keys = list(doc["group_by"])
    table = Table(title=f"usage {doc['from']} to {doc['to']} ({doc['tz']})")
    for k in keys:
        table.add_column(k)
    for f in TABLE_FIELDS:
        table.add_column(f, justify="right")
    for row in doc["groups"]:
        table.add_row(*(_cell(k, row[k]) for k in (*keys, *TABLE_FIELDS)))
    table.add_section()
    for row in doc["totals"]:
        label = [_cell(k, row[k]) if row.get(k) is not None else "" for k in keys]
        if keys:
            label[0] = "TOTAL" if not label[0] else f"TOTAL {label[0]}"
        figures = [_cell(f, row[f]) for f in TABLE_FIELDS]
        table.add_row(*label, *figures, style="bold")
    width = max(100, int(os.environ.get("COLUMNS", "160") or 160))
    Console(file=out, width=width, no_color=True).print(table)


def render(doc: dict[str, Any], output: str, out: TextIO) -> None:
    if output == "json":
        out.write(json.dumps(doc, indent=2) + "\n")
    elif output == "csv":
        from exporter.api.stats import csv_columns, csv_text

        out.write(csv_text(csv_columns(doc), doc["groups"]))
    else:
        _table(doc, out)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        q = _query(args)
        token = args.token or os.environ.get("LLM_USAGE_TOKEN")
        doc = _from_service(args.url, token, q) if args.url else _from_database(settings, q)
    except ReportError as exc:
        print(f"llm-usage-exporter report: {exc}", file=sys.stderr)
        return exc.code
    render(doc, args.output, sys.stdout)
    return 0
