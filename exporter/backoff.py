"""Retry delays, in one place: exponential, capped, jittered so replicas do not retry in step."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: float = 0.2) -> float:
    """Delay before retry number `attempt` (1 = the first): base·2^(attempt−1), at most `cap`,
    times a random factor in [1 − jitter, 1 + jitter]."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return float(delay * random.uniform(1 - jitter, 1 + jitter))
