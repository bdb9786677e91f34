"""UsageTracker: `log_request` before the call, `log_response` after it, stats from the read API.

For code that calls an LLM itself and wants one line on each side of the call:

    tracker = UsageTracker(SyncUsageClient(url, token))
    rid = tracker.log_request("gpt-4o", request, user="alice")
    response = openai_client.chat.completions.create(**request)
    tracker.log_response(rid, response)

The trace position (open `node`, OpenTelemetry span) is taken at `log_request`, where the call
is made, so `log_response` may run anywhere.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from exporter.client.client import UsageClient
from exporter.client.context import trace_fields
from exporter.client.extract import usage_fields, usage_from_response
from exporter.client.sync import SyncUsageClient

__all__ = ["UsageTracker"]

#: calls logged with log_request but never answered are forgotten past this many (oldest first)
MAX_OPEN_CALLS = 100_000


@dataclass(slots=True)
class _Call:
    model: str
    started_at: float
    t0: float
    fields: dict[str, Any] = field(default_factory=dict)


def _when(value: date | datetime | str) -> str:
    return value.isoformat() if isinstance(value, date | datetime) else value


class UsageTracker:
    def __init__(
        self,
        client: UsageClient | SyncUsageClient,
        *,
        url: str | None = None,
        read_token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.client = client
        inner = client if isinstance(client, UsageClient) else client._client
        self._url = (url or inner.url).rstrip("/")
        self._read_token = read_token
        self._timeout = timeout
        self._open: OrderedDict[str, _Call] = OrderedDict()
        self.forgotten = 0

    def log_request(
        self, model: str, request: Mapping[str, Any] | None = None, **fields: Any
    ) -> str:
        """Start timing a call; returns the request_id that `log_response` takes. `fields` are
        any canonical report fields (user, team, tags, node, request_id…)."""
        request = request or {}
        call = _Call(model, time.time(), time.perf_counter(), dict(fields))
        if "stream" in request:
            call.fields.setdefault("stream", bool(request["stream"]))
        for key, value in trace_fields().items():
            call.fields.setdefault(key, value)
        request_id = str(call.fields.pop("request_id", None) or self.client.build()["request_id"])
        self._open[request_id] = call
        if len(self._open) > MAX_OPEN_CALLS:
            self._open.popitem(last=False)
            self.forgotten += 1
        return request_id

    def log_response(
        self,
        request_id: str,
        response: Any = None,
        usage: Any = None,
        response_time: float | None = None,
        error: BaseException | str | None = None,
    ) -> dict[str, Any]:
        """Report the call: tokens from `response` (OpenAI/Anthropic object or dict) or from an
        explicit `usage` object; `response_time` in seconds (else measured since log_request);
        `error` (an exception or a string) marks it failed. Returns the report as queued."""
        call = self._open.pop(request_id, None)
        fields: dict[str, Any] = dict(call.fields) if call else {}
        found = usage_from_response(response)
        if usage is not None:
            found.update(usage_fields(usage))
        fields.update(found)
        if call is not None:
            fields.setdefault("model", call.model)
            fields["started_at"] = call.started_at
            if response_time is None:
                response_time = time.perf_counter() - call.t0
        if response_time is not None:
            fields["duration_ms"] = round(response_time * 1000, 3)
        if error is not None:
            fields["status"] = "error"
            fields["error_type"] = (
                type(error).__name__ if isinstance(error, BaseException) else str(error)[:256]
            )
        fields.setdefault("model", "unknown")
        report = self.client.build(request_id=request_id, **fields)
        self.client.submit(report)
        return report

    # --- read side (scope read) -------------------------------------------------------

    def stats(self, **params: Any) -> Any:
        """GET /v1/stats with these query parameters (see docs/api.md)."""
        query = urllib.parse.urlencode({k: _when(v) for k, v in params.items() if v is not None})
        if not self._url.startswith(("http://", "https://")):
            raise ValueError("the service url must be http:// or https://")
        req = urllib.request.Request(f"{self._url}/v1/stats?{query}")  # noqa: S310
        if self._read_token:
            req.add_header("Authorization", f"Bearer {self._read_token}")
        with urllib.request.urlopen(req, timeout=self._timeout) as answer:  # noqa: S310
            return json.loads(answer.read())

    def get_usage_stats(self, **filters: Any) -> Any:
        """Totals per model over the API's default range."""
        return self.stats(group_by="model", **filters)

    def get_detailed_stats(
        self,
        start_date: date | datetime | str,
        end_date: date | datetime | str,
        group_by: str = "model,user",
        **filters: Any,
    ) -> Any:
        """Per group (default model × user) between two dates."""
        return self.stats(**{"from": start_date, "to": end_date, "group_by": group_by}, **filters)
