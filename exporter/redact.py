"""Hide secrets in free text: the second line of defence behind logging no header values.

Every log handler runs `RedactFilter`, so a traceback or a library's message that echoes a
request line still reaches the log without its bearer token, `key=`/`token=`/`password=`
parameter or URL password. Configured secrets (bearer tokens) are also replaced literally.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["MASK", "PASSWORD_IN_URL", "RedactFilter", "Redactor", "redact_text"]

MASK = "<redacted>"
#: scheme://user:password@host; `\g<pre>***@` keeps the user and host
PASSWORD_IN_URL = re.compile(r"(?P<pre>[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s]*@")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (PASSWORD_IN_URL, r"\g<pre>***@"),
    # Authorization: Bearer <token>, Basic <b64>, also inside repr'd bytes
    (
        re.compile(r"(?i)\b(?P<pre>bearer|basic)(?P<sep>\s+|%20|\+)[^\s,;\"'<>]+"),
        rf"\g<pre>\g<sep>{MASK}",
    ),
    # `key=`, `token=`, `password=`… parameters (query strings, DSNs, form bodies)
    (
        re.compile(
            r"(?i)(?P<pre>\b[\w.-]*(?:key|token|secret|passw(?:or)?d|pwd|signature|session|auth)"
            r"(?:=|%3d)[\"']?)(?!<redacted>)[^\s&\"',;<>]+"
        ),
        rf"\g<pre>{MASK}",
    ),
    # credential headers and JSON keys: `X-Api-Key: abc…`, `"api_key": "sk-…"` (8+ chars, so
    # prose such as "authorization: Extra inputs are not permitted" stays readable)
    (
        re.compile(
            r"(?i)(?P<pre>\b(?:proxy-)?(?:authorization|x-api-key|api[_-]?key|access[_-]?key"
            r"|x-auth-token|auth[_-]?token|access[_-]?token|secret|password|(?:set-)?cookie)"
            r"[\"']?\s*:\s*[\"']?)(?!<redacted>|(?:bearer|basic)\b)[A-Za-z0-9._~+/=-]{8,}"
        ),
        rf"\g<pre>{MASK}",
    ),
)


def redact_text(text: str) -> str:
    """Apply the patterns (URL passwords, bearer tokens, credential-named parameters)."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class Redactor:
    """The patterns plus literal known secrets (configured tokens), longest first."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return redact_text(text)


class RedactFilter(logging.Filter):
    """Rewrites a record's message and traceback text, once, before any formatter sees it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        message = record.getMessage()
        clean = self._redact(message)
        record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        record.exc_info = None  # formatters would re-render the raw traceback
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        for field in ("path", "reason", "peer"):
            value = getattr(record, field, None)
            if isinstance(value, str):
                setattr(record, field, self._redact(value))
        record._redacted = True
        return True
