"""The shipped rules, evaluated by a real Prometheus scraping a live exporter.

Rule windows are scaled from minutes/hours to seconds (×1/60) so a cost spike and a blown
budget play out within a minute; the expressions, metric names and labels are the shipped ones.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import orjson

from tests.helpers import free_port, http, start_service
from tests.prometheus_server import Prometheus, run_prometheus, scaled_rule_files

ROOT = Path(__file__).resolve().parent.parent
_ids = itertools.count()


def _spend(url: str, team: str, usd: float) -> None:
    body = orjson.dumps(
        {
            "request_id": f"alert-test-{next(_ids)}",
            "model": "gpt-4o",
            "user": f"user-{team}",
            "team": team,
            "input_tokens": 100,
            "output_tokens": 10,
            "cost_usd": usd,
        }
    )
    status, text, _ = http("POST", f"{url}/v1/usage", body, {"Content-Type": "application/json"})
    assert status == 202, text


def _states(prom: Prometheus, name: str) -> set[str]:
    return {a["state"] for a in prom.alerts() if a["labels"]["alertname"] == name}


def test_cost_spike_and_budget_alerts(tmp_path: Path) -> None:
    port = free_port()
    budgets = [{"name": "team-a-daily", "team": "a", "window": "day", "limit_usd": 5.0}]
    service = start_service(
        ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        tmp_path / "service.log",
        port=port,
        env={
            "LLM_USAGE_BUDGETS": json.dumps(budgets),
            "LLM_USAGE_BUDGET_REFRESH_INTERVAL": "1",
        },
    )
    rules = scaled_rule_files(
        [ROOT / "rules" / "recording.yml", ROOT / "rules" / "alerts.yml"],
        tmp_path / "rules",
        1 / 60,
    )
    try:
        with run_prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], rules) as prom:
            prom.wait_for('up{job="llm-usage-exporter"} == 1')
            # Steady spend of 0.005 USD/s (18 USD/h, above the 5 USD/h floor): no spike.
            for _ in range(30):
                _spend(service.url, "b", 0.005)
                time.sleep(1)
                assert not _states(prom, "LLMCostSpike"), prom.alerts()
            assert prom.query("job:llm_cost_usd:rate5m > 0"), "recording rule has no data"
            assert not _states(prom, "LLMBudgetExceeded")

            # A 400x step for team a: the spike alert must go pending (then firing), and the
            # team's 5 USD budget is blown within three seconds.
            deadline = time.monotonic() + 40
            spike: set[str] = set()
            exceeded: set[str] = set()
            while time.monotonic() < deadline and not (spike and exceeded):
                _spend(service.url, "a", 2.0)
                time.sleep(1)
                spike = _states(prom, "LLMCostSpike")
                exceeded = _states(prom, "LLMBudgetExceeded")
            assert spike & {"pending", "firing"}, prom.alerts()
            assert exceeded & {"pending", "firing"}, prom.alerts()
            budget_alert = next(
                a for a in prom.alerts() if a["labels"]["alertname"] == "LLMBudgetExceeded"
            )
            assert budget_alert["labels"]["budget"] == "team-a-daily"
            assert "runbook_url" in budget_alert["annotations"]
    finally:
        assert service.stop() == 0, service.logs()
