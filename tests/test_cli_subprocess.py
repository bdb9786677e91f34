"""The real `llm-usage-exporter` console script in a subprocess, over loopback sockets."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    INGEST_TOKEN,
    ServiceProcess,
    bearer,
    free_port,
    http,
    parse_metrics,
    report,
    run_cli,
    start_service,
    total,
    value,
)

from exporter import __version__

SECRET = "gpustack_ak_CLI_SECRET_5e4d3c2b1a"


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    """Started services are killed at the end whatever happens."""
    started: list[ServiceProcess] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def post_json(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    status, raw, _ = http(
        "POST",
        url,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )
    return status, json.loads(raw)


def metrics(url: str) -> dict:
    status, raw, _ = http("GET", f"{url}/metrics")
    assert status == 200
    return parse_metrics(raw.decode())


def test_serve_ingest_scrape_and_sigterm(tmp_path: Path, services: list[ServiceProcess]) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    svc = start_service(
        ["serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "debug"],
        tmp_path / "serve.log",
        port=port,
    )
    services.append(svc)
    status, body = post_json(
        f"{svc.url}/v1/usage",
        [
            report(
                request_id="cli-1", model="cli-model", user="ann", input_tokens=120, output_tokens=7
            ),
            report(request_id="cli-1", model="cli-model", user="ann", input_tokens=120),
        ],
    )
    assert status == 202
    assert (body["accepted"], body["duplicates"]) == (1, 1)
    status, _ = post_json(
        f"{svc.url}/v2/usage/gateway-metrics",
        {
            "model": "gw-model",
            "input_token": 9,
            "output_token": 1,
            "user_id": "gw",
            "access_key": SECRET,
        },
    )
    assert status == 202

    m = metrics(svc.url)
    assert (
        value(m, "llm_input_tokens_total", model="cli-model", operation="chat", user="ann") == 120
    )
    assert value(m, "llm_output_tokens_total", model="cli-model", operation="chat", user="ann") == 7
    assert total(m, "llm_input_tokens_total", model="gw-model") == 9
    assert value(m, "llm_usage_reports_duplicate_total") == 1
    assert (data_dir / "wal").is_dir()

    started = time.monotonic()
    assert svc.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 10
    logs = svc.logs()
    assert f"listening on http://127.0.0.1:{port}" in logs
    assert "Traceback" not in logs
    assert SECRET not in logs
    for p in (q for q in data_dir.rglob("*") if q.is_file()):
        assert SECRET.encode() not in p.read_bytes(), p

    # a second start on the same data dir comes up cleanly too
    svc = start_service(
        ["serve", "--port", str(port), "--data-dir", str(data_dir)],
        tmp_path / "again.log",
        port=port,
    )
    services.append(svc)
    assert http("GET", f"{svc.url}/healthz")[0] == 200
    assert svc.stop(signal.SIGINT, timeout=10) == 0
    assert "Traceback" not in svc.logs()


def test_sigint_exits_cleanly(tmp_path: Path, services: list[ServiceProcess]) -> None:
    port = free_port()
    svc = start_service(
        ["serve", "--port", str(port), "--data-dir", str(tmp_path / "d")],
        tmp_path / "log",
        port=port,
    )
    services.append(svc)
    assert post_json(f"{svc.url}/v1/usage", report(request_id="x"))[0] == 202
    started = time.monotonic()
    assert svc.stop(signal.SIGINT, timeout=10) == 0
    assert time.monotonic() - started < 10
    assert "Traceback" not in svc.logs()


def test_version() -> None:
    for args in (["--version"], ["version"]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert __version__ in proc.stdout
        assert proc.stdout.strip().endswith(__version__)


def test_env_vars(tmp_path: Path, services: list[ServiceProcess]) -> None:
    port = free_port()
    data_dir = tmp_path / "env-data"
    svc = start_service(
        ["serve"],
        tmp_path / "log",
        port=port,
        env={
            "LLM_USAGE_PORT": str(port),
            "LLM_USAGE_DATA_DIR": str(data_dir),
            "LLM_USAGE_MAX_USERS": "1",
        },
    )
    services.append(svc)
    for user in ("first", "second", "third"):
        assert post_json(f"{svc.url}/v1/usage", report(user=user))[0] == 202
    m = metrics(svc.url)
    users = {dict(k[1])["user"] for k in m if k[0] == "llm_requests_total"}
    assert users == {"first", "__other__"}
    assert (data_dir / "wal").is_dir()
    assert svc.stop() == 0


def test_toml_config_file(tmp_path: Path, services: list[ServiceProcess]) -> None:
    file_port, flag_port = free_port(), free_port()
    data_dir = tmp_path / "toml-data"
    config = tmp_path / "exporter.toml"
    config.write_text(
        f"""
port = {file_port}
data_dir = "{data_dir}"
max_users = 2
metrics_auth = false

[[tokens]]
name = "gateway"
token = "{INGEST_TOKEN}"
scopes = ["ingest"]
"""
    )
    # the flag wins over the file's port; everything else comes from the file
    svc = start_service(
        ["serve", "--config", str(config), "--port", str(flag_port)],
        tmp_path / "log",
        port=flag_port,
    )
    services.append(svc)
    assert post_json(f"{svc.url}/v1/usage", report())[0] == 401
    for user in ("a", "b", "c"):
        assert post_json(f"{svc.url}/v1/usage", report(user=user), bearer(INGEST_TOKEN))[0] == 202
    m = metrics(svc.url)
    assert {dict(k[1])["user"] for k in m if k[0] == "llm_requests_total"} == {
        "a",
        "b",
        "__other__",
    }
    assert (data_dir / "wal").is_dir()
    assert svc.stop() == 0

    # and the file alone, named by env
    svc = start_service(
        ["serve"], tmp_path / "log2", port=file_port, env={"LLM_USAGE_CONFIG": str(config)}
    )
    services.append(svc)
    assert http("GET", f"{svc.url}/healthz")[0] == 200
    assert svc.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "mention"),
    [
        (["--port", "70000"], {}, "port"),
        ([], {"LLM_USAGE_MAX_USERS": "lots"}, "max_users"),
        ([], {"LLM_USAGE_BYTES_PER_INPUT_TOKEN": "0"}, "bytes_per_input_token"),
        (["--config", "/nonexistent/exporter.toml"], {}, "config file not found"),
        (["--config", "{bad_config}"], {}, "max_userz"),
        (["--config", "{bad_toml}"], {}, "invalid"),
        (["--port", "not-a-number"], {}, "port"),
    ],
)
def test_invalid_settings_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], mention: str
) -> None:
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("max_userz = 3\n")
    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_text("port = [unclosed\n")
    args = [a.format(bad_config=bad_config, bad_toml=bad_toml) for a in args]
    port = free_port()
    proc = run_cli(
        "serve", "--data-dir", str(tmp_path / "d"), *args, env={"LLM_USAGE_PORT": str(port), **env}
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert mention.lower() in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr


def test_refuses_public_bind_without_token(tmp_path: Path, services: list[ServiceProcess]) -> None:
    port = free_port()
    proc = run_cli(
        "serve", "--host", "0.0.0.0", "--port", str(port), "--data-dir", str(tmp_path / "d")
    )
    assert proc.returncode == 2
    assert "refusing to bind 0.0.0.0" in proc.stderr
    assert "--insecure" in proc.stderr
    assert "token" in proc.stderr.lower()

    # explicitly insecure: it starts, reachable on loopback through the wildcard bind
    svc = start_service(
        [
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "d"),
            "--insecure",
        ],
        tmp_path / "insecure.log",
        port=port,
    )
    services.append(svc)
    assert post_json(f"{svc.url}/v1/usage", report())[0] == 202
    assert svc.stop() == 0

    # with a token configured it starts without --insecure, and the token is enforced
    tokens = json.dumps([{"name": "gw", "token": INGEST_TOKEN, "scopes": ["ingest"]}])
    svc = start_service(
        ["serve", "--host", "0.0.0.0", "--port", str(port), "--data-dir", str(tmp_path / "d")],
        tmp_path / "token.log",
        port=port,
        env={"LLM_USAGE_TOKENS": tokens},
    )
    services.append(svc)
    assert post_json(f"{svc.url}/v1/usage", report())[0] == 401
    assert post_json(f"{svc.url}/v1/usage", report(), bearer(INGEST_TOKEN))[0] == 202
    assert svc.stop() == 0
    assert INGEST_TOKEN not in svc.logs()
