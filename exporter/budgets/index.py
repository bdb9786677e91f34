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
        #: per field: value → [(spec, the later fields it also fixes as (position, value))]
        self._by: tuple[dict[str, list[tuple[T, tuple[tuple[int, str], ...]]]], ...] = (
            {}, {}, {}, {},
        )  # fmt: skip
        for s in specs:
            for i, v in enumerate(s.fixed):
                if v is not None:
                    rest = tuple((j, f) for j, f in enumerate(s.fixed) if j > i and f is not None)
                    self._by[i].setdefault(v, []).append((s, rest))
                    break
            else:
                self._global.append(s)

    def matching(self, user: str, team: str, api_key_id: str, model: str) -> list[T]:
        """Specs matching these identities: the global ones, then by field."""
        key = (user, team, api_key_id, model)
        out = list(self._global)
        for i, v in enumerate(key):
            bucket = self._by[i].get(v)
            if bucket:
                for s, rest in bucket:
                    if not rest or all(key[j] == f for j, f in rest):
                        out.append(s)
        return out
