"""Command line: `llm-usage-exporter serve | db upgrade | report | version`, one module per command.

A command module exports `register(subparsers)`, which adds its parser and sets
`run=<function(args, settings) -> exit code>` (or `run_plain=<function(args) -> int>` for a
command that needs no settings). Flags whose `dest` is a `Settings` field override it.
"""

from __future__ import annotations

from exporter.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
