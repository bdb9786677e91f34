"""Expected totals for the real-client tests, computed from what the fake LLM server sent.

Costs come from genai-prices' own `calc_price` (not our cached rates), token sums from the raw
usage blocks with each provider's documented semantics, so nothing here reuses the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from genai_prices import Usage, calc_price
from helpers import wait_ready
from sqlalchemy import select

from exporter.app import FLUSHER, STORE
from exporter.store.tables import usage_details


@dataclass
class Expected:
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0
    user: str = ""
    error: bool = False

    def cost(self) -> Decimal:
        if self.error:
            return Decimal(0)
        usage = Usage(
            input_tokens=self.input_tokens,
            cache_read_tokens=self.cached,
            cache_write_tokens=self.cache_write,
            output_tokens=self.output_tokens,
        )
        return Decimal(str(calc_price(usage, self.model, provider_id=self.provider).total_price))


def from_call(call: Mapping[str, Any], provider: str, user: str = "") -> Expected:
    """One fake-server answer as the provider documents its usage block."""
    if call.get("error"):
        return Expected(call["model"], provider, 0, 0, user=user, error=True)
    u = call["usage"]
    if call["kind"] == "anthropic":
        read, write = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
        return Expected(call["model"], provider, u["input_tokens"] + read + write,
                        u["output_tokens"], read, write, user=user)  # fmt: skip
    if call["kind"] == "responses":
        d = u["input_tokens_details"]
        return Expected(call["model"], provider, u["input_tokens"], u["output_tokens"],
                        d["cached_tokens"], d["cache_write_tokens"],
                        u["output_tokens_details"]["reasoning_tokens"], user=user)  # fmt: skip
    d = u.get("prompt_tokens_details") or {}
    r = u.get("completion_tokens_details") or {}
    return Expected(call["model"], provider, u["prompt_tokens"], u.get("completion_tokens", 0),
                    d.get("cached_tokens", 0), d.get("cache_write_tokens", 0),
                    r.get("reasoning_tokens", 0), user=user)  # fmt: skip


def metric_totals(samples: Mapping[Any, float], name: str) -> float:
    return sum(v for (n, _labels), v in samples.items() if n == name)


def assert_metrics(samples: Mapping[Any, float], expected: Iterable[Expected]) -> None:
    exp = list(expected)
    pairs = {
        "llm_requests_total": len(exp),
        "llm_request_errors_total": sum(e.error for e in exp),
        "llm_input_tokens_total": sum(e.input_tokens for e in exp),
        "llm_output_tokens_total": sum(e.output_tokens for e in exp),
        "llm_cached_input_tokens_total": sum(e.cached for e in exp),
        "llm_cache_creation_input_tokens_total": sum(e.cache_write for e in exp),
        "llm_reasoning_tokens_total": sum(e.reasoning for e in exp),
    }
    for name, want in pairs.items():
        assert metric_totals(samples, name) == want, name
    cost = metric_totals(samples, "llm_cost_usd_total")
    want_cost = float(sum((e.cost() for e in exp), Decimal(0)))
    assert abs(cost - want_cost) <= 1e-9 * max(1.0, want_cost), (cost, want_cost)
    for e in exp:
        if e.user:
            users = {dict(labels).get("user") for (n, labels), _ in samples.items()
                     if n == "llm_requests_total"}  # fmt: skip
            assert e.user in users, (e.user, users)


async def stored_rows(client: Any) -> list[dict[str, Any]]:
    """Flush the app's WAL into its database and read the audit rows back."""
    await wait_ready(client)  # the schema is migrated in the background at start-up
    app = client.server.app
    await app[FLUSHER].flush_once()
    async with app[STORE].engine.connect() as conn:
        rows = (await conn.execute(select(usage_details))).mappings().all()
    return [dict(r) for r in rows]


def assert_stored(rows: list[dict[str, Any]], expected: Iterable[Expected]) -> None:
    """Rows match the expected reports one to one (model, tokens, user, status, exact cost)."""
    q = Decimal("1e-10")

    def money(v: Any) -> Decimal:
        return Decimal(str(v if v is not None else 0)).quantize(q, rounding=ROUND_HALF_EVEN)

    exp = list(expected)
    assert len(rows) == len(exp)
    got = sorted((r["model"], r["provider"], r["input_tokens"], r["output_tokens"],
                  r["cached_input_tokens"], r["cache_creation_input_tokens"],
                  r["reasoning_tokens"], r["user"], r["status"] == "error",
                  money(r["cost_usd"])) for r in rows)  # fmt: skip
    want = sorted((e.model, e.provider, e.input_tokens, e.output_tokens, e.cached,
                   e.cache_write, e.reasoning, e.user, e.error, money(e.cost()))
                  for e in exp)  # fmt: skip
    assert got == want
