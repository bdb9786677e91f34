"""Every panel query of every Prometheus-backed dashboard returns data from a real Prometheus
scraping a live exporter fed with varied reports (the shape of LIVE_TEST_DATA in
dashboards/generate.py)."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.workers import WORKER_ONLY_METRICS
from tests.helpers import free_port, http, load_dashboard_generator, start_service
from tests.prometheus_server import Prometheus, run_prometheus

ROOT = Path(__file__).resolve().parent.parent
CHOSEN = {"model": "gpt-4o", "user": "alice", "operation": "chat"}


def _reports(round_no: int) -> list[dict[str, Any]]:
    rid = f"r{round_no}"
    alice = {"model": "gpt-4o", "user": "alice", "team": "search", "operation": "chat"}
    return [
        {
            **alice,
            "request_id": f"{rid}-ok",
            "input_tokens": 1200,
            "cached_input_tokens": 400,
            "cache_creation_input_tokens": 100,
            "output_tokens": 300,
            "reasoning_tokens": 120,
            "duration_ms": 850,
            "ttft_ms": 120,
        },
        {
            **alice,
            "request_id": f"{rid}-err",
            "status": "error",
            "error_type": "rate_limit",
            "input_tokens": 50,
            "duration_ms": 40,
            "ttft_ms": 30,
        },
        {  # an incomplete GPUStack stream: estimated
            "request_id": f"{rid}-stream",
            "model": "gpt-4o",
            "user_id": "alice",
            "operation": "chat_completion",
            "input_token": 0,
            "output_token": 0,
            "completed": False,
            "output_chunk_count": 40,
            "request_content_bytes": 2000,
        },
        {
            "request_id": f"{rid}-bob",
            "model": "claude-sonnet-4-5",
            "user": "bob",
            "input_tokens": 10,
            "output_tokens": 5,
            "duration_ms": 300,
        },
        {
            "request_id": f"{rid}-carol",
            "model": "gpt-4o-mini",
            "user": "carol",
            "operation": "embedding",
            "input_tokens": 10,
        },
        {"request_id": f"{rid}-ok", "model": "gpt-4o", "input_tokens": 1},  # duplicate
        {"model": "gpt-4o", "input_tokens": -1},  # invalid
    ]


def _post(url: str, items: list[dict[str, Any]]) -> None:
    status, body, _ = http(
        "POST", f"{url}/v1/usage", orjson.dumps(items), {"Content-Type": "application/json"}
    )
    assert status == 202, body


def _label_values(prom: Prometheus, label: str, selector: str) -> list[str]:
    data = prom.api(f"/api/v1/label/{urllib.parse.quote(label)}/values", **{"match[]": selector})
    return [str(v) for v in data]


def _assert_names_exposed(url: str, gen: Any, rule_files: list[Path]) -> None:
    """Every llm_* name in the boards and the rules is a series this exporter exposes, and
    every name docs/metrics.md promises is there too."""
    status, body, _ = http("GET", f"{url}/metrics")
    assert status == 200
    exposed = {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    used = {q.expr for q in gen.prometheus_queries()}
    for path in rule_files:
        for group in yaml.safe_load(path.read_text())["groups"]:
            used |= {str(rule["expr"]) for rule in group["rules"]}
    names = {n for expr in used for n in re.findall(r"(?<![\w:])llm_[a-z0-9_]+", expr)}
    assert names, "no metric names found in dashboards and rules"
    # exposed by the workers of `serve --workers N` only (tests/test_workers.py checks it)
    missing = sorted(n for n in names - WORKER_ONLY_METRICS if n not in exposed)
    assert not missing, f"used in dashboards/rules but not exposed: {missing}"
    documented = set(re.findall(r"`(llm_[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text()))
    histograms = {"llm_request_duration_seconds", "llm_time_to_first_token_seconds",
                  "llm_usage_flush_duration_seconds"}  # fmt: skip
    undocumented = sorted(
        n
        for n in documented - WORKER_ONLY_METRICS
        if (f"{n}_count" if n in histograms else n) not in exposed
    )
    assert not undocumented, f"in docs/metrics.md but not exposed: {undocumented}"


def test_every_panel_query_returns_data(tmp_path: Path) -> None:
    gen = load_dashboard_generator()
    port = free_port()
    service = start_service(
        ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        tmp_path / "service.log",
        port=port,
        env={
            "LLM_USAGE_MAX_USERS": "2",
            "LLM_USAGE_FLUSH_INTERVAL": "1",
            "LLM_USAGE_BUDGET_REFRESH_INTERVAL": "1",
            "LLM_USAGE_BUDGETS": json.dumps(
                [{"name": "search-monthly", "team": "search", "limit_usd": 100}]
            ),
        },
    )
    rules = [ROOT / "rules" / "recording.yml", ROOT / "rules" / "alerts.yml"]
    try:
        with run_prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], rules) as prom:
            prom.wait_for('up{job="llm-usage-exporter"} == 1')
            for round_no in range(3):  # increases inside the rate window
                _post(service.url, _reports(round_no))
                time.sleep(3)
            prom.wait_for("llm_usage_last_flush_success_timestamp_seconds > 0")
            prom.wait_for("llm_budget_spent_usd > 0")
            _assert_names_exposed(service.url, gen, rules)

            variables: dict[str, str] = {}
            for uid, name, selector, label in gen.prometheus_variable_queries():
                values = _label_values(prom, label, selector)
                assert values, f"{uid}: variable ${name} ({label} of {selector}) has no values"
                variables[name] = CHOSEN.get(name, values[0])
                assert variables[name] in values, (name, values)

            empty = []
            for variant in ({}, variables):  # "All", then real single values
                queries = gen.prometheus_queries(
                    expand=True, rate_interval="30s", range_="5m", variables=variant
                )
                assert len(queries) > 20
                for q in queries:
                    result = prom.query(q.expr)  # raises on a query Prometheus rejects
                    if not result and not q.allow_empty:
                        empty.append(f"{q.dashboard_uid} / {q.panel_title}: {q.expr}")
            assert not empty, "panels with no data:\n" + "\n".join(empty)
    finally:
        assert service.stop() == 0, service.logs()
