"""alertmanager.yml is valid and routes budget and cost alerts where the docs say."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "alertmanager.yml"


def _amtool() -> str:
    path = shutil.which("amtool")
    if path is None:
        pytest.fail("amtool not found: scripts/test installs Debian's prometheus-alertmanager")
    return path


def test_config_is_valid() -> None:
    result = subprocess.run(
        [_amtool(), "check-config", str(CONFIG)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _route(*labels: str) -> set[str]:
    result = subprocess.run(
        [_amtool(), "config", "routes", "test", f"--config.file={CONFIG}", *labels],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {r.strip() for r in result.stdout.strip().split(",")}


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=LLMBudgetExceeded", "budget=team-a", "severity=critical"], "finance-budget"),
        (["alertname=LLMBudgetWarning", "budget=team-a", "severity=warning"], "finance-budget"),
        (["alertname=LLMCostSpike", "severity=critical"], "platform-oncall"),
        (["alertname=LLMCostSpike", "severity=critical"], "finance-budget"),
        (["alertname=LLMUsageExporterDown", "severity=critical"], "platform-oncall"),
        (["alertname=LLMUsageFlushFailing", "severity=critical"], "platform-oncall"),
    ],
)
def test_routing(labels: list[str], receiver: str) -> None:
    assert receiver in _route(*labels)


def test_platform_alerts_do_not_page_finance() -> None:
    assert "finance-budget" not in _route("alertname=LLMUsageWALBacklog", "severity=warning")
