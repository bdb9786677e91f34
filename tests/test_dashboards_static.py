"""Static checks of the Grafana dashboards (dashboards/generate.py and its JSON output).

No running stack is needed. Two checks use real tools rather than regexes: every PromQL panel
query is parsed by the real `promtool` (as a recording rule), and the billing board's SQL runs
on a throwaway PostgreSQL cluster created by this test against the `usage_rollups` table.
The live test that runs every query against a Prometheus scraping a real exporter uses
`prometheus_queries(expand=True)` from the generator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
METRICS_DOC = ROOT / "docs" / "metrics.md"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _load_generator()

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


# --------------------------------------------------------------------------- billing SQL

USAGE_ROLLUPS_DDL = """
CREATE TABLE usage_rollups (
    granularity TEXT NOT NULL CHECK (granularity IN ('hour', 'day')),
    bucket_start TIMESTAMPTZ NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    operation TEXT NOT NULL,
    "user" TEXT NOT NULL,
    team TEXT NOT NULL,
    api_key_id TEXT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_creation_input_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_usd NUMERIC(20, 10) NOT NULL,
    duration_ms_sum DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (granularity, bucket_start, model, provider, operation, "user", team, api_key_id)
);
"""

# 2024-01-01 .. 2024-02-29 (60 days): alice/team-a/gpt-4o costs 1.5 a day, an anonymous
# claude call 0.25 a day; 25 users u01..u25 spend 1..25 on 2024-02-10; hourly rows (cost
# 1000) and rows outside the range (2023) must never be counted.
SEED = """
INSERT INTO usage_rollups
SELECT 'day', d, 'gpt-4o', 'openai', 'chat', 'alice', 'team-a', 'k1',
       10, 1, 1000, 200, 300, 50, 20, 1.5, 12345.0
FROM generate_series('2024-01-01'::timestamptz, '2024-02-29', '1 day') AS d;
INSERT INTO usage_rollups
SELECT 'day', d, 'claude-3-5-sonnet', 'anthropic', 'chat', '', '', '',
       2, 0, 100, 10, 0, 0, 0, 0.25, 100.0
FROM generate_series('2024-01-01'::timestamptz, '2024-02-29', '1 day') AS d;
INSERT INTO usage_rollups
SELECT 'day', '2024-02-10', 'gpt-4o-mini', 'openai', 'embedding', 'u' || lpad(i::text, 2, '0'),
       'team-b', '', 1, 0, 10, 0, 0, 0, 0, i, 1.0
FROM generate_series(1, 25) AS i;
INSERT INTO usage_rollups VALUES
  ('hour', '2024-01-05 10:00+00', 'gpt-4o', 'openai', 'chat', 'alice', 'team-a', 'k1',
   10, 1, 1000, 200, 300, 50, 20, 1000, 1.0),
  ('day', '2023-06-01 00:00+00', 'gpt-4o', 'openai', 'chat', 'alice', 'team-a', 'k1',
   10, 1, 1000, 200, 300, 50, 20, 1000, 1.0);
"""
TOTAL = 60 * 1.5 + 60 * 0.25 + sum(range(1, 26))
START, END = "2024-01-01T00:00:00Z", "2024-03-31T23:59:59Z"


class Postgres:
    """A throwaway cluster on a private Unix socket, run as `postgres` when we are root."""

    def __init__(self) -> None:
        candidates = [Path(os.environ["PG_BIN"]) / "initdb"] if os.environ.get("PG_BIN") else []
        candidates += sorted(
            Path("/usr/lib/postgresql").glob("*/bin/initdb"),
            key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
            reverse=True,
        )
        found = shutil.which("initdb")
        candidates += [Path(found)] if found else []
        initdb = next((c for c in candidates if c.is_file()), None)
        if initdb is None:
            pytest.fail(
                "PostgreSQL server binaries not found (Debian: apt-get install postgresql; "
                "or set PG_BIN); the billing SQL must run on a real Postgres",
                pytrace=False,
            )
        self.bindir = Path(initdb).resolve().parent
        self.dir = Path(tempfile.mkdtemp(prefix="llm-billing-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.dir, "postgres", "postgres")
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self.port = "5432"

    def _run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *cmd], capture_output=True, text=True, check=False, timeout=120
        )

    def start(self) -> None:
        r = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        opts = f"-c listen_addresses='' -k {self.dir} -p {self.port} -c fsync=off"
        r = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.dir / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        assert r.returncode == 0, r.stdout + r.stderr + self._log()

    def _log(self) -> str:
        log = self.dir / "log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def psql(self, sql: str) -> list[dict[str, str]]:
        """Run SQL; return the rows of the last statement as dicts (all values as text)."""
        r = subprocess.run(
            [
                *self.as_user,
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-F",
                "\t",
                "-P",
                "footer=off",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.dir),
                "-p",
                self.port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ],
            # not UTC, and west of it: the SQL must not depend on the session time zone
            input="SET TIME ZONE 'America/New_York';\n" + sql,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert r.returncode == 0, f"{r.stderr}\n--- SQL ---\n{sql}"
        lines = [line for line in r.stdout.splitlines() if line]
        if not lines:
            return []
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.start()
        server.psql(USAGE_ROLLUPS_DDL + SEED)
        yield server
    finally:
        server.stop()


def _billing_query(title: str) -> str:
    for uid, panel, query in gen.postgres_queries():
        if uid == "llm-billing" and panel == title:
            return query
    raise KeyError(title)


def test_billing_sql_references_only_usage_rollups() -> None:
    columns = set(re.findall(r"^\s+\"?(\w+)\"? [A-Z]", USAGE_ROLLUPS_DDL, re.MULTILINE))
    for _, title, query in gen.postgres_queries():
        assert "FROM usage_rollups" in query, title
        assert "granularity = 'day'" in query, title
        assert "$__timeFilter(bucket_start)" in query, title
        bare = re.sub(r"'(?:[^']|'')*'", "''", query).replace('"user"', "").replace("$user", "")
        assert not re.search(r"\buser\b", bare), f"{title}: user is reserved in Postgres, quote it"
        for col in re.findall(r"SUM\((\w+)", query):
            assert col in columns, f"{title}: no column {col}"


@pytest.mark.parametrize(
    "variables",
    [
        {},
        {"team": ["team-a"]},
        {"team": ["(none)"], "model": ["claude-3-5-sonnet"]},
        {"user": ["alice", "u07"], "model": ["gpt-4o", "gpt-4o-mini"]},
        {"user": ["nobody's"]},
    ],
    ids=["all", "team", "none-team", "multi", "quote-in-value"],
)
def test_billing_sql_runs_on_postgres(pg: Postgres, variables: dict[str, list[str]]) -> None:
    for _, title, query in gen.postgres_queries():
        rows = pg.psql(gen.expand_sql(query, start=START, end=END, variables=variables) + ";")
        if title.startswith("variable "):
            assert all(len(r) == 1 for r in rows), title
            continue
        if variables.get("user") == ["nobody's"]:
            assert all(r.get("spend_usd", "0") in ("0", "0.0000000000") for r in rows), title
            continue
        assert rows, f"{title}: no rows for {variables}"
        panel = next(
            p
            for d in gen.build_dashboards().values()
            for p in content_panels(d)
            if p["title"] == title and d["uid"] == "llm-billing"
        )
        if panel["type"] == "timeseries":
            assert list(rows[0]) == ["time", "metric", "spend_usd"], title
            times = [r["time"] for r in rows]
            assert times == sorted(times), f"{title}: time series must be sorted by time"


def _total(rows: list[dict[str, str]], column: str) -> float:
    return sum(float(r[column]) for r in rows)


def test_billing_sql_figures(pg: Postgres) -> None:
    def run(title: str, **variables: list[str]) -> list[dict[str, str]]:
        query = gen.expand_sql(_billing_query(title), start=START, end=END, variables=variables)
        return pg.psql(query + ";")

    assert float(run("Spend in range (USD)")[0]["spend_usd"]) == pytest.approx(TOTAL)
    assert float(run("Spend in range (USD)", team=["(none)"])[0]["spend_usd"]) == 15.0
    assert int(run("Requests in range")[0]["requests"]) == 60 * 10 + 60 * 2 + 25
    assert int(run("Tokens in range (input + output)")[0]["tokens"]) == 60 * 1200 + 60 * 110 + 250

    for title in ("Spend per day by team (USD)", "Spend per month by team (USD)"):
        assert _total(run(title), "spend_usd") == pytest.approx(TOTAL), title
    by_month = run("Spend per month by team (USD)")
    assert {r["metric"] for r in by_month} == {"team-a", "team-b", "(none)"}
    starts = {datetime.fromisoformat(r["time"]).astimezone(UTC) for r in by_month}
    assert starts == {datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)}

    # top-20 users: 21 named series at most plus '(other)', nothing lost
    users = run("Spend per day by user (USD)")
    assert _total(users, "spend_usd") == pytest.approx(TOTAL)
    names = {r["metric"] for r in users}
    assert "(other)" in names and "u25" in names and "u01" not in names
    assert len(names - {"(other)"}) == 20

    monthly = run("Monthly usage by team, user and model")
    assert _total(monthly, "cost_usd") == pytest.approx(TOTAL)
    assert {r["month"] for r in monthly} == {"2024-01", "2024-02"}
    alice_jan = next(r for r in monthly if r["month"] == "2024-01" and r["user"] == "alice")
    assert int(alice_jan["requests"]) == 310 and float(alice_jan["cost_usd"]) == 46.5
    assert int(alice_jan["cached_input_tokens"]) == 31 * 300
    daily = run("Daily usage by team, user and model", user=["alice"])
    assert len(daily) == 60 and daily[0]["day"] == "2024-01-01"
    assert {r["team"] for r in run("Daily usage by team, user and model", team=["(none)"])} == {
        "(none)"
    }
    assert [r for r in run("variable team")] == [
        {"coalesce": "(none)"},
        {"coalesce": "team-a"},
        {"coalesce": "team-b"},
    ]
