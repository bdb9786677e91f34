"""Query-string parameters of the read API: one table per route, used to validate requests and
to describe them in /openapi.json, so the documentation and the checks cannot drift apart.

Every refusal is a `ParamError` with a message that says what is allowed (a 400).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from multidict import MultiMapping

from exporter.store.calendar import PERIOD_UNITS, PeriodUnit, ceil_hour, count_periods
from exporter.store.details import FILTER_COLUMNS
from exporter.store.readsql import DIMENSIONS, TAG_KEY
from exporter.store.rows import clean_text
from exporter.store.stats import StatsQuery

__all__ = [
    "REQUESTS_PARAMS",
    "STATS_PARAMS",
    "Param",
    "ParamError",
    "RequestsQuery",
    "encode_cursor",
    "parse_requests",
    "parse_stats",
    "wants_csv",
]

MAX_VALUE = 256
MAX_VALUES = 100
MAX_GROUP_BY = 5
MAX_PERIODS = 5_000
MAX_PAGE = 1000
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2200, 1, 1, tzinfo=UTC)


class ParamError(ValueError):
    """The client's query string is wrong; the message says what is allowed."""


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


_TIME = {"type": "string", "examples": ["2026-11-01", "2026-11-01T08:00:00Z"]}
_FORMAT = Param(
    "format",
    "json (default) or csv; `Accept: text/csv` also selects CSV",
    {"type": "string", "enum": ["json", "csv"]},
)
_FILTER_DOC = "only requests whose {} equals this value (repeat the parameter for several)"

STATS_PARAMS: tuple[Param, ...] = (
    Param(
        "from",
        "start of the range (RFC 3339 or YYYY-MM-DD, in `tz` when no offset); "
        "rounded up to a whole UTC hour; default: `to` minus 24 hours",
        _TIME,
    ),
    Param("to", "end of the range, exclusive (same forms); default: now, rounded up", _TIME),
    Param(
        "group_by",
        "comma-separated: " + ", ".join(DIMENSIONS) + ", tag:<key> (a promoted tag), and at most "
        "one of " + "|".join(PERIOD_UNITS) + " (calendar periods in `tz`)",
    ),
    Param("tz", "IANA time zone for calendar periods and dates without offset (default UTC)"),
    Param(
        "percentiles",
        "true (default) or false: p50/p95 come from a scan of the audit rows in range; "
        "false answers from the rollups alone",
        {"type": "string", "enum": ["true", "false"]},
    ),
    Param(
        "top",
        "keep the N groups with the highest cost; the rest become one __other__ row",
        {"type": "integer", "minimum": 1, "maximum": 1000},
    ),
    _FORMAT,
    *(Param(d, _FILTER_DOC.format(d)) for d in DIMENSIONS),
)
REQUESTS_PARAMS: tuple[Param, ...] = (
    Param("from", "completed at or after (RFC 3339 or YYYY-MM-DD, UTC without offset)", _TIME),
    Param("to", "completed before (same forms)", _TIME),
    Param(
        "limit",
        f"rows per page (1-{MAX_PAGE}, default 100)",
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
    ),
    Param("cursor", "`next_cursor` of the previous page"),
    _FORMAT,
    *(Param(c, _FILTER_DOC.format(c)) for c in FILTER_COLUMNS),
)


def wants_csv(query: Mapping[str, str], accept: str) -> bool:
    fmt = query.get("format")
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise ParamError(f"format must be json or csv, not {fmt[:32]!r}")
        return fmt == "csv"
    return "text/csv" in accept


def _check_names(query: MultiMapping[str], params: Sequence[Param], tags: bool) -> None:
    allowed = {p.name for p in params}
    unknown = sorted(
        k for k in set(query) if k not in allowed and not (tags and k.startswith("tag:"))
    )
    if unknown:
        extra = ", tag:<key>" if tags else ""
        raise ParamError(
            f"unknown parameter(s) {', '.join(repr(u[:64]) for u in unknown[:5])}; "
            f"allowed: {', '.join(sorted(allowed))}{extra}"
        )
    for name in allowed - {"group_by"} - set(DIMENSIONS) - set(FILTER_COLUMNS):
        if len(query.getall(name, [])) > 1:
            raise ParamError(f"{name} may be given only once")


def _zone(value: str | None) -> ZoneInfo:
    if not value:
        return ZoneInfo("UTC")
    try:
        if len(value) > 64 or value.startswith(("/", ".")) or ".." in value:
            raise ValueError(value)
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ParamError(
            f"unknown time zone {value[:64]!r}; use an IANA name like UTC or Europe/Paris"
        ) from None


def parse_time(name: str, value: str, tz: ZoneInfo) -> datetime:
    """RFC 3339 (an offset or Z; none means `tz`) or a date (midnight in `tz`), in UTC."""
    text = value.strip()
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            dt = datetime(d.year, d.month, d.day)
        else:
            dt = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ParamError(
            f"{name}={value[:40]!r} is not a date: use RFC 3339 (2026-11-01T08:00:00Z) "
            "or YYYY-MM-DD"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    try:
        utc = dt.astimezone(UTC)
    except OverflowError:
        utc = _LATEST
    if not _EARLIEST <= utc < _LATEST:
        raise ParamError(f"{name} must be between 2000-01-01 and 2200-01-01")
    return utc


def _filters(
    query: MultiMapping[str], names: Sequence[str], promoted: Sequence[str] | None
) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    keys = [k for k in names if k in query]
    if promoted is not None:
        keys += sorted({k for k in query if k.startswith("tag:")})
    for key in keys:
        if key.startswith("tag:"):
            _tag_key(key[4:], promoted or ())
        values = tuple(query.getall(key))
        if len(values) > MAX_VALUES:
            raise ParamError(f"at most {MAX_VALUES} values per filter ({key})")
        if any(len(v) > MAX_VALUE for v in values):
            raise ParamError(f"filter values are limited to {MAX_VALUE} characters ({key})")
        # stored text never holds NUL (the writer's rule), and Postgres refuses it in a query
        out[key] = tuple(dict.fromkeys(clean_text(v) for v in values))
    return out


def _tag_key(key: str, promoted: Sequence[str]) -> str:
    if not TAG_KEY.match(key):
        raise ParamError(f"tag key {key[:64]!r} must match {TAG_KEY.pattern}")
    if key not in promoted:
        have = ", ".join(promoted) if promoted else "none are (setting promoted_tags)"
        raise ParamError(f"tag {key!r} is not a rollup dimension; promoted tags: {have}")
    return key


def _group_by(
    values: Sequence[str], promoted: Sequence[str]
) -> tuple[tuple[str, ...], PeriodUnit | None]:
    dims: list[str] = []
    period: PeriodUnit | None = None
    for item in (v.strip() for value in values for v in value.split(",")):
        if not item:
            continue
        if item in PERIOD_UNITS:
            if period is not None:
                raise ParamError(f"group_by takes one period of {'|'.join(PERIOD_UNITS)}")
            period = item
        elif item in DIMENSIONS or item.startswith("tag:"):
            if item.startswith("tag:"):
                _tag_key(item[4:], promoted)
            if item in dims:
                raise ParamError(f"group_by names {item!r} twice")
            dims.append(item)
        else:
            raise ParamError(
                f"unknown group_by {item[:64]!r}; allowed: {', '.join(DIMENSIONS)}, tag:<key>, "
                + "|".join(PERIOD_UNITS)
            )
    if len(dims) > MAX_GROUP_BY:
        raise ParamError(f"group_by takes at most {MAX_GROUP_BY} dimensions")
    return tuple(dims), period


def _int(query: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    if not raw.strip().isdigit() or not low <= int(raw) <= high:
        raise ParamError(f"{name} must be an integer from {low} to {high}, not {raw[:32]!r}")
    return int(raw)


def parse_stats(
    query: MultiMapping[str],
    *,
    now: datetime,
    max_range_days: int,
    retention_days: int,
    promoted_tags: Sequence[str],
) -> StatsQuery:
    """Validate /v1/stats (or `report`) parameters into a StatsQuery."""
    _check_names(query, STATS_PARAMS, tags=True)
    tz = _zone(query.get("tz"))
    until = ceil_hour(parse_time("to", query["to"], tz) if "to" in query else now)
    since = (
        ceil_hour(parse_time("from", query["from"], tz))
        if "from" in query
        else until - timedelta(days=1)
    )
    if since > until:
        raise ParamError(f"from ({since.isoformat()}) is after to ({until.isoformat()})")
    if until - since > timedelta(days=max_range_days):
        raise ParamError(f"the range is limited to {max_range_days} days; narrow from/to")
    dims, period = _group_by(query.getall("group_by", []), promoted_tags)
    flag = query.get("percentiles", "true")
    if flag not in ("true", "false"):
        raise ParamError(f"percentiles must be true or false, not {flag[:16]!r}")
    asked, within = flag == "true", since >= now - timedelta(days=retention_days)
    if count_periods(since, until, period) > MAX_PERIODS:
        raise ParamError(
            f"{period} periods over this range exceed {MAX_PERIODS}; group by a longer period"
        )
    return StatsQuery(
        since=since,
        until=until,
        group_by=dims,
        period=period,
        tz=tz,
        filters=_filters(query, DIMENSIONS, promoted_tags),
        top=_int(query, "top", 1, 1000),
        percentiles=asked and within,
        percentiles_note=None
        if asked and within
        else ("not asked" if not asked else f"past the audit retention ({retention_days} days)"),
    )


@dataclass(frozen=True, slots=True)
class RequestsQuery:
    since: datetime | None
    until: datetime | None
    filters: dict[str, tuple[str, ...]]
    after: tuple[datetime, str] | None
    limit: int


def encode_cursor(key: tuple[datetime, str]) -> str:
    raw = orjson.dumps([key[0].astimezone(UTC).isoformat(), key[1]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        when, rid = orjson.loads(raw)
        if not isinstance(when, str) or not isinstance(rid, str):
            raise ValueError(value)
        dt = datetime.fromisoformat(when)
        if dt.tzinfo is None:
            raise ValueError(value)
        return dt.astimezone(UTC), rid
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ParamError("cursor is not one this API returned (use next_cursor as is)") from None


def parse_requests(query: MultiMapping[str]) -> RequestsQuery:
    _check_names(query, REQUESTS_PARAMS, tags=False)
    utc = ZoneInfo("UTC")
    since = parse_time("from", query["from"], utc) if "from" in query else None
    until = parse_time("to", query["to"], utc) if "to" in query else None
    if since and until and since > until:
        raise ParamError(f"from ({since.isoformat()}) is after to ({until.isoformat()})")
    cursor = query.get("cursor")
    return RequestsQuery(
        since=since,
        until=until,
        filters=_filters(query, FILTER_COLUMNS, None),
        after=_decode_cursor(cursor) if cursor else None,
        limit=_int(query, "limit", 1, MAX_PAGE) or 100,
    )
