"""The token sums every read answer carries, defined once for the OpenAPI document."""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["TokenSums"]


class TokenSums(BaseModel):
    """Token counts; `input_tokens` includes cache reads and writes (OpenAI semantics)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_creation_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
