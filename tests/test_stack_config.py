"""Static checks of the deployment files: prometheus.yml, docker-compose.yml, Dockerfile and the
Grafana provisioning. Nothing is started; `promtool` is the real one (the test fails, never
skips, when it is missing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
JOB = "llm-usage-exporter"
SERVICES = {"exporter", "postgres", "prometheus", "alertmanager", "grafana"}


def load_yaml(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- compose helpers

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}|\$(?P<named>\w+)"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR` and `$$`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("named")
        op, default = m.group("op"), m.group("default") or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            assert name in env, f"${{{name}}} is required"
        return env.get(name, "")

    return _INTERPOLATION.sub(sub, value)


def test_interpolate() -> None:
    env = {"A": "1", "E": ""}
    assert interpolate("${A}-${B:-x}-${E:-y}-${E-z}-$A-$$A", env) == "1-x-y--1-$A"


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    return interpolate(load_yaml("docker-compose.yml"), env or {})


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = set()
    for spec in service.get("ports", []):
        spec = str(spec).split("/")[0]
        ports.add(int(spec.rsplit(":", 1)[-1]))
    for spec in service.get("expose", []):
        ports.add(int(str(spec).split("/")[0]))
    return ports


def bind_mounts(service: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(source relative to the repo, target) of the bind mounts of a service."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, dict):
            if vol.get("type") == "bind":
                out.append((vol["source"], vol["target"]))
            continue
        source, target = vol.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def mount_target(service: Mapping[str, Any], source: str) -> str:
    for src, target in bind_mounts(service):
        if PurePosixPath(src) == PurePosixPath(source):
            return target
    raise AssertionError(f"{source} is not mounted")


def host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "//" in address else f"//{address}")
    assert parts.hostname and parts.port, address
    return parts.hostname, parts.port


# --------------------------------------------------------------------------- prometheus.yml


def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found: install it (Debian: apt-get install prometheus); "
            "this check must not be skipped",
            pytrace=False,
        )
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "SUCCESS: prometheus.yml is valid" in out
    # rule_files are resolved relative to prometheus.yml; promtool checks each file it loads
    rule_files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "rules").glob("*.yml"))
    assert f"SUCCESS: {len(rule_files)} rule files found" in out, out
    for rel in rule_files:
        assert f"Checking {rel}" in out, f"{rel} not loaded:\n{out}"
    assert "FAILED" not in out


def test_prometheus_config_contents() -> None:
    cfg = load_yaml("prometheus.yml")
    assert cfg["rule_files"] == ["rules/*.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs[JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["exporter:9470"]
    # /metrics is open by default: no credentials, but an example to enable them
    assert not {"authorization", "bearer_token", "bearer_token_file", "basic_auth"} & set(job)
    text = (ROOT / "prometheus.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s*#\s*authorization:", text, re.MULTILINE)
    assert re.search(r"^\s*#\s*type: Bearer", text, re.MULTILINE)
    ams = [sc for am in cfg["alerting"]["alertmanagers"] for sc in am["static_configs"]]
    assert [t for sc in ams for t in sc["targets"]] == ["alertmanager:9093"]
    interval = job.get("scrape_interval", cfg["global"]["scrape_interval"])
    ds = load_yaml("dashboards/provisioning/datasources.yml")["datasources"]
    prom = next(d for d in ds if d["type"] == "prometheus")
    assert prom["jsonData"]["timeInterval"] == interval, "Grafana's $__rate_interval base"


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_services_and_images_pinned() -> None:
    c = compose()
    assert set(c["services"]) == SERVICES
    for name, svc in c["services"].items():
        if "build" in svc:
            assert not str(svc.get("image", "")).endswith(":latest"), name
            continue
        image = svc["image"]
        assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{name}: {image} no tag"
        tag = image.rsplit("/", 1)[-1].split(":", 1)[1].split("@")[0]
        assert tag != "latest", f"{name}: {image}"
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?([-.][\w.]+)?", tag), f"{name}: pin a version"
    assert c["services"]["postgres"]["image"].split(":")[1].startswith("15.")


def test_compose_bind_mounts_exist_and_named_volumes_declared() -> None:
    c = compose()
    declared = set(c.get("volumes") or {})
    for name, svc in c["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} not declared"
        for source, target in bind_mounts(svc):
            assert not source.startswith("/"), f"{name}: {source} is outside the repo"
            path = (ROOT / source).resolve()
            assert path.exists(), f"{name}: bind mount {source} does not exist in the repo"
            if PurePosixPath(target).suffix in (".yml", ".yaml", ".json"):
                assert path.is_file(), f"{name}: {source} should be a file"


def test_compose_healthchecks_and_dependencies() -> None:
    c = compose()
    services = c["services"]
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name}: no healthcheck"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            assert condition in ("service_started", "service_healthy"), condition
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{dep} has no healthcheck"
    assert services["exporter"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    exporter_hc = " ".join(services["exporter"]["healthcheck"]["test"])
    assert "/healthz" in exporter_hc and "urllib" in exporter_hc


def test_compose_prometheus_and_alertmanager_wiring() -> None:
    c = compose()
    services = c["services"]
    prom = services["prometheus"]
    config_target = mount_target(prom, "./prometheus.yml")
    assert f"--config.file={config_target}" in prom["command"]
    rules_target = mount_target(prom, "./rules")
    assert PurePosixPath(rules_target) == PurePosixPath(config_target).parent / "rules", (
        "rule_files: rules/*.yml is relative to the config file"
    )
    cfg = load_yaml("prometheus.yml")
    targets = [
        t for j in cfg["scrape_configs"] for sc in j["static_configs"] for t in sc["targets"]
    ]
    targets += [
        t
        for am in cfg["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    for target in targets:
        host, port = host_port(target)
        if host == "localhost":
            continue  # Prometheus scraping itself
        assert host in services, f"prometheus.yml target {target}: no such service"
        assert port in container_ports(services[host]), f"{target}: {host} does not listen there"
    am = services["alertmanager"]
    assert f"--config.file={mount_target(am, './alertmanager.yml')}" in am["command"]


def test_compose_exporter_port_and_tokens() -> None:
    c = compose()
    exporter = c["services"]["exporter"]
    env = env_of(exporter)
    port = int(env.get("LLM_USAGE_PORT", "9470"))
    assert port == 9470
    assert container_ports(exporter) == {port}
    assert env["LLM_USAGE_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{port}" in " ".join(exporter["healthcheck"]["test"])
    # binding 0.0.0.0 needs a token (or insecure mode); the demo stack uses a token
    tokens = json.loads(env["LLM_USAGE_TOKENS"])
    assert tokens and all(len(t["token"]) >= 16 for t in tokens)
    assert env.get("LLM_USAGE_INSECURE", "false").lower() in ("false", "0")
    demo = tokens[0]["token"]
    assert demo in (ROOT / "docs" / "stack.md").read_text(encoding="utf-8")
    assert {"ingest", "read"} <= set(tokens[0]["scopes"]) or "admin" in tokens[0]["scopes"]
    # an override reaches the token
    overridden = json.loads(
        env_of(compose({"LLM_USAGE_DEMO_TOKEN": "x" * 20})["services"]["exporter"])[
            "LLM_USAGE_TOKENS"
        ]
    )
    assert overridden[0]["token"] == "x" * 20


@pytest.mark.parametrize("password", [None, "s3cret-Passw0rd"])
def test_compose_database_url_matches_postgres(password: str | None) -> None:
    c = compose({"POSTGRES_PASSWORD": password} if password else {})
    pg = env_of(c["services"]["postgres"])
    url = urlsplit(env_of(c["services"]["exporter"])["LLM_USAGE_DATABASE_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == "postgres" and (url.port or 5432) in container_ports(
        c["services"]["postgres"]
    )
    assert unquote(url.username or "") == pg["POSTGRES_USER"]
    assert unquote(url.password or "") == pg["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg["POSTGRES_DB"]
    if password:
        assert pg["POSTGRES_PASSWORD"] == password
    # Grafana reads the same password for its Postgres data source
    assert env_of(c["services"]["grafana"])["POSTGRES_PASSWORD"] == pg["POSTGRES_PASSWORD"]


# --------------------------------------------------------------------------- Grafana provisioning


def test_grafana_provisioning_matches_compose() -> None:
    c = compose()
    services = c["services"]
    grafana = services["grafana"]
    ds_target = mount_target(grafana, "./dashboards/provisioning/datasources.yml")
    db_target = mount_target(grafana, "./dashboards/provisioning/dashboards.yml")
    assert ds_target.startswith("/etc/grafana/provisioning/datasources/")
    assert db_target.startswith("/etc/grafana/provisioning/dashboards/")
    boards_target = mount_target(grafana, "./dashboards")
    providers = load_yaml("dashboards/provisioning/dashboards.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == [boards_target]
    home = env_of(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        rel = PurePosixPath(home).relative_to(boards_target)
        assert (ROOT / "dashboards" / rel).is_file()
    assert 3000 in container_ports(grafana)

    datasources = load_yaml("dashboards/provisioning/datasources.yml")["datasources"]
    by_type = {d["type"]: d for d in datasources}
    prom = by_type["prometheus"]
    host, port = host_port(prom["url"])
    assert (host, port) == ("prometheus", 9090)
    assert port in container_ports(services[host])
    assert prom.get("isDefault") is True

    pgds = by_type["grafana-postgresql-datasource"]
    host, port = host_port(pgds["url"])
    assert host == "postgres" and port in container_ports(services["postgres"])
    pg_env = env_of(services["postgres"])
    assert pgds["jsonData"]["database"] == pg_env["POSTGRES_DB"] == "llm_usage"
    assert pgds["user"] == pg_env["POSTGRES_USER"] == "llm_usage"
    ref = pgds["secureJsonData"]["password"]
    m = re.fullmatch(r"\$\{?(\w+)\}?", ref)
    assert m, "the password comes from Grafana's environment, not the file"
    assert env_of(grafana)[m.group(1)] == pg_env["POSTGRES_PASSWORD"]

    # the dashboards' data source variables find these types
    for board in (ROOT / "dashboards").glob("*.json"):
        d = json.loads(board.read_text(encoding="utf-8"))
        ds_var = next(v for v in d["templating"]["list"] if v["name"] == "datasource")
        assert ds_var["query"] in by_type, board.name


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    ins = dockerfile_instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    final = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    runtime = ins[final:]
    users = [rest for op, rest in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as non-root"
    assert ("EXPOSE", "9470") in runtime
    assert any(op == "VOLUME" and "/data" in rest for op, rest in runtime)
    entry = [json.loads(rest) for op, rest in runtime if op == "ENTRYPOINT"]
    cmd = [json.loads(rest) for op, rest in runtime if op == "CMD"]
    assert entry == [["llm-usage-exporter"]]
    assert cmd == [["serve", "--host", "0.0.0.0"]]
    hc = " ".join(rest for op, rest in runtime if op == "HEALTHCHECK")
    assert "/healthz" in hc and "urllib" in hc and "curl" not in hc and "9470" in hc
    assert all(
        "--no-cache-dir" in rest for op, rest in ins if op == "RUN" and "pip install" in rest
    )
    for op, rest in ins:
        if op == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "llm-usage-exporter" in pyproject["project"]["scripts"]


def test_compose_file_validates_with_compose_cli() -> None:
    """Schema check by the real compose CLI where one is installed (no daemon needed)."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            continue
        result = subprocess.run(
            [*cmd, "-f", "docker-compose.yml", "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return
    pytest.fail("no docker compose CLI: scripts/test installs Debian's docker-compose")


# --------------------------------------------------------------------------- docs


def test_stack_doc_matches_compose() -> None:
    doc = (ROOT / "docs" / "stack.md").read_text(encoding="utf-8")
    assert "docker compose up -d" in doc
    for port in (3000, 9090, 9093, 9470):
        assert f"localhost:{port}" in doc, port
    assert "llm_usage_demo" in doc and "POSTGRES_PASSWORD" in doc
    assert "curl" in doc and "/v1/usage" in doc
