"""GET /openapi.json: OpenAPI 3.1 for every route, generated from the pydantic models and the
parameter tables the handlers validate with (exporter.api.params).

`OPERATIONS` is the one list of documented routes; tests/test_api_openapi.py checks that it
equals the app's router, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from exporter import __version__
from exporter.api.params import REQUESTS_PARAMS, STATS_PARAMS, Param
from exporter.api.requests import RequestRow, RequestsPage
from exporter.api.stats import StatsResponse
from exporter.api.traces import TraceUsage
from exporter.httputil import Route
from exporter.usage import MAX_ID, UsageReport

__all__ = ["OPERATIONS", "OpenApiHandler", "Operation", "openapi_document"]


class Error(BaseModel):
    error: str


class IngestResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    accepted: int
    duplicates: int
    rejected: int
    errors: list[dict[str, Any]] = Field(description="index and reason of each invalid item")


class OtlpStatus(BaseModel):
    """OTLP/HTTP's error body (google.rpc.Status), JSON or protobuf like the request."""

    model_config = ConfigDict(extra="allow")
    code: int
    message: str


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str


class BudgetList(BaseModel):
    budgets: list[dict[str, Any]]


class BudgetCheck(BaseModel):
    model_config = ConfigDict(extra="allow")
    allowed: bool
    exceeded: list[str]
    budgets: list[dict[str, Any]]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    scope: str | None  # None: open (no token needed)
    response: type[BaseModel] | str  # a model, or a media type for non-JSON bodies
    params: tuple[Param, ...] = ()
    path_params: tuple[str, ...] = ()
    body: dict[str, Any] | None = None
    csv: bool = False
    errors: tuple[int, ...] = field(default=(400,))
    #: codes whose body is not the {"error": …} object (ingest answers 422 with its result)
    error_models: tuple[tuple[int, type[BaseModel]], ...] = ()
    #: media types of the answers when not JSON only (OTLP answers in the request's encoding)
    media: tuple[str, ...] = ()
    ok: int = 200


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


_USAGE_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"oneOf": [_ref(UsageReport), {"type": "array", "items": _ref(UsageReport)}]}
        },
        "application/x-ndjson": {"schema": {"type": "string"}},
    },
}
_GATEWAY_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"type": "object"}}},
}
_OTLP_BODY = {
    "required": True,
    "content": {
        "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"type": "object"}},
    },
}
_BUDGET_CHECK = tuple(
    Param(k, f"the {k} of the request about to be made")
    for k in ("user", "team", "api_key_id", "model")
)

OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/", "landing page with links", None, "text/html", errors=()),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics (text 0.0.4 or OpenMetrics)",
        None,
        "text/plain",
        errors=(),
    ),
    Operation("GET", "/healthz", "liveness", None, Health, errors=()),
    Operation(
        "GET", "/readyz", "readiness: database reachable, WAL not full", None, Health, errors=(503,)
    ),
    Operation("GET", "/openapi.json", "this document", None, "application/json", errors=()),
    Operation(
        "POST",
        "/v1/usage",
        "usage reports: one object, an array or NDJSON; gzip ok",
        "ingest",
        IngestResult,
        body=_USAGE_BODY,
        errors=(400, 413, 415, 503),
        error_models=((422, IngestResult),),
        ok=202,
    ),
    Operation(
        "POST",
        "/v2/usage/gateway-metrics",
        "GPUStack gateway metrics (one report)",
        "ingest",
        IngestResult,
        body=_GATEWAY_BODY,
        errors=(400, 413, 415, 503),
        error_models=((422, IngestResult),),
        ok=202,
    ),
    Operation(
        "POST",
        "/v1/traces",
        "OTLP/HTTP spans carrying GenAI usage",
        "ingest",
        "application/json",
        body=_OTLP_BODY,
        errors=(),
        error_models=tuple((code, OtlpStatus) for code in (400, 413, 415, 503)),
        media=("application/json", "application/x-protobuf"),
    ),
    Operation(
        "POST",
        "/v1/metrics",
        "OTLP metrics are refused (no request ids): always 404 saying to export traces",
        "ingest",
        "application/json",
        body=_OTLP_BODY,
        errors=(),
        error_models=tuple((code, OtlpStatus) for code in (404, 413)),
        media=("application/json", "application/x-protobuf"),
        ok=404,
    ),
    Operation(
        "GET",
        "/v1/stats",
        "usage per group and calendar period, from the rollups",
        "read",
        StatsResponse,
        STATS_PARAMS,
        csv=True,
        errors=(400, 503),
    ),
    Operation(
        "GET",
        "/v1/requests",
        "stored requests, newest first (keyset pages)",
        "read",
        RequestsPage,
        REQUESTS_PARAMS,
        csv=True,
        errors=(400, 503),
    ),
    Operation(
        "GET",
        "/v1/requests/{request_id}",
        "one stored request",
        "read",
        RequestRow,
        path_params=("request_id",),
        errors=(400, 404, 503),
    ),
    Operation(
        "GET",
        "/v1/traces/{trace_id}/usage",
        "a trace's requests as a tree, own and cumulative tokens, cost and duration per node",
        "read",
        TraceUsage,
        path_params=("trace_id",),
        errors=(400, 404, 422, 503),
    ),
    Operation("GET", "/v1/budgets", "budgets and their spend", "read", BudgetList, errors=()),
    Operation(
        "GET",
        "/v1/budgets/check",
        "would one more request stay within budget?",
        "read",
        BudgetCheck,
        _BUDGET_CHECK,
    ),
)

_MODELS: tuple[type[BaseModel], ...] = (
    Error,
    OtlpStatus,
    UsageReport,
    IngestResult,
    Health,
    StatsResponse,
    RequestsPage,
    RequestRow,
    TraceUsage,
    BudgetList,
    BudgetCheck,
)


def _parameters(op: Operation) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID},
        }
        for name in op.path_params
    ]
    out += [
        {
            "name": p.name,
            "in": "query",
            "required": False,
            "description": p.description,
            "schema": p.schema,
        }
        for p in op.params
    ]
    return out


def _operation_id(op: Operation) -> str:
    words = [w.strip("{}").replace(".", "_") for w in op.path.split("/") if w]
    return "_".join([op.method.lower(), *words] if words else [op.method.lower(), "root"])


def _operation(op: Operation) -> dict[str, Any]:
    if isinstance(op.response, str):
        content: dict[str, Any] = {
            m: {"schema": {}} for m in dict.fromkeys((op.response, *op.media))
        }
    else:
        content = {"application/json": {"schema": _ref(op.response)}}
    if op.csv:
        content["text/csv"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {str(op.ok): {"description": "OK", "content": content}}
    error = {"application/json": {"schema": _ref(Error)}}
    for code in op.errors:
        responses[str(code)] = {"description": "refused; the message says why", "content": error}
    for code, model in op.error_models:
        responses[str(code)] = {
            "description": "refused; the reasons",
            "content": {m: {"schema": _ref(model)} for m in op.media or ("application/json",)},
        }
    if op.scope is not None:
        responses["401"] = {"description": "missing or invalid bearer token", "content": error}
        responses["403"] = {"description": f"token lacks the {op.scope!r} scope", "content": error}
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": _operation_id(op),
        "parameters": _parameters(op),
        "responses": responses,
    }
    if op.scope is not None:
        doc["security"] = [{"bearer": []}]
        doc["x-scope"] = op.scope
    if op.body is not None:
        doc["requestBody"] = op.body
    return doc


class OpenApiHandler:
    """GET /openapi.json: the document, rendered once."""

    def __init__(self, metrics_auth: bool = False) -> None:
        self._body = orjson.dumps(openapi_document(metrics_auth=metrics_auth))

    async def get(self, request: web.Request) -> web.Response:
        return web.Response(body=self._body, content_type="application/json")

    def routes(self) -> list[Route]:
        return [Route("GET", "/openapi.json", self.get, "public")]


def openapi_document(*, metrics_auth: bool = False) -> dict[str, Any]:
    """The document; `metrics_auth` (the setting) puts /metrics behind the read scope."""
    _, schemas = models_json_schema(
        [(m, "serialization" if m is not UsageReport else "validation") for m in _MODELS],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        if op.path == "/metrics" and metrics_auth:
            op = replace(op, scope="read")
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-usage-exporter",
            "version": __version__,
            "description": "Ingest LLM usage reports; Prometheus metrics; exact billing rollups.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
