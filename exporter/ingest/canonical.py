"""A JSON body of canonical reports, validated from its bytes in one pydantic-core call.

The general path (`body.parse_items` → `adapters.adapt` → `UsageReport` per batch) decodes the
body into Python objects, looks at each item's shape, then validates the objects. When every
item is already a canonical report, that decode and the per-item shape checks are work that
changes nothing: `canonical_reports` validates the bytes straight into `UsageReport`s
(`TypeAdapter.validate_json`, the same model, the same strict rules and after-validator).

It answers None for anything else, and the caller then takes the general path, which gives
every answer (per-item reasons and indexes, body errors, provider shapes) exactly as before:

- a provider shape (LiteLLM, GPUStack, OTel attributes, a `usage` body) or an alias spelling
  of an operation or a status carries keys or values the strict model refuses;
- an invalid item, or a body that is not JSON, fails the one call;
- NDJSON is never tried here.

Why the result equals the general path's when it succeeds: an item the model accepts has only
model fields (unknown keys are refused) and a `model`, so `adapt` would have returned it as
it is, except for the provider inferred from the model id, which is applied here afterwards
(`adapters.inferred`; the model id only loses a prefix, so its length checks still hold, and a
provider name longer than the model allows takes the general path). pydantic-core's JSON
parser and orjson agree on every value the model accepts; where they differ (NaN, Infinity,
1e400, lone surrogates: orjson refuses the body) the model refuses the value too, so the
general path runs and answers as before (tests/test_ingest_canonical.py compares both paths).
"""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from exporter.ingest.adapters import inferred
from exporter.usage import MAX_STRING, UsageReport

__all__ = ["canonical_reports"]

_LIST = TypeAdapter(list[UsageReport])
_ONE = UsageReport.model_validate_json


def canonical_reports(body: bytes) -> list[UsageReport] | None:
    """`body` (stripped JSON: one object or an array) as canonical reports, or None."""
    first = body[:1]
    try:
        if first == b"[":
            reports = _LIST.validate_json(body)
        elif first == b"{":
            reports = [_ONE(body)]
        else:
            return None
    except ValidationError:
        return None
    for r in reports:
        fields = r.__dict__
        changed = inferred(fields["model"], fields["provider"])
        if changed is not None:
            if len(changed[1]) > MAX_STRING:
                return None
            fields["model"], fields["provider"] = changed
    return reports
