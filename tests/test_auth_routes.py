"""Deny by default: every route has an access entry, HEAD and OPTIONS follow GET, and what the
route table does not list is refused (404/405), never passed through unauthenticated."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeClient
from helpers import ADMIN_TOKEN, INGEST_TOKEN, READ_TOKEN, bearer, make_settings, wait_ready

from exporter.app import create_app
from exporter.appkeys import ACCESS, SELF_METRICS
from exporter.auth import AccessPolicy, Authenticator, auth_middleware
from exporter.config import TokenSpec
from exporter.httputil import Route
from exporter.selfmetrics import SelfMetrics

#: The contract of the docs (README "HTTP surface"): at least these routes, with this access.
#: The app may have more; every route it has is exercised below whatever it is.
CONTRACT = {
    ("GET", "/"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/metrics"): "public",
    ("POST", "/v1/usage"): "ingest",
    ("POST", "/v2/usage/gateway-metrics"): "ingest",
    ("POST", "/v1/traces"): "ingest",
    ("GET", "/v1/budgets"): "read",
    ("GET", "/v1/budgets/check"): "read",
    ("GET", "/v1/stats"): "read",
    ("GET", "/v1/requests"): "read",
    ("GET", "/v1/requests/{request_id}"): "read",
    ("GET", "/v1/traces/{trace_id}/usage"): "read",
    ("GET", "/openapi.json"): "public",
}

#: A token that has the scope, and one that lacks it (admin implies every scope).
RIGHT = {"ingest": INGEST_TOKEN, "read": READ_TOKEN, "admin": ADMIN_TOKEN}
WRONG = {"ingest": READ_TOKEN, "read": INGEST_TOKEN, "admin": READ_TOKEN}


def concrete(path: str) -> str:
    """A request path for a route pattern: each `{name}` becomes a harmless value."""
    return re.sub(r"\{[^}]+\}", "x", path)


async def call(client: Any, method: str, path: str, token: str | None) -> Any:
    headers = bearer(token) if token else {}
    data = b"{}" if method == "POST" else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    return await client.request(method, concrete(path), data=data, headers=headers)


def entries(app: web.Application) -> dict[tuple[str, str], str]:
    return {(m, p): a for m, p, a in app[ACCESS].entries()}


async def test_route_table_holds_the_documented_access(make_client: MakeClient) -> None:
    client = await make_client(with_tokens=True)
    table = entries(client.server.app)
    for key, access in CONTRACT.items():
        assert table.get(key) == access, (key, table.get(key))
    for (method, path), access in table.items():
        if method in ("HEAD", "OPTIONS"):
            # HEAD/OPTIONS inherit GET where the path has a GET, else its one method's
            same_path = {m: a for (m, p), a in table.items() if p == path}
            expected = same_path.get("GET") or next(
                a for m, a in same_path.items() if m not in ("HEAD", "OPTIONS")
            )
            assert access == expected, (method, path)


@pytest.mark.parametrize("method_kind", ["declared", "HEAD", "OPTIONS"])
async def test_every_protected_route_refuses_missing_and_wrong_tokens(
    make_client: MakeClient, method_kind: str
) -> None:
    client = await make_client(with_tokens=True)
    await wait_ready(client)  # the read API answers 503 until the schema is migrated
    app = client.server.app
    rejected_before = _rejected(app)
    checked = 0
    for (method, path), access in sorted(entries(app).items()):
        if access == "public":
            continue
        if method_kind == "declared" and method in ("HEAD", "OPTIONS"):
            continue
        if method_kind != "declared" and method != method_kind:
            continue
        checked += 1
        resp = await call(client, method, path, None)
        assert resp.status == 401, (method, path, resp.status)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await call(client, method, path, "not-a-configured-token-0123456789")
        assert resp.status == 401, (method, path, resp.status)
        resp = await call(client, method, path, WRONG[access])
        assert resp.status == 403, (method, path, resp.status)
        for token in (RIGHT[access], ADMIN_TOKEN):
            resp = await call(client, method, path, token)
            assert resp.status not in (401, 403), (method, path, resp.status)
            assert resp.status < 500, (method, path, resp.status, await resp.text())
            if method == "OPTIONS":
                assert resp.status == 204
                methods = {m for (m, p) in entries(app) if p == path}
                assert set(resp.headers["Allow"].split(", ")) == methods
    assert checked >= (5 if method_kind == "declared" else 2), checked
    # refusals of ingest routes are counted, by verdict
    ingest_refusals = 3 * sum(
        1
        for (m, _p), a in entries(app).items()
        if a == "ingest"
        and (m == method_kind if method_kind != "declared" else m not in ("HEAD", "OPTIONS"))
    )
    assert _rejected(app) - rejected_before == ingest_refusals


def _rejected(app: web.Application) -> float:
    m = app[SELF_METRICS].rejected
    return sum(
        s.value
        for metric in m.collect()
        for s in metric.samples
        if s.name.endswith("_total") and s.labels.get("reason") in ("unauthorized", "forbidden")
    )


async def test_head_on_read_api_is_refused_like_get(make_client: MakeClient) -> None:
    """The bug this fixes: GET 401 but HEAD 200 with the body's Content-Length."""
    client = await make_client(with_tokens=True)
    get = await client.get("/v1/budgets")
    head = await client.head("/v1/budgets")
    assert (get.status, head.status) == (401, 401)
    ok_get = await client.get("/v1/budgets", headers=bearer(READ_TOKEN))
    ok_head = await client.head("/v1/budgets", headers=bearer(READ_TOKEN))
    assert (ok_get.status, ok_head.status) == (200, 200)
    assert ok_head.headers["Content-Length"] == str(len(await ok_get.read()))


async def test_public_routes_answer_every_method_without_a_token(make_client: MakeClient) -> None:
    client = await make_client(with_tokens=True)
    for (method, path), access in entries(client.server.app).items():
        if access != "public":
            continue
        resp = await call(client, method, path, None)
        assert resp.status in (200, 204, 503), (method, path, resp.status)  # 503: not ready yet


async def test_metrics_auth_puts_metrics_behind_the_read_scope(make_client: MakeClient) -> None:
    client = await make_client(with_tokens=True, metrics_auth=True)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert (await client.request(method, "/metrics")).status == 401
        resp = await client.request(method, "/metrics", headers=bearer(INGEST_TOKEN))
        assert resp.status == 403
        resp = await client.request(method, "/metrics", headers=bearer(READ_TOKEN))
        assert resp.status in (200, 204)


@pytest.mark.parametrize("with_tokens", [True, False])
async def test_unlisted_paths_and_methods_get_404_and_405(
    make_client: MakeClient, with_tokens: bool
) -> None:
    client = await make_client(with_tokens=with_tokens)
    for token in (None, ADMIN_TOKEN):
        headers = bearer(token) if token else {}
        for path in ("/nope", "/v1/", "/v1/usage/extra", "/v1/budgetsx"):
            resp = await client.get(path, headers=headers)
            assert resp.status == 404, (path, resp.status)
            assert (await resp.json())["error"]
        for method, path in (("DELETE", "/v1/usage"), ("PUT", "/v1/budgets"),
                             ("GET", "/v1/usage"), ("POST", "/metrics")):  # fmt: skip
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 405, (method, path, resp.status)
            assert "Allow" in resp.headers


async def test_a_route_added_without_an_entry_stops_the_app_from_starting(tmp_path: Any) -> None:
    app = create_app(make_settings(tmp_path))

    async def sneaky(request: web.Request) -> web.Response:
        return web.Response(text="open by accident")

    app.router.add_get("/sneaky", sneaky)
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="GET /sneaky"):
        await runner.setup()
    await runner.cleanup()
    assert not (tmp_path / "data" / "wal").exists()  # refused before opening anything


async def test_middleware_refuses_a_route_without_an_entry(aiohttp_client: Any) -> None:
    """Even without the start-up check, a request to an unlisted route is not passed through."""
    policy = AccessPolicy()
    tokens = [TokenSpec(name="r", token=READ_TOKEN, scopes=["read"])]
    app = web.Application(
        middlewares=[auth_middleware(policy, Authenticator(tokens), SelfMetrics())]
    )

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    policy.install(app.router, [Route("GET", "/listed", ok, "read")])
    app.router.add_get("/unlisted", ok)
    client = await aiohttp_client(app)
    assert (await client.get("/listed")).status == 401
    assert (await client.get("/listed", headers=bearer(READ_TOKEN))).status == 200
    for headers in ({}, bearer(READ_TOKEN)):
        resp = await client.get("/unlisted", headers=headers)
        assert resp.status == 404
        assert await resp.text() != "ok"


def test_a_route_declared_twice_is_an_error() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    with pytest.raises(ValueError, match="declared twice"):
        AccessPolicy().install(
            app.router, [Route("GET", "/a", ok, "read"), Route("GET", "/a", ok, "public")]
        )
