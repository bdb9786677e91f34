"""Settings: CLI flags > env (LLM_USAGE_*) > config file (TOML/YAML) > defaults."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

__all__ = [
    "ENV_PREFIX",
    "BudgetSpec",
    "Scope",
    "Settings",
    "TokenSpec",
    "check_env_names",
    "load_settings",
]

ENV_PREFIX = "LLM_USAGE_"

#: Variables with our prefix that are not settings, and who reads them.
NOT_SETTINGS = {"LLM_USAGE_DEMO_TOKEN": "docker-compose.yml (the demo stack's token)"}

#: URL schemes without an async driver, rewritten to the driver the service runs on.
_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}

#: where instrumentations record the caller, first match wins (settings: otel_user_attributes)
DEFAULT_USER_ATTRIBUTES = (
    "gen_ai.user",
    "gen_ai.request.user",
    "user.id",
    "enduser.id",
    "llm.user",
    "traceloop.association.properties.user_id",
    "ai.telemetry.metadata.userId",
    "langfuse.user.id",
    "session.user_id",
)
#: a tag key (report tags, promoted_tags, the read API's tag:<key>)
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.-]+$"

Scope = Literal["ingest", "read", "admin"]
ExtraLabel = Literal["provider", "team"]
BudgetDimension = Literal["user", "team", "api_key_id", "model"]
#: budget windows: calendar ones, and rolling lengths of whole hours ("30d", "7d", "24h")
CALENDAR_WINDOWS = ("day", "week", "month")
ROLLING_WINDOW = r"^([1-9][0-9]{0,4})([dh])$"


class TokenSpec(BaseModel):
    """A bearer token and what it may do. `name` is what logs show; the token never is."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    token: str = Field(min_length=16, max_length=512)
    scopes: list[Scope] = Field(min_length=1)


class BudgetSpec(BaseModel):
    """One spending limit. Empty match fields mean "any"; all empty is a global budget.

    `per` makes it a template: one budget per distinct value of that field (every user gets
    their own $20). `window` is day|week|month (in `timezone`, UTC by default) or a rolling
    length of whole hours such as "30d", "7d" or "24h".
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    user: str | None = None
    team: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    per: BudgetDimension | None = None
    window: str = "month"
    timezone: str | None = None
    limit_usd: Decimal = Field(gt=0, max_digits=20, decimal_places=10)
    warn_ratios: list[float] = Field(default_factory=lambda: [0.8])

    @field_validator("warn_ratios")
    @classmethod
    def _ratios_in_range(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v):
            raise ValueError("warn ratios must be between 0 and 1 (exclusive)")
        return sorted(v)

    @model_validator(mode="after")
    def _window_and_template(self) -> BudgetSpec:
        rolling = re.match(ROLLING_WINDOW, self.window) is not None
        if self.window not in CALENDAR_WINDOWS and not rolling:
            raise ValueError(
                f"window must be day, week, month or a length like 30d / 24h: {self.window!r}"
            )
        if self.timezone not in (None, "UTC"):
            if rolling:
                raise ValueError("rolling windows are whole UTC hours: no timezone")
            try:
                ZoneInfo(self.timezone)
            except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
                raise ValueError(f"unknown IANA time zone: {self.timezone!r}") from None
        if self.per is not None and getattr(self, self.per) is not None:
            raise ValueError(f"per = {self.per!r} cannot also match a fixed {self.per}")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # where
    host: str = "127.0.0.1"
    port: int = Field(default=9470, ge=0, le=65535)
    config: Path | None = None
    data_dir: Path = Path("./data")
    database_url: str | None = None  # default: sqlite file in data_dir
    auto_migrate: bool = True
    insecure: bool = False  # allow a non-loopback bind with no token
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    #: processes serving `port` together (SO_REUSEPORT), each with its own WAL in
    #: `<data_dir>/worker-<i>`; 1 = one process on `data_dir` (docs/operations.md)
    workers: int = Field(default=1, ge=1, le=64)
    #: with workers > 1, worker i also listens on `worker_port + i` (its own /metrics,
    #: /readyz); default port + 1 (ephemeral ports when port is 0)
    worker_port: int | None = Field(default=None, ge=0, le=65535)

    # security and limits
    tokens: list[TokenSpec] = Field(default_factory=list)
    metrics_auth: bool = False  # require a `read` token for /metrics too
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_batch_items: int = Field(default=10_000, ge=1)

    # live metrics
    extra_labels: list[ExtraLabel] = Field(default_factory=list)
    max_users: int = Field(default=2000, ge=1)
    max_models: int = Field(default=500, ge=1)
    max_operations: int = Field(default=50, ge=1)
    max_providers: int = Field(default=100, ge=1)
    max_teams: int = Field(default=500, ge=1)
    #: live label sets in total, past it new ones fold into `__other__` (~1 KB each)
    max_series: int = Field(default=100_000, ge=1)
    dedupe_cache_size: int = Field(default=200_000, ge=0)
    duration_buckets: list[float] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300]
    )
    ttft_buckets: list[float] = Field(
        default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]
    )

    # estimation of incomplete streams (GPUStack semantics)
    bytes_per_input_token: float = Field(default=4.0, gt=0)
    tokens_per_output_chunk: float = Field(default=1.0, gt=0)

    # write-ahead log and flush
    wal_durability: Literal["fsync", "os"] = "fsync"
    wal_max_bytes: int = Field(default=1024**3, ge=1024)
    wal_segment_bytes: int = Field(default=16 * 1024**2, ge=1024)
    flush_interval: float = Field(default=10.0, gt=0)
    flush_max_reports: int = Field(default=50_000, ge=1)
    flush_max_backoff: float = Field(default=60.0, gt=0)
    #: /readyz answers 503 after this many flush failures in a row
    flush_unready_after_failures: int = Field(default=3, ge=1)
    #: SQLite: the flush runs in a child process (exporter/store/flush_process.py)
    sqlite_flush_process: bool = True
    retention_days: int = Field(default=400, ge=1)

    # read API (docs/api.md)
    read_max_range_days: int = Field(default=400, ge=1)
    read_time_limit: float = Field(default=10.0, gt=0)  # seconds per read query
    trace_max_requests: int = Field(default=10_000, ge=1)

    # clients: where OTel spans name the caller (first match wins), attribution tags
    otel_user_attributes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_USER_ATTRIBUTES), min_length=1, max_length=32
    )
    #: tag keys promoted to rollup dimensions and to `tag_<key>` labels (each capped)
    promoted_tags: list[Annotated[str, Field(pattern=TAG_KEY_PATTERN, max_length=64)]] = Field(
        default_factory=list, max_length=5
    )
    max_tag_values: int = Field(default=100, ge=1)
    # accepted means kept (helper "wal"): the dedupe window and connection hygiene
    #: reports completed longer ago are refused (422 too_old); default 90% of retention_days
    max_report_age_days: float | None = Field(default=None, gt=0)
    #: reports completed further ahead of this clock are refused (422 too_far_in_future)
    max_future_skew_seconds: float = Field(default=3600.0, ge=0)
    #: idle keep-alive and request-head timeout (a slowloris never completes its headers)
    http_keepalive_timeout: float = Field(default=15.0, gt=0)
    #: a request body not fully received this long after its head is cut off
    http_body_timeout: float = Field(default=30.0, gt=0)
    #: open connections at most; default: the file descriptor limit minus a reserve
    http_max_connections: int | None = Field(default=None, ge=1)

    # pricing and budgets
    price_file: Path | None = None
    budgets: list[BudgetSpec] = Field(default_factory=list)
    budget_refresh_interval: float = Field(default=30.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, v: str | None) -> str | None:
        """`postgresql://…` (as libpq and most docs spell it) means asyncpg here; other
        drivers are refused when the store opens, naming the two that work."""
        if v is None:
            return None
        scheme, sep, rest = v.partition("://")
        driver = _ASYNC_DRIVERS.get(scheme.lower()) if sep else None
        return f"{driver}://{rest}" if driver else v

    @field_validator("duration_buckets", "ttft_buckets")
    @classmethod
    def _buckets_sorted(cls, v: list[float]) -> list[float]:
        if not v or sorted(set(v)) != v or v[0] <= 0:
            raise ValueError("buckets must be positive, unique and increasing")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for kind, names in (
            ("token", [t.name for t in self.tokens]),
            ("budget", [b.name for b in self.budgets]),
        ):
            if len(names) != len(set(names)):
                raise ValueError(f"{kind} names must be unique")
        if self.max_report_age_days is not None and self.max_report_age_days >= self.retention_days:
            raise ValueError(
                f"max_report_age_days ({self.max_report_age_days:g}) must be shorter than "
                f"retention_days ({self.retention_days}): the audit rows are the dedupe index, "
                "and a report older than them would be counted again"
            )
        return self

    @property
    def max_report_age(self) -> timedelta:
        """The dedupe window: shorter than retention so a retry always meets its audit row."""
        days = self.max_report_age_days
        return timedelta(days=days if days is not None else 0.9 * self.retention_days)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'usage.db').resolve()}"

    @property
    def wal_dir(self) -> Path:
        return self.data_dir / "wal"

    def bind_is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)


def check_env_names(environ: Mapping[str, str]) -> None:
    """A `LLM_USAGE_*` variable that names no setting is a typo: refuse it, suggesting the
    nearest name, rather than silently run on the default."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(
        k
        for k in environ
        if k.upper().startswith(ENV_PREFIX) and k.upper() not in known | set(NOT_SETTINGS)
    )
    if not unknown:
        return
    problems = []
    for name in unknown:
        near = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
        problems.append(f"{name} (did you mean {near[0]}?)" if near else name)
    raise ValueError(f"unknown environment variable(s): {', '.join(problems)}")


def load_settings(**overrides: Any) -> Settings:
    """Build settings, layering the config file (named by flag or env) under env and flags."""
    check_env_names(os.environ)
    probe = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if probe.config is None:
        return probe
    path = probe.config
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise ValueError(f"config file must be .toml, .yaml or .yml: {path}")
    try:  # the sources parse at construction; tomllib / yaml errors don't name the file
        file_source: PydanticBaseSettingsSource
        if path.suffix == ".toml":
            file_source = TomlConfigSettingsSource(Settings, toml_file=path)
        else:
            file_source = YamlConfigSettingsSource(Settings, yaml_file=path)
        from_file = file_source()
    except Exception as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from None
    unknown = set(from_file) - set(Settings.model_fields)
    if unknown:
        raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
    explicit = {k: v for k, v in overrides.items() if v is not None}
    from_env = Settings().model_dump(exclude_unset=True)
    return Settings(**{**from_file, **from_env, **explicit})
