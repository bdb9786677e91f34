"""Static checks of the Grafana dashboards (dashboards/generate.py and its JSON output).

No running stack is needed. Every PromQL panel query is parsed by the real `promtool` (as a
recording rule) rather than checked with regexes. The live test that runs every query against
a Prometheus scraping a real exporter uses `prometheus_queries(expand=True)` from the
generator; the billing board's SQL is tested in test_billing_board.py, on a real Postgres
with the migrated schema and rollups written by the store.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import load_dashboard_generator

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
METRICS_DOC = ROOT / "docs" / "metrics.md"


gen = load_dashboard_generator()

EXPECTED_UIDS = {
    "llm-usage-overview.json": "llm-usage-overview",
    "llm-budgets.json": "llm-budgets",
    "llm-exporter-health.json": "llm-exporter-health",
    "llm-billing.json": "llm-billing",
}
DATASOURCE_TYPES = {
    "llm-usage-overview.json": "prometheus",
    "llm-budgets.json": "prometheus",
    "llm-exporter-health.json": "prometheus",
    "llm-billing.json": "grafana-postgresql-datasource",
}
#: Series Prometheus makes itself, allowed in panels besides the documented metrics.
BUILTIN_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"}
ALLOWED_UNITS = {
    "currencyUSD",
    "short",
    "reqps",
    "s",
    "percentunit",
    "bytes",
    "none",
    "dateTimeAsIso",
}
TOKEN_METRICS = {
    "llm_input_tokens_total",
    "llm_output_tokens_total",
    "llm_cached_input_tokens_total",
    "llm_cache_creation_input_tokens_total",
    "llm_reasoning_tokens_total",
}


def committed() -> dict[str, dict[str, Any]]:
    return {
        name: json.loads((DASHBOARDS / name).read_text(encoding="utf-8")) for name in EXPECTED_UIDS
    }


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def content_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in panels(dashboard) if p["type"] != "row")


# --------------------------------------------------------------------------- generator


def test_committed_json_equals_generator_output() -> None:
    built = gen.build_dashboards()
    assert sorted(built) == sorted(EXPECTED_UIDS)
    for name, dashboard in built.items():
        path = DASHBOARDS / name
        assert path.is_file(), f"{name} missing: run python dashboards/generate.py"
        assert path.read_text(encoding="utf-8") == gen.render(dashboard), (
            f"{name} differs from the generator: run python dashboards/generate.py"
        )


def test_generator_check_mode(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, str(DASHBOARDS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 0
    stale = tmp_path / "llm-budgets.json"
    stale.write_text(stale.read_text(encoding="utf-8").replace("Burn rate", "Burn"), "utf-8")
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 1
    (tmp_path / "llm-billing.json").unlink()
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 1


def test_generator_is_stdlib_only() -> None:
    source = (DASHBOARDS / "generate.py").read_text(encoding="utf-8")
    imported = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, re.MULTILINE))
    top = {name.split(".")[0] for name in imported}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top


def test_prometheus_queries_listing() -> None:
    queries = gen.prometheus_queries()
    assert len(queries) > 40
    for q in queries:
        uid, title, expr, allow_empty = q  # plain 4-tuples for the live test
        assert uid in EXPECTED_UIDS.values() and uid != "llm-billing"
        assert title and expr and isinstance(allow_empty, bool)
    titles = {(q.dashboard_uid, q.panel_title) for q in queries}
    # every allow-empty exception names a real panel and says why
    for key, reason in gen.ALLOW_EMPTY.items():
        assert key in titles, key
        assert len(reason) > 40
    assert {(q.dashboard_uid, q.panel_title) for q in queries if q.allow_empty} == set(
        gen.ALLOW_EMPTY
    )
    # keep the exceptions minimal: only the ALERTS panel may be empty
    assert all("ALERTS" in q.expr for q in queries if q.allow_empty)
    expanded = gen.prometheus_queries(expand=True, rate_interval="2m", range_="3h")
    assert len(expanded) == len(queries)
    for q in expanded:
        assert "$" not in q.expr, q.expr
    joined = " ".join(q.expr for q in expanded)
    assert "[2m]" in joined and "[3h]" in joined and 'model=~".*"' in joined
    assert 'model=~"gpt-4o"' in gen.expand_promql(
        'x{model=~"$model"}', variables={"model": "gpt-4o"}
    )
    variables = gen.prometheus_variable_queries()
    assert {(uid, name) for uid, name, _, _ in variables} >= {
        ("llm-usage-overview", "model"),
        ("llm-usage-overview", "user"),
        ("llm-usage-overview", "operation"),
    }


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_board_basics(name: str) -> None:
    d = committed()[name]
    assert d["uid"] == EXPECTED_UIDS[name]
    assert re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"])
    assert d["schemaVersion"] >= 39
    assert d["title"] and d["description"]
    assert "id" not in d or d["id"] is None
    assert "llm-usage" in d["tags"]


def test_uids_unique() -> None:
    uids = [d["uid"] for d in committed().values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_panel_ids_unique_and_grid_free_of_overlaps(name: str) -> None:
    d = committed()[name]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), ids
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in panels(d):
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_datasource_is_a_variable(name: str) -> None:
    d = committed()[name]
    ds_type = DATASOURCE_TYPES[name]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == ds_type
    expected = {"type": ds_type, "uid": "${datasource}"}
    for p in content_panels(d):
        assert p["datasource"] == expected, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == expected, p["title"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == expected, v["name"]
    refs = [t["refId"] for p in content_panels(d) for t in p["targets"]]
    assert refs, "no queries"


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_template_variables(name: str) -> None:
    d = committed()[name]
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        assert v["multi"] is True and v["includeAll"] is True, v["name"]
        assert v["refresh"] == 2, v["name"]  # refresh on time range change
        if DATASOURCE_TYPES[name] == "prometheus":
            assert v["allValue"] == ".*", v["name"]
            assert re.fullmatch(r"label_values\(.+, \w+\)", v["definition"]), v["definition"]
            assert v["query"]["query"] == v["definition"]
        else:
            assert v["allValue"] == gen.SQL_ALL
    names = {v["name"] for v in d["templating"]["list"]}
    if name == "llm-usage-overview.json":
        assert {"model", "user", "operation"} <= names
        exprs = [t["expr"] for p in content_panels(d) for t in p["targets"]]
        for var in ("$model", "$user", "$operation"):
            assert sum(var in e for e in exprs) >= 10, var
    if name == "llm-billing.json":
        assert {"team", "user", "model"} <= names


def _panel_exprs(p: dict[str, Any]) -> list[str]:
    return [t.get("expr") or t.get("rawSql") or "" for t in p["targets"]]


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_panels_titled_described_and_units_fit(name: str) -> None:
    d = committed()[name]
    titles = [p["title"] for p in panels(d)]
    assert all(t.strip() for t in titles)
    for p in content_panels(d):
        title = p["title"]
        assert len(p.get("description", "")) >= 20, f"{title}: describe the panel"
        unit = p["fieldConfig"]["defaults"].get("unit")
        assert unit, f"{title}: no unit"
        assert unit in ALLOWED_UNITS or unit.startswith("suffix:"), f"{title}: unit {unit}"
        exprs = _panel_exprs(p)
        joined = " ".join(exprs)
        used = (
            set().union(*(metric_names(e) for e in exprs)) if "expr" in p["targets"][0] else set()
        )
        ratio = re.search(r"\b(ratio|share)\b", title.lower()) is not None
        if "histogram_quantile" in joined:
            assert unit == "s", f"{title}: quantiles of *_seconds are seconds"
        elif ratio:
            assert unit == "percentunit", f"{title}: ratios use percentunit"
        elif "USD" in title:
            assert unit == "currencyUSD", f"{title}: USD panels use currencyUSD"
        elif used and used <= TOKEN_METRICS:
            assert (unit == "short" and "token" in title.lower()) or (
                unit.startswith("suffix:") and "token" in unit
            ), f"{title}: token panels are 'short' with 'tokens' in the title"
        elif (used and all(m.endswith("_seconds") for m in used)) or "time() -" in joined:
            assert unit == "s", f"{title}: seconds"
        # the other direction: money and ratios are never shown in another unit
        if unit == "currencyUSD" and p["type"] != "table":
            assert "USD" in title, f"{title}: say USD in the title"
        if any(m.endswith("_usd_total") or m.endswith("_usd") for m in used) and not ratio:
            assert unit == "currencyUSD" or p["type"] == "table", title
        if p["type"] == "table" and "cost_usd" in joined:
            overrides = p["fieldConfig"]["overrides"]
            assert any(
                o["matcher"].get("options") == "cost_usd"
                and {"id": "unit", "value": "currencyUSD"} in o["properties"]
                for o in overrides
            ), f"{title}: cost column must be currencyUSD"


# --------------------------------------------------------------------------- PromQL


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (`__name__` matchers included)."""
    names: set[str] = set()
    for m in re.finditer(r'__name__\s*=~?\s*"([^"]*)"', expr):
        names.update(m.group(1).split("|"))
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        word = m.group(0)
        if s[m.end() :].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{x="y"}[5m]))) / b * 3600'
    ) == {"a_bucket", "b"}
    assert metric_names('sum({__name__=~"c|d", q="1"}) or on() vector(0)') == {"c", "d"}
    assert metric_names("time() - max by (instance) (g)") == {"g"}


def documented_metrics() -> tuple[set[str], set[str], set[str]]:
    """(all documented names, usage counter families, usage histograms) from docs/metrics.md."""
    text = METRICS_DOC.read_text(encoding="utf-8")
    names = set(re.findall(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|", text, re.MULTILINE))
    usage_part = text.split("## Usage families", 1)[1].split("\n## ", 1)[0]
    usage = set(re.findall(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|", usage_part, re.MULTILINE))
    counters = {n for n in usage if n.endswith("_total")}
    histograms = usage - counters
    return names, counters, histograms


def _base_name(name: str, histograms: set[str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in histograms:
            return name.removesuffix(suffix)
    return name


def test_metrics_used_exist_and_usage_metrics_covered() -> None:
    documented, counters, histograms = documented_metrics()
    assert len(counters) == 8 and len(histograms) == 2, (counters, histograms)
    text = METRICS_DOC.read_text(encoding="utf-8")
    doc_histograms = set(re.findall(r"^\|\s*`(\w+)`\s*\|\s*histogram\s*\|", text, re.MULTILINE))
    assert "llm_usage_flush_duration_seconds" in doc_histograms
    all_histograms = histograms | doc_histograms
    used: set[str] = set()
    for q in gen.prometheus_queries():
        for name in metric_names(q.expr):
            base = _base_name(name, all_histograms)
            assert base in documented or base in BUILTIN_METRICS, (
                f"{q.panel_title}: {name} is neither in docs/metrics.md nor a Prometheus series"
            )
            if base in all_histograms:
                assert name.endswith("_bucket") or name.endswith(("_sum", "_count")), name
            used.add(base)
    missing = (counters | histograms) - used
    assert not missing, f"usage metrics on no panel: {sorted(missing)}"
    for h in histograms:
        assert any(
            f"{h}_bucket" in q.expr and "histogram_quantile" in q.expr
            for q in gen.prometheus_queries()
        ), h


def test_promql_conventions() -> None:
    for q in gen.prometheus_queries():
        where = f"{q.dashboard_uid} / {q.panel_title}: {q.expr}"
        for rng in re.findall(r"\[([^\]]+)\]", q.expr):
            assert rng in {"$__rate_interval", "$__range", "1h", "1d"}, where
        for m in re.finditer(r"\brate\((\w+)(?:\{[^}]*\})?\[([^\]]+)\]", q.expr):
            assert m.group(2) == "$__rate_interval", where
        names = metric_names(q.expr)
        if any(n.endswith(("_total", "_bucket")) for n in names):
            # counters of every replica add up
            assert re.search(r"\bsum\b", q.expr), where
        if any(n.startswith("llm_budget_") for n in names):
            # each replica exports the whole budget: never add them up
            assert "max by (budget)" in q.expr and "sum" not in q.expr, where
        assert "llm:" not in q.expr and "budget:" not in q.expr, f"recording rule in {where}"


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install it (Debian: apt-get install prometheus); "
            "this check must not be skipped",
            pytrace=False,
        )
    return path


def test_every_promql_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = _require_tool("promtool")
    queries = gen.prometheus_queries(expand=True, rate_interval="1m", range_="6h")
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": q.expr}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
