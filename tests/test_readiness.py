"""/readyz reflects flush health: a replica whose flushes cannot work says so, with the reason.

Real subprocesses of the console script, real Postgres and SQLite: `serve --no-migrate` on an
empty database answers 503 naming the missing schema (before and after reports arrive, which
are still accepted into the WAL); `db upgrade` from another process fixes it, the flusher
drains the WAL on its own, /readyz turns 200, and the database holds exactly what was
acknowledged.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import clean_env, cli_command, free_port, http, start_service
from storecheck import assert_stored_exactly, report

from exporter.store import Store


def _ready(url: str) -> tuple[int, dict[str, Any]]:
    status, body, _ = http("GET", f"{url}/readyz")
    return status, json.loads(body)


def _wait(url: str, want: int, naming: str = "", timeout: float = 20.0) -> dict[str, Any]:
    """The first /readyz answer with status `want` (and, with `naming`, a problem containing
    it): until the flusher's first probe ends, /readyz is 503 "flusher starting"."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = _ready(url)
        if status == want and (not naming or any(naming in p for p in body["problems"])):
            return body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.1)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_readyz_names_a_missing_schema_until_db_upgrade(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    if backend == "postgres":
        db_url = str(request.getfixturevalue("pg_url"))
    else:
        db_url = f"sqlite+aiosqlite:///{tmp_path}/db/usage.db"
    port = free_port()
    env = {
        "LLM_USAGE_DATABASE_URL": db_url,
        "LLM_USAGE_FLUSH_INTERVAL": "0.2",
        "LLM_USAGE_FLUSH_MAX_BACKOFF": "0.5",
    }
    svc = start_service(
        ["serve", "--no-migrate", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        tmp_path / "serve.log",
        port=port,
        env=env,
    )
    try:
        body = _wait(svc.url, 503, "schema missing")  # before any report: the idle flusher probed
        assert any("schema missing" in p and "db upgrade" in p for p in body["problems"]), body
        sent = [report(i) for i in range(50)]
        status, answer, _ = http(
            "POST",
            f"{svc.url}/v1/usage",
            orjson.dumps(sent),
            {"Content-Type": "application/json"},
        )
        assert status == 202, answer
        time.sleep(1.0)  # a few failed flush attempts
        status, body = _ready(svc.url)
        assert status == 503 and any("schema missing" in p for p in body["problems"]), body
        status, metrics, _ = http("GET", f"{svc.url}/metrics")
        failures = [
            float(line.split()[-1])
            for line in metrics.decode().splitlines()
            if line.startswith("llm_usage_flush_failures_total")
        ]
        assert failures and failures[0] >= 1

        upgrade = subprocess.run(
            [*cli_command(), "db", "upgrade"],
            env=clean_env({"LLM_USAGE_DATABASE_URL": db_url}),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert upgrade.returncode == 0, upgrade.stderr.decode()
        _wait(svc.url, 200)
        store = Store.from_url(db_url)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    await assert_stored_exactly(store, sent)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
        finally:
            await store.close()
    finally:
        assert svc.stop() == 0
    assert "Traceback" not in svc.logs()
