"""Prometheus rules: the real promtool checks them, and their metadata keeps its promises.

promtool is required (Debian package `prometheus`): without it these tests FAIL, never skip, so
a machine that cannot check the rules cannot pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
RULE_FILES = sorted(RULES.glob("*.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*.yml"))
METRICS_DOC = ROOT / "docs" / "metrics.md"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbooks.md"
SEVERITIES = {"critical", "warning", "info"}
BUILTIN_METRICS = {"up"}  # produced by Prometheus itself, not by the exporter

# PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS = frozenset(
    """
    sum min max avg group stddev stdvar count count_values bottomk topk quantile
    by without on ignoring group_left group_right bool offset and or unless
    abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month
    day_of_week day_of_year days_in_month delta deriv exp floor histogram_quantile holt_winters
    hour idelta increase irate label_join label_replace ln log2 log10 minute month
    predict_linear rate resets round scalar sgn sort sort_desc sqrt time timestamp vector year
    avg_over_time min_over_time max_over_time sum_over_time count_over_time quantile_over_time
    stddev_over_time stdvar_over_time last_over_time present_over_time inf nan
    """.split()  # noqa: SIM905
)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH. Install the Debian package `prometheus` "
            "(DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
            "prometheus); the rule tests never skip.",
            pytrace=False,
        )
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules(kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in _load(path)["groups"]:
            found.extend(rule for rule in group["rules"] if kind in rule)
    return found


def _alerts() -> list[dict[str, Any]]:
    return _rules("alert")


def _alert_names() -> set[str]:
    return {rule["alert"] for rule in _alerts()}


def _documented_metrics() -> set[str]:
    return set(re.findall(r"`(llm_[a-z0-9_]+)`", METRICS_DOC.read_text(encoding="utf-8")))


def _github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a light tokenizer; promtool checks the syntax)."""
    text = re.sub(r"#[^\n]*", " ", expr)  # comments
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', " ", text)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors and subqueries
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?[smhdwy]?\b", " ", text)  # numbers, durations
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {word for word in words if word not in PROMQL_WORDS}


def _template_metric_names(text: str) -> set[str]:
    """Metric names inside annotation templates' `query` strings."""
    return set(re.findall(r"\b(?:llm_[a-z0-9_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b", text))


def _check_names(names: set[str], recorded: set[str], where: str) -> list[str]:
    documented = _documented_metrics()
    problems = []
    for name in sorted(names):
        if ":" in name:
            if name not in recorded:
                problems.append(f"{where}: recorded series {name} is not defined in rules/")
            continue
        if name in BUILTIN_METRICS:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in documented and base not in documented:
            problems.append(f"{where}: metric {name} is not in docs/metrics.md")
    return problems


# --- the real promtool --------------------------------------------------------------------------


def test_rule_files_exist() -> None:
    assert {p.name for p in RULE_FILES} >= {"recording.yml", "alerts.yml"}
    assert TEST_FILES, "no promtool unit tests in rules/tests/"


def test_promtool_check_rules() -> None:
    result = _run("check", "rules", *(str(p.relative_to(ROOT)) for p in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = _run("test", "rules", *(str(p.relative_to(ROOT)) for p in TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES), result.stdout


def test_runbook_promql_parses(tmp_path: Path) -> None:
    """Every PromQL line in the runbooks is valid: promtool parses it as a recording rule."""
    blocks = re.findall(r"```promql\n(.*?)```", RUNBOOKS.read_text(encoding="utf-8"), re.S)
    exprs = [
        line.split(" #")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(exprs) > 10
    rules = [{"record": f"runbook:check{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "runbook_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "runbook", "rules": rules}]}))
    result = _run("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- metadata ------------------------------------------------------------------------------------


REQUIRED_ALERTS = {
    "LLMCostSpike",
    "LLMBudgetWarning",
    "LLMBudgetExceeded",
    "LLMErrorRateHigh",
    "LLMUsageExporterDown",
    "LLMUsageFlushFailing",
    "LLMUsageWALBacklog",
    "LLMUsageLabelOverflow",
    "LLMUsageReportsQuarantined",
}


def test_required_alerts_present() -> None:
    assert _alert_names() >= REQUIRED_ALERTS


@pytest.mark.parametrize("rule", _alerts(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}")
def test_alert_metadata(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert rule.get("labels", {}).get("severity") in SEVERITIES, name
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert str(annotations.get(key, "")).strip(), f"{name}: annotation {key} missing"
    assert "{{" in annotations["description"], f"{name}: description has no templated value"
    assert annotations["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}"


def test_runbook_anchors_exist() -> None:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", RUNBOOKS.read_text(encoding="utf-8"), re.M)
    anchors = {_github_anchor(h) for h in headings}
    for rule in _alerts():
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/runbooks.md"


def _alert_tests() -> list[tuple[str, list[Any]]]:
    cases = []
    for path in TEST_FILES:
        for test in _load(path)["tests"]:
            for case in test.get("alert_rule_test", []) or []:
                cases.append((case["alertname"], case.get("exp_alerts") or []))
    return cases


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases = _alert_tests()
    fires = {name for name, expected in cases if expected}
    quiet = {name for name, expected in cases if not expected}
    for name in sorted(_alert_names()):
        assert name in fires, f"{name}: no promtool test shows it firing"
        assert name in quiet, f"{name}: no promtool test shows it NOT firing"


def test_unit_tests_name_real_alerts() -> None:
    """promtool happily 'passes' exp_alerts: [] for a misspelt alert name."""
    unknown = {name for name, _ in _alert_tests()} - _alert_names()
    assert not unknown, f"tests refer to alerts that do not exist: {unknown}"


def test_metric_names_are_in_the_contract() -> None:
    recorded = {rule["record"] for rule in _rules("record")}
    problems: list[str] = []
    seen: set[str] = set()
    for rule in _rules("record") + _alerts():
        where = rule.get("record") or rule["alert"]
        names = _metric_names(rule["expr"])
        for key in ("summary", "description"):
            names |= _template_metric_names(str(rule.get("annotations", {}).get(key, "")))
        seen |= names
        problems += _check_names(names, recorded, where)
    assert not problems, "\n".join(problems)
    # the tokenizer really found the usage families, not nothing
    assert {"llm_cost_usd_total", "llm_budget_usage_ratio", "up"} <= seen


def test_metric_name_extractor() -> None:
    expr = (
        'sum without (instance, pod) (rate(llm_cost_usd_total{job="x",model=~"gpt.*"}[5m])) '
        "> 3 * job:llm_cost_usd:rate5m_avg6h and on (budget) "
        "histogram_quantile(0.99, rate(llm_usage_flush_duration_seconds_bucket[10m])) "
        'or absent(up{job="llm-usage-exporter"}) # a comment llm_not_a_metric'
    )
    assert _metric_names(expr) == {
        "llm_cost_usd_total",
        "job:llm_cost_usd:rate5m_avg6h",
        "llm_usage_flush_duration_seconds_bucket",
        "up",
    }
    assert _check_names({"llm_made_up_total"}, set(), "x") == [
        "x: metric llm_made_up_total is not in docs/metrics.md"
    ]
