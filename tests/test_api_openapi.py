"""/openapi.json describes every route and only routes that exist; schemathesis, driven by the
document a live service (the real console script) serves, finds no 5xx and no answer that
contradicts the document.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from apiexpect import make_reports
from helpers import free_port, make_settings, start_service, wait_ready
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from exporter.api.openapi import openapi_document
from exporter.api.stats import StatsResponse
from exporter.app import create_app
from exporter.appkeys import ACCESS, STORE


@pytest.mark.parametrize("metrics_auth", [False, True])
def test_every_route_is_described_and_every_described_route_exists(
    tmp_path: Path, metrics_auth: bool
) -> None:
    """Both ways, with the access each route really has (HEAD and OPTIONS inherit GET's)."""
    doc = openapi_document(metrics_auth=metrics_auth)
    assert doc["openapi"].startswith("3.1")
    described = {
        (m.upper(), p, op.get("x-scope", "public"))
        for p, ops in doc["paths"].items()
        for m, op in ops.items()
    }
    app = create_app(make_settings(tmp_path, metrics_auth=metrics_auth))
    routed = {(m, p, a) for m, p, a in app[ACCESS].entries() if m not in ("HEAD", "OPTIONS")}
    assert described == routed
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"], (method, path)
            for ref in json.dumps(op).split('"$ref": "')[1:]:
                name = ref.split('"')[0].rsplit("/", 1)[-1]
                assert name in doc["components"]["schemas"], (path, name)


async def test_a_stats_answer_validates_against_its_model(make_client: Any) -> None:
    c = await make_client()
    await wait_ready(c)
    await c.app[STORE].writer.write(make_reports(50))
    resp = await c.get("/v1/stats", params={"from": "2025-12-29", "to": "2026-02-03",
                                            "group_by": "team,model,week"})  # fmt: skip
    StatsResponse.model_validate(await resp.json())
    served = await (await c.get("/openapi.json")).json()
    assert served == json.loads(json.dumps(openapi_document()))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real console script on a loopback port, with some reports stored."""
    tmp = tmp_path_factory.mktemp("live")
    port = free_port()
    service = start_service(
        ["serve", "--data-dir", str(tmp / "data"), "--port", str(port)],
        tmp / "service.log",
        port=port,
        env={"LLM_USAGE_FLUSH_INTERVAL": "0.2", "LLM_USAGE_WAL_DURABILITY": "os"},
    )
    try:
        now = datetime.now(UTC)  # recent: ingest refuses reports older than its window
        reports = [
            r | {"completed_at": (now - timedelta(minutes=7 * i)).isoformat()}
            for i, r in enumerate(make_reports(60, seed=3))
        ]
        body = json.dumps(reports).encode()
        req = urllib.request.Request(
            f"{service.url}/v1/usage", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
        yield service.url
    finally:
        assert service.stop() == 0, service.logs()


@pytest.fixture(scope="module")
def live_schema(live: str) -> Any:
    return schemathesis.openapi.from_url(f"{live}/openapi.json")


schema = schemathesis.pytest.from_fixture("live_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_live_service_answers_every_generated_request_without_5xx(
    case: schemathesis.Case, live: str
) -> None:
    case.call_and_validate(
        base_url=live,
        timeout=10,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
