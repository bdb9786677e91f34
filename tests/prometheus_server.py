"""A real `prometheus` binary scraping services on loopback, for end-to-end rule and panel tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import free_port

_DURATION = re.compile(r"(?<![\w])(\d+)([smhd])(?![\w])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def scale_durations(text: str, factor: float) -> str:
    """`[5m]` → `[5s]` for factor 1/60: run hour-long rule windows in a test of seconds."""

    def one(m: re.Match[str]) -> str:
        seconds = max(1, round(int(m.group(1)) * _SECONDS[m.group(2)] * factor))
        return f"{seconds}s"

    def in_brackets(m: re.Match[str]) -> str:
        return _DURATION.sub(one, m.group(0))

    return re.sub(r"\[[^\]]*\]", in_brackets, text)


def scaled_rule_files(src: Sequence[Path], dest: Path, factor: float) -> list[Path]:
    """Copies of rule files with every range and `for:` duration multiplied by `factor`."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in src:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                rule["expr"] = scale_durations(str(rule["expr"]), factor)
                if "for" in rule:
                    rule["for"] = scale_durations(f"[{rule['for']}]", factor)[1:-1]
        target = dest / path.name
        target.write_text(yaml.safe_dump(doc))
        out.append(target)
    return out


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: scripts/test installs Debian's prometheus package")
    return path


@dataclass
class Prometheus:
    url: str
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        result = data["result"]
        return result if isinstance(result, list) else [result]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no data for {expr!r} after {timeout}s; prometheus log:\n"
                    + self.log_path.read_text()[-3000:]
                )
            time.sleep(0.5)

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/alerts")["alerts"])


@contextmanager
def run_prometheus(
    tmp: Path,
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    interval: str = "1s",
    job: str = "llm-usage-exporter",
) -> Iterator[Prometheus]:
    binary = require_binary("prometheus")
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]},
        ],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after 30s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
