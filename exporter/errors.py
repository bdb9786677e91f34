"""Start-up errors and their one-line wording: whose fault (exit 2 config, 1 runtime), no secrets.

Pydantic's own text echoes the offending input (`input_value='…'`), which for a token is the
secret itself, so validation errors are reworded from their structured form, never `str()`.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

__all__ = ["ConfigError", "StartupError", "one_line"]

_MAX_CHARS = 600


class StartupError(Exception):
    """The service cannot start for a reason outside the configuration (exit code 1)."""

    exit_code = 1


class ConfigError(StartupError):
    """The configuration is wrong: fix a flag, a variable or a file (exit code 2)."""

    exit_code = 2


def _validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return "; ".join(parts)


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line, with validation errors stripped of their inputs."""
    if isinstance(exc, ValidationError):
        text = _validation(exc)
    else:
        text = str(exc) or type(exc).__name__
        cause = exc.__cause__
        if isinstance(cause, ValidationError):  # "invalid X: {pydantic text}" → reworded
            raw = str(cause)
            head = text[: -len(raw)] if text.endswith(raw) else f"{text}: "
            text = head + _validation(cause)
        elif isinstance(cause, json.JSONDecodeError):  # its text has no input, just where
            text = f"{text}: {cause}"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 1] + "…"
