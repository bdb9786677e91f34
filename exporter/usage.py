"""The canonical usage report: one model call, validated strictly.

Token semantics follow OpenAI, OpenTelemetry GenAI and genai-prices: `input_tokens` counts ALL
input, cache reads (`cached_input_tokens`) and cache writes (`cache_creation_input_tokens`)
included. Adapters convert shapes that report them disjointly (Anthropic).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from operator import itemgetter
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from exporter.config import TAG_KEY_PATTERN
from exporter.money import MAX_COST_USD as MAX_COST_USD
from exporter.money import parse_cost
from exporter.timeutil import as_utc

MAX_TOKENS = 10**12  # far above any real call; stops overflow games
MAX_STRING = 256
MAX_ID = 128
MAX_TAGS = 16
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
#: tag keys: letters, digits and _ . - (also how the read API names them: `tag:<key>`)
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2200, 1, 1, tzinfo=UTC)


class Operation(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANK = "rerank"
    IMAGE_GENERATION = "image_generation"
    AUDIO_SPEECH = "audio_speech"
    AUDIO_TRANSCRIPTION = "audio_transcription"
    RESPONSES = "responses"
    OTHER = "other"


class Status(StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"


_OPERATION_ALIASES: dict[str, Operation] = {
    **{op.value: op for op in Operation},
    "chat_completion": Operation.CHAT,
    "chat_completions": Operation.CHAT,
    "chat.completions": Operation.CHAT,
    "chat.completion": Operation.CHAT,
    "messages": Operation.CHAT,
    "generate_content": Operation.CHAT,
    "completions": Operation.COMPLETION,
    "text_completion": Operation.COMPLETION,
    "embeddings": Operation.EMBEDDING,
    "create_embedding": Operation.EMBEDDING,
    "reranking": Operation.RERANK,
    "image": Operation.IMAGE_GENERATION,
    "images": Operation.IMAGE_GENERATION,
    "image_generations": Operation.IMAGE_GENERATION,
    "images.generations": Operation.IMAGE_GENERATION,
    "speech": Operation.AUDIO_SPEECH,
    "tts": Operation.AUDIO_SPEECH,
    "text_to_speech": Operation.AUDIO_SPEECH,
    "audio.speech": Operation.AUDIO_SPEECH,
    "transcription": Operation.AUDIO_TRANSCRIPTION,
    "transcriptions": Operation.AUDIO_TRANSCRIPTION,
    "audio_transcriptions": Operation.AUDIO_TRANSCRIPTION,
    "audio.transcriptions": Operation.AUDIO_TRANSCRIPTION,
    "speech_to_text": Operation.AUDIO_TRANSCRIPTION,
    "stt": Operation.AUDIO_TRANSCRIPTION,
    "response": Operation.RESPONSES,
    # LiteLLM call types (its OTel spans and StandardLoggingPayload use them as they are)
    "acompletion": Operation.CHAT,
    "anthropic_messages": Operation.CHAT,
    "aembedding": Operation.EMBEDDING,
    "atext_completion": Operation.COMPLETION,
    "aresponses": Operation.RESPONSES,
    "responses_api": Operation.RESPONSES,
    "image_generation": Operation.IMAGE_GENERATION,
    "aimage_generation": Operation.IMAGE_GENERATION,
    "atranscription": Operation.AUDIO_TRANSCRIPTION,
    "aspeech": Operation.AUDIO_SPEECH,
    "arerank": Operation.RERANK,
    "generate_text": Operation.CHAT,
    "stream_text": Operation.CHAT,
    "embed": Operation.EMBEDDING,
}


OPERATION_VALUES = frozenset(op.value for op in Operation)


def normalize_operation(value: Any) -> Any:
    """Map GPUStack, OpenTelemetry and endpoint-style names onto our operations.

    Applied by the adapters before validation (only when the value is not already canonical),
    so the model itself validates the enum in Rust.
    """
    if isinstance(value, str):
        return _OPERATION_ALIASES.get(value.strip().lower(), Operation.OTHER).value
    return value


_STATUS_ALIASES: dict[str, Status] = {
    **{s.value: s for s in Status},
    "ok": Status.SUCCESS,
    "completed": Status.SUCCESS,
    "succeeded": Status.SUCCESS,
    "failed": Status.ERROR,
    "failure": Status.ERROR,
    "canceled": Status.CANCELLED,
}
STATUS_VALUES = frozenset(s.value for s in Status)


def normalize_status(value: Any) -> Any:
    """Accept common aliases (ok, completed, failed, canceled); others fail validation."""
    if isinstance(value, str):
        status = _STATUS_ALIASES.get(value.strip().lower())
        if status is not None:
            return status.value
    return value


def _utc(value: datetime, name: str) -> datetime:
    """Naive means UTC; the range is checked before converting, so no overflow on conversion."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not _EARLIEST <= aware < _LATEST:
        raise ValueError(f"{name} must be between 2000-01-01 and 2200-01-01")
    return as_utc(aware)


TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
Name = Annotated[str, Field(max_length=MAX_STRING)]
Ident = Annotated[str, Field(max_length=MAX_ID)]
#: RFC 3339 text (naive means UTC) or unix seconds / milliseconds; parsed by pydantic-core.
Timestamp = Annotated[datetime, Field(strict=False)]
Millis = Annotated[float, Field(ge=0, le=7 * 24 * 3600 * 1000)]
#: exact USD: a decimal string, an int, or a JSON number (through its shortest repr); rounded
#: half-even to 1e-10 and capped at MAX_COST_USD (exporter.money)
Cost = Annotated[Decimal, BeforeValidator(parse_cost)]

#: Units providers bill besides input/output tokens, each a part of the count named beside it
#: (genai-prices semantics); pricing uses every one, and the audit row stores them.
BILLED_UNITS: dict[str, str] = {
    "cache_creation_1h_input_tokens": "cache_creation_input_tokens",
    "input_audio_tokens": "input_tokens",
    "cached_audio_input_tokens": "cached_input_tokens",
    "output_audio_tokens": "output_tokens",
    "input_image_tokens": "input_tokens",
    "output_image_tokens": "output_tokens",
    "web_search_requests": "",
}
TagKey = Annotated[str, Field(min_length=1, max_length=MAX_TAG_KEY, pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, Field(max_length=MAX_TAG_VALUE)]
Tags = Annotated[dict[TagKey, TagValue], Field(max_length=MAX_TAGS)]
#: identity strings both backends must store identically: Postgres text refuses NUL (and the
#: driver would otherwise turn it into something else), so two ids differing only there would
#: be counted twice live and stored once. Lone surrogates are refused by pydantic-core already.
_IDENTITY_FIELDS = ("request_id", "model", "provider", "user", "team", "api_key_id",
                    "trace_id", "parent_id", "node", "error_type")  # fmt: skip
_identities = itemgetter(*_IDENTITY_FIELDS)
_counts = itemgetter("input_tokens", "output_tokens", "cached_input_tokens",
                     "cache_creation_input_tokens", "reasoning_tokens", "total_tokens")  # fmt: skip
#: the billed units that are parts of another count (web_search_requests is not)
_BILLED_PARTS = tuple(k for k, whole in BILLED_UNITS.items() if whole)
_billed_parts = itemgetter(*_BILLED_PARTS)
_NO_BILLED_PARTS = (0,) * len(_BILLED_PARTS)


_SUCCESS = Status.SUCCESS  # a module global: the class attribute costs an enum lookup


class UsageReport(BaseModel):
    """One model call. Unknown fields are rejected so typos don't silently lose data."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=False, validate_assignment=False)

    request_id: Ident = Field(default_factory=lambda: os.urandom(16).hex(), min_length=1)
    model: Annotated[str, Field(min_length=1, max_length=MAX_STRING)]
    provider: Name = ""
    operation: Annotated[Operation, Field(strict=False)] = Operation.CHAT
    user: Name = ""
    team: Name = ""
    api_key_id: Name = ""
    trace_id: Ident = ""
    parent_id: Ident = ""
    node: Name = ""

    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cached_input_tokens: TokenCount = 0
    cache_creation_input_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    total_tokens: TokenCount | None = None
    #: billed extras (BILLED_UNITS): cache writes kept 1 hour (the rest of
    #: cache_creation_input_tokens are 5-minute writes), audio and image tokens, cache reads
    #: of audio, web-search requests; and the provider's service tier (flex, priority, batch…)
    cache_creation_1h_input_tokens: TokenCount = 0
    input_audio_tokens: TokenCount = 0
    cached_audio_input_tokens: TokenCount = 0
    output_audio_tokens: TokenCount = 0
    input_image_tokens: TokenCount = 0
    output_image_tokens: TokenCount = 0
    web_search_requests: TokenCount = 0
    service_tier: Annotated[str, Field(max_length=32)] = ""

    status: Annotated[Status, Field(strict=False)] = Status.SUCCESS
    error_type: Name = ""
    stream: bool = False
    completed: bool = True
    output_chunk_count: TokenCount | None = None
    request_content_bytes: Annotated[int, Field(ge=0, le=10**12)] | None = None
    estimated: bool = False

    started_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    duration_ms: Millis | None = None
    ttft_ms: Millis | None = None
    #: client-sent cost (exact, capped: exporter.money); otherwise priced at completed_at
    cost_usd: Cost | None = None
    #: why cost_usd is None after pricing (pricing.Unpriced), '' when priced or sent; set by
    #: ingest, never taken from the client
    unpriced_reason: Annotated[str, Field(max_length=32)] = ""
    #: the cost came from the client (never re-priced); set by ingest, never by the client
    cost_sent: bool = False
    source: Annotated[str, Field(max_length=32)] = "canonical"
    #: free-form attribution (project, feature, env…), stored with the audit row
    tags: Tags | None = None

    @model_validator(mode="after")
    def _check_arithmetic(self) -> UsageReport:
        # Runs once per report inside pydantic's call: plain dict reads through itemgetters
        # (C), not attribute lookups; the rare failures re-read by name for their message.
        d = self.__dict__
        if "\x00" in "".join(_identities(d)):
            bad = [k for k in _IDENTITY_FIELDS if "\x00" in d[k]]
            raise ValueError(f"{', '.join(bad)} must not contain NUL (\\x00) characters")
        tags = d["tags"]
        if tags and any("\x00" in v for v in tags.values()):
            raise ValueError("tag values must not contain NUL (\\x00) characters")
        inp, out, cached, creation, reasoning, sent_total = _counts(d)
        if cached + creation > inp:
            raise ValueError(
                f"cached_input_tokens + cache_creation_input_tokens ({cached + creation}) exceed "
                f"input_tokens ({inp}); input_tokens must include cache tokens"
            )
        if reasoning > out:
            raise ValueError(f"reasoning_tokens ({reasoning}) exceed output_tokens ({out})")
        if _billed_parts(d) != _NO_BILLED_PARTS:  # a tuple compare: ~0.1 µs under any()
            self._check_billed_units()
        total = inp + out
        if sent_total is not None and sent_total != total:
            raise ValueError(
                f"total_tokens ({sent_total}) != input_tokens + output_tokens ({total})"
            )
        d["total_tokens"] = total  # plain writes: pydantic's __setattr__ costs ~0.3 µs each
        started, completed = d["started_at"], d["completed_at"]
        if started is not None:
            d["started_at"] = started = _utc(started, "started_at")
        if completed is not None:
            d["completed_at"] = completed = _utc(completed, "completed_at")
        status = d["status"]
        if status is not _SUCCESS and not d["error_type"]:
            d["error_type"] = status.value
        if started and completed and d["duration_ms"] is None:
            delta = (completed - started).total_seconds() * 1000
            if delta >= 0:
                d["duration_ms"] = delta
        return self

    def _check_billed_units(self) -> None:
        """Each billed unit is a part of its parent count; modalities do not overlap."""
        pairs = (
            ("cache_creation_1h_input_tokens", self.cache_creation_1h_input_tokens,
             "cache_creation_input_tokens", self.cache_creation_input_tokens),
            ("input_audio_tokens + input_image_tokens",
             self.input_audio_tokens + self.input_image_tokens,
             "input_tokens", self.input_tokens),
            ("output_audio_tokens + output_image_tokens",
             self.output_audio_tokens + self.output_image_tokens,
             "output_tokens", self.output_tokens),
            ("cached_audio_input_tokens", self.cached_audio_input_tokens,
             "cached_input_tokens", self.cached_input_tokens),
            ("cached_audio_input_tokens", self.cached_audio_input_tokens,
             "input_audio_tokens", self.input_audio_tokens),
        )  # fmt: skip
        for part, value, whole, limit in pairs:
            if value > limit:
                raise ValueError(f"{part} ({value}) exceed {whole} ({limit})")

    def estimate_incomplete_stream(
        self, bytes_per_input_token: float, tokens_per_output_chunk: float
    ) -> None:
        """GPUStack semantics: an unfinished stream has no usage block, so estimate it."""
        if self.completed or (self.input_tokens and self.output_tokens):
            return
        changed = False
        if not self.input_tokens and self.request_content_bytes:
            self.input_tokens = round(
                min(MAX_TOKENS, self.request_content_bytes / bytes_per_input_token)
            )
            changed = True
        if not self.output_tokens and self.output_chunk_count:
            self.output_tokens = round(
                min(MAX_TOKENS, self.output_chunk_count * tokens_per_output_chunk)
            )
            changed = True
        if changed:
            self.estimated = True
            self.total_tokens = self.input_tokens + self.output_tokens
