"""Shared helpers for the receiver tests: settings, ports, /metrics parsing, a real subprocess.

Nothing here fakes what the product talks to: apps run on real loopback sockets, data goes to
real temporary directories, and `ServiceProcess` starts the installed console script.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Settings

INGEST_TOKEN = "ingest-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"

#: Counter families of the usage contract, by the canonical report field they sum.
TOKEN_FAMILIES = {
    "llm_input_tokens_total": "input_tokens",
    "llm_output_tokens_total": "output_tokens",
    "llm_cached_input_tokens_total": "cached_input_tokens",
    "llm_cache_creation_input_tokens_total": "cache_creation_input_tokens",
    "llm_reasoning_tokens_total": "reasoning_tokens",
}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with an isolated data dir; anything else as given."""
    data_dir = overrides.pop("data_dir", tmp_path / "data")
    # Test payloads carry fixed dates (2024-2026); a dedupe window relative to the wall clock
    # would make them expire as time passes. Tests of the window set it explicitly.
    if "retention_days" not in overrides:
        overrides["retention_days"] = 10 * 365
        overrides.setdefault("max_report_age_days", 9 * 365)
    return Settings(data_dir=data_dir, **overrides)


def token_settings(tmp_path: Path, **overrides: Any) -> Settings:
    tokens = [
        {"name": "gateway", "token": INGEST_TOKEN, "scopes": ["ingest"]},
        {"name": "grafana", "token": READ_TOKEN, "scopes": ["read"]},
        {"name": "ops", "token": ADMIN_TOKEN, "scopes": ["admin"]},
    ]
    return make_settings(tmp_path, tokens=tokens, **overrides)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(n: int) -> int:
    """A base port with `n` consecutive free ports above it (checked by binding them)."""
    for _ in range(50):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port range")


# -- /metrics ---------------------------------------------------------------------------------

Key = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str, parser: Any = text_string_to_metric_families) -> dict[Key, float]:
    """Every sample of a scrape (text format, or OpenMetrics with its parser), keyed by
    (sample name, sorted labels)."""
    out: dict[Key, float] = {}
    for family in parser(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def select(samples: Mapping[Key, float], name: str, **labels: str) -> dict[Key, float]:
    return {
        k: v
        for k, v in samples.items()
        if k[0] == name and all(dict(k[1]).get(n) == val for n, val in labels.items())
    }


def total(samples: Mapping[Key, float], name: str, **labels: str) -> float:
    """Sum of a sample name over all series matching `labels` (0 when there is none)."""
    return sum(select(samples, name, **labels).values())


def value(samples: Mapping[Key, float], name: str, **labels: str) -> float:
    """The one series with exactly these labels; fails when it is absent."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, (
        f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    )
    return samples[key]


async def scrape(client: Any, headers: Mapping[str, str] | None = None) -> dict[Key, float]:
    resp = await client.get("/metrics", headers=dict(headers or {}))
    assert resp.status == 200, await resp.text()
    return parse_metrics(await resp.text())


async def wait_ready(client: Any, timeout: float = 15.0) -> dict[str, Any]:
    """Poll /readyz until 200 (start-up work such as migrations runs in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        resp = await client.get("/readyz")
        body: dict[str, Any] = await resp.json()
        if resp.status == 200:
            return body
        assert resp.status == 503, (resp.status, body)
        assert asyncio.get_running_loop().time() < deadline, f"not ready in {timeout}s: {body}"
        await asyncio.sleep(0.05)


def report(**fields: Any) -> dict[str, Any]:
    """A canonical report with sensible defaults."""
    base: dict[str, Any] = {"model": "test-model", "user": "alice", "input_tokens": 10}
    base.update(fields)
    return base


def no_5xx(statuses: Iterable[int]) -> None:
    bad = [s for s in statuses if s >= 500]
    assert not bad, f"server errors: {bad}"


# -- the real CLI as a subprocess -------------------------------------------------------------


def cli_command() -> list[str]:
    """The installed console script (next to this interpreter), else `python -m exporter`."""
    script = Path(sys.executable).with_name("llm-usage-exporter")
    if script.exists():
        return [str(script)]
    found = shutil.which("llm-usage-exporter")
    if found:
        return [found]
    return [sys.executable, "-m", "exporter"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_USAGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the console script to completion (stdin closed, LLM_USAGE_* cleared but `env`)."""
    return subprocess.run(
        [*cli_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
    )


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes, dict[str, str]]:
    """A plain blocking HTTP request (urllib) that returns errors instead of raising."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait; returns the exit code (kills and fails on a hang)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"service did not exit within {timeout}s of signal {sig}; logs:\n{self.logs()}"
            ) from None


def start_service(
    args: Sequence[str],
    log_path: Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    timeout: float = 30.0,
    wrap: Sequence[str] = (),
) -> ServiceProcess:
    """Start `llm-usage-exporter <args>`, stdout+stderr to `log_path`, wait for /healthz."""
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [*wrap, *cli_command(), *args],  # wrap: e.g. prlimit for a small fd limit
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=clean_env(env),
    )
    log_file.close()
    service = ServiceProcess(proc, host, port, log_path)
    if not wait:
        return service
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"service exited early with {proc.returncode}; logs:\n{service.logs()}"
            )
        try:
            status, _, _ = http("GET", f"{service.url}/healthz", timeout=1)
            if status == 200:
                return service
        except OSError:
            pass
        time.sleep(0.05)
    service.stop(signal.SIGKILL)
    raise AssertionError(f"service not healthy within {timeout}s; logs:\n{service.logs()}")


# -- the dashboard generator (a script, not a package) ----------------------------------------


def load_dashboard_generator() -> Any:
    """Import dashboards/generate.py once, by path, for the dashboard and billing tests."""
    name = "dashboards_generate"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "dashboards" / "generate.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
