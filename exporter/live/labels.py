"""Bounded, sanitized label values.

Each label keeps the set of values it has exported; past its cap, new values fold into
`__other__` so one noisy tenant cannot blow up Prometheus' memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable

OVERFLOW = "__other__"
MAX_LABEL_LENGTH = 128
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def sanitize(value: str) -> str:
    """Drop control characters and cap the length; escaping happens at render time."""
    if len(value) > MAX_LABEL_LENGTH:
        value = value[:MAX_LABEL_LENGTH]
    if _UNSAFE.search(value):
        value = _UNSAFE.sub("", value)
    return value


def escape(value: str) -> str:
    """Escape a label value for the text exposition formats."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


class BoundedLabel:
    """Admits at most `cap` distinct values for one label name."""

    __slots__ = ("_on_overflow", "_seen", "cap", "name")

    def __init__(self, name: str, cap: int, on_overflow: Callable[[str], None]) -> None:
        self.name = name
        self.cap = cap
        self._seen: set[str] = set()
        self._on_overflow = on_overflow

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        value = sanitize(value)
        if value in self._seen:
            return value
        if len(self._seen) >= self.cap:
            self._on_overflow(self.name)
            return OVERFLOW
        self._seen.add(value)
        return value

    def __len__(self) -> int:
        return len(self._seen)
