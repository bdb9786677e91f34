"""Budget specs indexed by what they match, so a report or a check touches only the specs
that can match it: O(matching budgets), not O(all budgets)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["SpecIndex"]

DIMENSIONS = ("user", "team", "api_key_id", "model")


class _Matchable(Protocol):
    @property
    def fixed(self) -> tuple[str | None, str | None, str | None, str | None]: ...


T = TypeVar("T", bound=_Matchable)


class SpecIndex(Generic[T]):
    """Each spec is filed under its first fixed field (user, team, api_key_id, model) and
    verified on the others; specs that fix nothing are global and always candidates."""

    def __init__(self, specs: Sequence[T]) -> None:
        self._global: list[T] = []
        self._by: tuple[dict[str, list[T]], ...] = ({}, {}, {}, {})
        for s in specs:
            for i, v in enumerate(s.fixed):
                if v is not None:
                    self._by[i].setdefault(v, []).append(s)
                    break
            else:
                self._global.append(s)

    def matching(self, user: str, team: str, api_key_id: str, model: str) -> list[T]:
        """Specs matching these identities, in configuration order of their index bucket."""
        key = (user, team, api_key_id, model)
        out = list(self._global)
        for i, v in enumerate(key):
            bucket = self._by[i].get(v)
            if bucket:
                out.extend(
                    s
                    for s in bucket
                    if all(f is None or f == key[j] for j, f in enumerate(s.fixed) if j > i)
                )
        return out
