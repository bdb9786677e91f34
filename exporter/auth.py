"""Bearer tokens with scopes, compared in constant time.

`admin` implies every scope. With no tokens configured every request passes; the CLI refuses
to bind such a service to a non-loopback address unless told `--insecure`.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Literal

from exporter.config import Scope, TokenSpec

Verdict = Literal["ok", "unauthorized", "forbidden"]


class Authenticator:
    def __init__(self, tokens: Sequence[TokenSpec]) -> None:
        self._tokens = [(t.token.encode(), frozenset(t.scopes), t.name) for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def identify(self, authorization: str | None) -> tuple[str, frozenset[str]] | None:
        """(token name, scopes) for a valid `Bearer` header; every token is compared."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        candidate = presented.strip().encode()
        found: tuple[str, frozenset[str]] | None = None
        for secret, scopes, name in self._tokens:
            if hmac.compare_digest(candidate, secret) and found is None:
                found = (name, scopes)
        return found

    def check(self, authorization: str | None, scope: Scope) -> Verdict:
        if not self._tokens:
            return "ok"
        who = self.identify(authorization)
        if who is None:
            return "unauthorized"
        scopes = who[1]
        return "ok" if scope in scopes or "admin" in scopes else "forbidden"
