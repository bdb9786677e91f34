"""The parser and the dispatch: parse, load settings, configure logging, run the command.

Every way of failing to start ends here as one line on stderr and an exit code: 2 when the
configuration is wrong (fix it and retry), 1 when something at run time is (port in use,
database refusing migrations, an unreadable data dir). Secrets never appear: validation
errors are reworded without their inputs (`errors.one_line`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from exporter import __version__
from exporter.cli import db, reprice, serve
from exporter.cli.common import settings_from_args
from exporter.errors import StartupError, one_line
from exporter.logs import configure

__all__ = ["build_parser", "main"]

log = logging.getLogger("exporter")

#: One entry per command module; a new command is a new module and one line here.
COMMANDS = (serve, db, reprice)


def _version(args: argparse.Namespace) -> int:
    print(__version__)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-usage-exporter",
        description="Ingest LLM usage reports; export Prometheus metrics; keep billable rollups.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    sub.add_parser("version", help="print the version").set_defaults(run_plain=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "run_plain", None) is not None:
        plain: int = args.run_plain(args)
        return plain
    try:
        settings = settings_from_args(args)
    except (ValidationError, SettingsError, ValueError) as exc:
        print(f"llm-usage-exporter: invalid settings: {one_line(exc)}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format, [t.token for t in settings.tokens])
    try:
        code: int = args.run(args, settings)
    except StartupError as exc:
        log.error("%s", one_line(exc))
        return exc.exit_code
    except Exception as exc:  # unforeseen: still one line, and no password of a URL in it
        from exporter.store.db import redact_text

        log.error("cannot start: %s: %s", type(exc).__name__, redact_text(one_line(exc)))
        return 1
    return code
